"""fedavg: one fedavg-server and N fedavg-workers, each holding only its share of the data."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from splitfed import config
from splitfed.config import setting
from splitfed.learning.settings import FederatedSettings, PartitionSettings
from splitfed.roles.deployment import RoundPolicy
from splitfed.roles.fedavg import SERVER, WORKER, ServerDeployment, WorkerDeployment, worker_ids
from splitfed.roles.fedavg.common import session_queues
from splitfed.roles.registry import ROLES
from splitfed.scenarios.launch import Launch, RunSettings, Scenario, threads_per_process


@dataclass(kw_only=True)
class FedAvgRun(RunSettings, RoundPolicy):
    timeout: float = setting(600.0, "Seconds any role waits for a peer before giving up.", min=0.1)
    checkpoint_dir: Path | None = setting(None, "Where the server keeps its checkpoint; a run with the same --session resumes from it.")


def plan(settings: FederatedSettings, run: FedAvgRun, workdir: Path) -> list[Launch]:
    service = {"session": run.session, "timeout": run.timeout, "key_list": run.key_list, "log_level": run.log_level}
    server = ServerDeployment(
        **service, private_key=run.private_key(SERVER), checkpoint_dir=run.checkpoint_dir, min_workers=run.min_workers, round_timeout=run.round_timeout,
    )
    # Workers train at the same time: they share the cores. The server works while they wait.
    # With --evaluate parties it reads no data: it is given no folder, and none need exist for it.
    server_learning = settings if settings.evaluate != "parties" else dataclasses.replace(settings, data_dir=None)
    launches = [Launch(ROLES[SERVER], SERVER, server_learning, server, threads_per_process(1))]
    share = config.build(PartitionSettings, config.values_of(settings))
    for index, worker in enumerate(worker_ids(settings.workers)):
        deployment = WorkerDeployment(**service, private_key=run.private_key(worker), worker_id=worker, index=index)
        launches.append(Launch(ROLES[WORKER], worker, share, deployment, threads_per_process(settings.workers)))
    return launches


SCENARIO = Scenario(
    "fedavg",
    "Federated averaging: a server and N workers that each hold only their share of the data "
    "(in one process with --broker memory, or every party its own process over RabbitMQ).",
    FederatedSettings, FedAvgRun, plan,
    queues=lambda settings, run: session_queues(run.session, settings.workers),
    label=lambda settings, run: f"fedavg ({settings.strategy}, {settings.workers} workers)",
)
