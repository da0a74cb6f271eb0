"""splitnn: several split clients (each with its share of the data) against one split server, on a
schedule: round-robin, splitfed-v1 or splitfed-v2 (with the fed averaging the clients' layers).
Clients reach the server directly, each on its own inbox."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from splitfed.learning.settings import SplitNNSettings
from splitfed.roles.deployment import SigningService
from splitfed.roles.registry import ROLES
from splitfed.roles.split import SplitClientParty, SplitParty
from splitfed.roles.split.common import CLIENT, FED, SERVER, client_name, session_queues
from splitfed.scenarios.launch import Launch, RunSettings, Scenario
from splitfed.scenarios.split import compute_threads


@dataclass(kw_only=True)
class SplitNNRun(RunSettings):
    pass


def plan(settings: SplitNNSettings, run: SplitNNRun, workdir: Path) -> list[Launch]:
    """The server first (the lead: it closes the epochs and holds the run's history), the fed
    (splitfed-v1/v2 with several clients), then the clients."""
    service = {"session": run.session, "timeout": run.timeout, "key_list": run.key_list, "log_level": run.log_level}
    in_parallel = settings.schedule != "round-robin" and settings.clients > 1
    client_threads, server_threads = compute_threads(settings, settings.clients if in_parallel else 1)
    launches = [Launch(ROLES[SERVER], SERVER, settings, SplitParty(**service, via="direct", private_key=run.private_key(SERVER)), server_threads)]
    if in_parallel:
        launches.append(Launch(ROLES[FED], FED, settings, SigningService(**service, private_key=run.private_key(FED)), 1))
    for index in range(settings.clients):
        name = client_name(index, settings.clients)
        deployment = SplitClientParty(**service, via="direct", client_index=index, private_key=run.private_key(name))
        launches.append(Launch(ROLES[CLIENT], name, settings, deployment, client_threads))
    return launches


SCENARIO = Scenario(
    "splitnn",
    "Split learning with several data owners: --clients N split clients against one split server, --schedule round-robin, "
    "splitfed-v1 or splitfed-v2 (the fed averages the clients' layers each epoch), in one process or as separate processes over RabbitMQ.",
    SplitNNSettings, SplitNNRun, plan,
    queues=lambda settings, run: session_queues(run.session, settings.clients),
    label=lambda settings, run: f"splitnn ({settings.schedule}, {settings.clients} clients, {run.broker_scheme})",
)
