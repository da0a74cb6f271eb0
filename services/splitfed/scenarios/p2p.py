"""p2p and smpl: decentralized training. A tracker (the lead: it hears every peer's reports) and
--peers peers, each with its share of the data; models go from peer to peer, never through a server."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from splitfed import config
from splitfed.learning.settings import HyperedgeSettings, P2PSettings, PeerSettings, SMPLSettings
from splitfed.roles.p2p import Liveness, PeerDeployment, TrackerDeployment
from splitfed.roles.p2p.common import P2P_PEER, SMPL_PEER, TRACKER, peer_name, session_queues
from splitfed.roles.registry import ROLES
from splitfed.scenarios.launch import Launch, RunSettings, Scenario, threads_per_process


@dataclass(kw_only=True)
class PeerRun(RunSettings, Liveness):
    pass


def planner(role: str):  # noqa: ANN201 (a Scenario's plan)
    def plan(settings: PeerSettings, run: PeerRun, workdir: Path) -> list[Launch]:
        """The tracker first (the lead), expecting every peer; then the peers, which all train at once."""
        service = {"session": run.session, "timeout": run.timeout, "key_list": run.key_list, "log_level": run.log_level, "peer_timeout": run.peer_timeout}
        matching = config.build(HyperedgeSettings, config.values_of(settings))
        launches = [Launch(ROLES[TRACKER], TRACKER, matching, TrackerDeployment(**service, expect_peers=settings.peers, private_key=run.private_key(TRACKER)))]
        threads = threads_per_process(settings.peers)
        for index in range(settings.peers):
            name = peer_name(role, index)
            launches.append(Launch(ROLES[role], name, settings, PeerDeployment(**service, peer_index=index, private_key=run.private_key(name)), threads))
        return launches

    return plan


def queues(role: str):  # noqa: ANN201 (a Scenario's queues)
    return lambda settings, run: session_queues(run.session, role, settings.peers)


P2P = Scenario(
    "p2p",
    "Decentralized P2P averaging: --peers peers each train on their share and, --syncs-per-epoch times an epoch, send their model to every live peer and "
    "average what has arrived, waiting for nobody longer than --sync-wait; a tracker keeps the membership.",
    P2PSettings, PeerRun, planner(P2P_PEER), queues=queues(P2P_PEER),
    label=lambda settings, run: f"p2p ({settings.peers} peers, {run.broker_scheme})",
)

SMPL = Scenario(
    "smpl",
    "SMPL: --peers peers train in random hyperedges of --hyperedge-size the tracker draws, and synchronise their parameters inside each.",
    SMPLSettings, PeerRun, planner(SMPL_PEER), queues=queues(SMPL_PEER),
    label=lambda settings, run: f"smpl ({settings.peers} peers, hyperedges of {settings.hyperedge_size}, {run.broker_scheme})",
)
