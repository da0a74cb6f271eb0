"""The decentralized role family: `p2p-tracker` (membership and SMPL's hyperedge draws, no torch),
`p2p-peer` (averages with every live peer --syncs-per-epoch times an epoch) and `smpl-peer` (synchronises inside
random hyperedges). Declarations only: the role classes are imported when a role is built, so
declaring never imports torch."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from splitfed.config import setting
from splitfed.learning.settings import HyperedgeSettings, P2PSettings, SMPLSettings
from splitfed.observability import metrics
from splitfed.roles.declaration import Builder, Replicas, RoleSpec
from splitfed.roles.deployment import Party, Reporting, SigningService
from splitfed.roles.p2p.common import P2P_PEER, SMPL_PEER, TRACKER, peer_name


@dataclass(kw_only=True)
class Liveness:
    peer_timeout: float = setting(15.0, "Seconds without a heartbeat before the tracker evicts a peer (peers beat three times as often).", min=0.3)


@dataclass(kw_only=True)
class TrackerDeployment(SigningService, Reporting, Liveness):
    expect_peers: int = setting(0, "Finish once this many peers have registered and none is live any more (0: serve until stopped).", min=0)


@dataclass(kw_only=True)
class PeerDeployment(Party, Liveness):
    peer_index: int = setting(0, "Which of the run's --peers this is (0-based): its share of the data and its name, ROLE-INDEX.", min=0)


def _built_by(module: str, name: str) -> Builder:
    """A builder that imports the role's class only when the role is built (peers import torch)."""

    def build(settings, deployment, transport, identity, on_progress):  # noqa: ANN001, ANN202
        return getattr(importlib.import_module(module), name)(settings, deployment, transport, identity, on_progress)

    return build


PEER_METRICS = (*metrics.WIRE, metrics.EPOCH, metrics.TRAIN_LOSS, metrics.TEST_ACCURACY, metrics.LOCAL_SAMPLES, metrics.PEER_MODELS, metrics.PEER_STALENESS, metrics.PEER_ACCURACY)

ROLES = (
    RoleSpec(
        TRACKER, "Who is in a decentralized session: registers, evicts silent peers, tells every peer; draws SMPL's hyperedges (no torch).",
        HyperedgeSettings, TrackerDeployment, _built_by("splitfed.roles.p2p.tracker", "Tracker"), (*metrics.WIRE, metrics.LIVE_PEERS, metrics.PEERS_EVICTED, metrics.HYPEREDGES_ACTIVE),
        # It keeps the membership of both decentralized families: p2p unless the release's peers are SMPL's.
        families=("p2p", "smpl"), job=True, values_key="p2pTracker", image=TRACKER,
    ),
    RoleSpec(
        P2P_PEER, "A peer of a p2p session: trains its share, sends its model to every live peer --syncs-per-epoch times an epoch, averages what arrived.",
        P2PSettings, PeerDeployment, _built_by("splitfed.roles.p2p.peer", "P2PPeer"), PEER_METRICS, party=lambda learning, deployment: peer_name(P2P_PEER, deployment.peer_index),
        index=lambda learning, deployment: deployment.peer_index,
        families=("p2p",), torch=True, reads_data=True, replicas=Replicas.AT_LEAST_ONE, counts="peers", job=True, values_key="p2pPeer", image=P2P_PEER,
    ),
    RoleSpec(
        SMPL_PEER, "A peer of an SMPL session: trains in random hyperedges the tracker draws and synchronises inside each.",
        SMPLSettings, PeerDeployment, _built_by("splitfed.roles.p2p.smpl", "SMPLPeer"), (*PEER_METRICS, metrics.HYPEREDGES_ACTIVE), party=lambda learning, deployment: peer_name(SMPL_PEER, deployment.peer_index),
        index=lambda learning, deployment: deployment.peer_index,
        families=("smpl",), torch=True, reads_data=True, replicas=Replicas.AT_LEAST_ONE, counts="peers", job=True, values_key="smplPeer", image=SMPL_PEER,
    ),
)
