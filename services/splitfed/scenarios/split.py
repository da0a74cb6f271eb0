"""split: a client (data, labels, first layers) and a server (the rest), optionally through the
relay, over the in-memory transport or RabbitMQ."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from splitfed.config import setting
from splitfed.learning.settings import SplitNNSettings, SplitSettings
from splitfed.roles.deployment import Service, SplitRouting
from splitfed.roles.registry import ROLES
from splitfed.roles.split import SplitClientParty, SplitParty
from splitfed.roles.split.common import CLIENT, RELAY, SERVER, session_queues
from splitfed.scenarios.launch import Launch, RunSettings, Scenario, threads_per_process


@dataclass(kw_only=True)
class SplitRun(RunSettings, SplitRouting):
    save_model: Path | None = setting(None, "Write the trained model, both halves merged (safetensors).")


def compute_threads(settings: SplitSettings, co_running_clients: int = 1) -> tuple[int, int]:
    """Torch threads for each client process and for the server. A client and the server
    compute in turn, so the clients that compute at the same time share every core; the server
    gets cores in proportion to its share of the work, since idle OpenMP threads spin and a small
    server half with many threads only slows the clients (measured: a 2-thread server doubles its
    per-batch time on 2 cores)."""
    from splitfed.learning import cutting, models
    from splitfed.learning.context import context_of
    from splitfed.learning.settings import split_client_name
    from splitfed.learning.tasks import Task

    task = Task(dataclasses.replace(settings, device="cpu"))  # counted on the CPU: the same layers on any device
    context = context_of(settings, "split-client", split_client_name(0, getattr(settings, "clients", 1)))  # the first client's data: its shape
    parts = cutting.cut(task.sequential(context), settings.cut_layer, settings.mode)
    shape = task.data_shape(context).shape
    head = models.forward_flops(parts.head, shape)
    body = models.forward_flops(parts.body, models.output_shape(parts.head, shape))
    cores = threads_per_process(1)
    return threads_per_process(co_running_clients), max(1, round(cores * body / max(1, head + body)))


def part_file(workdir: Path, role: str) -> Path:
    return workdir / f"{role}.safetensors"


def plan(settings: SplitSettings, run: SplitRun, workdir: Path) -> list[Launch]:
    client_threads, server_threads = compute_threads(settings)
    service = {"session": run.session, "timeout": run.timeout, "key_list": run.key_list, "log_level": run.log_level}
    one_client = SplitNNSettings(**dataclasses.asdict(settings))  # what the roles take: a run of one client

    def half(role: str, threads: int) -> Launch:
        party = SplitClientParty if role == CLIENT else SplitParty
        deployment = party(**service, via=run.via, private_key=run.private_key(role), save=part_file(workdir, role) if run.save_model else None)
        return Launch(ROLES[role], role, one_client, deployment, threads)

    launches = [half(CLIENT, client_threads), half(SERVER, server_threads)]
    if run.via == "relay":
        launches.append(Launch(ROLES[RELAY], RELAY, None, Service(**service), 1))
    return launches


def merge_parts(settings: SplitSettings, run: SplitRun, workdir: Path, result: dict) -> None:
    """One model file from the halves' part files (disjoint layer indices)."""
    if not run.save_model:
        return
    from safetensors.torch import load_file, save_file

    merged = {}
    for role in (CLIENT, SERVER):
        merged.update(load_file(str(part_file(workdir, role))))  # our own files; safetensors runs no code
        part_file(workdir, role).unlink()
    save_file(merged, str(run.save_model))
    result["model_file"] = str(run.save_model.resolve())  # what `splitfed attack` reads the halves from


SCENARIO = Scenario(
    "split",
    "Split learning: client (data, labels, first layers) and server (the rest), in one process (--broker memory) "
    "or as separate relay / split-client / split-server processes over RabbitMQ.",
    SplitSettings, SplitRun, plan,
    queues=lambda settings, run: session_queues(run.session),
    label=lambda settings, run: f"split ({settings.mode}, {run.via}, {run.broker_scheme})",
    finish=merge_parts,
)
