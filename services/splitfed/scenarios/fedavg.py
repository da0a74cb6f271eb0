"""fedavg: one fedavg-server and N fedavg-workers, in threads (memory or RabbitMQ) or as
`splitfed serve` processes over RabbitMQ, as in the dc_federated MNIST example."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from splitfed.learning.train import EpochRecord
from splitfed.roles.fedavg_common import SERVER, FedAvgSettings, server_queue, worker_queue
from splitfed.roles.fedavg_server import FedAvgServer
from splitfed.roles.fedavg_worker import FedAvgWorker
from splitfed.scenarios.launch import ProcessGroup, RoleThread, TransportFactory, delete_queues, identity, redact, resolve_launch, threads_per_process, transport_factory
from splitfed.scenarios.progress import Reporter


def worker_ids(count: int) -> list[str]:
    return [f"worker-{index}" for index in range(count)]


def session_queues(settings: FedAvgSettings) -> list[str]:
    return [server_queue(settings.session), *(worker_queue(settings.session, worker) for worker in worker_ids(settings.workers))]


def run(
    settings: FedAvgSettings,
    broker: str = "memory",
    reporter: Reporter | None = None,
    launch: str | None = None,
    key_list: Path | None = None,
    checkpoint_dir: Path | None = None,
    transport_options: dict | None = None,
) -> dict:
    """With `key_list`, every party signs with PARTY.key from the key list's folder (as
    `splitfed keys generate` writes them) and the server accepts only listed workers."""
    launch = resolve_launch(broker, launch)
    connect = transport_factory(broker, transport_options or {})
    on_round = (lambda record: reporter.round(record, settings.rounds)) if reporter else None
    started = time.perf_counter()
    if launch == "processes":
        result = _run_processes(settings, broker, on_round, key_list, checkpoint_dir, transport_options or {})
        delete_queues(connect, session_queues(settings))
    else:
        result = run_threads(settings, connect, on_round, key_list, checkpoint_dir)
    return {
        "scenario": "fedavg", **result, "wall_seconds": time.perf_counter() - started,
        "config": {**settings.config(), "broker": redact(broker), "launch": launch, "authenticated": key_list is not None},
    }


def run_threads(
    settings: FedAvgSettings, connect: TransportFactory, on_round: Callable[[EpochRecord], None] | None = None,
    key_list: Path | None = None, checkpoint_dir: Path | None = None,
) -> dict:
    """The server on this thread, each worker on its own thread and connection."""
    transports = {SERVER: connect(SERVER)}
    try:
        server = FedAvgServer(settings, transports[SERVER], checkpoint_dir=checkpoint_dir, on_round=on_round, **identity(key_list, SERVER))
        threads = []
        for index, worker in enumerate(worker_ids(settings.workers)):
            transports[worker] = connect(worker)
            role = FedAvgWorker(settings, transports[worker], worker, index, **identity(key_list, worker))
            threads.append(RoleThread(worker, role.run))
        for thread in threads:
            thread.start()
        result = server.run()
        for thread in threads:
            thread.outcome(settings.timeout)
        for queue in session_queues(settings):
            transports[SERVER].delete(queue)
    finally:
        for transport in transports.values():
            transport.close()
    return result


def server_options(settings: FedAvgSettings, broker: str, key_list: Path | None, checkpoint_dir: Path | None, transport_options: dict) -> dict:
    options = {**settings.config(), "broker": broker, **transport_options, "checkpoint_dir": checkpoint_dir}
    if key_list:
        options.update(key_list=key_list, private_key=key_list.parent / f"{SERVER}.key")
    return options


def worker_options(settings: FedAvgSettings, broker: str, key_list: Path | None, index: int, transport_options: dict) -> dict:
    worker = worker_ids(settings.workers)[index]
    options = {**settings.config(), "broker": broker, **transport_options, "worker_id": worker, "index": index}
    if key_list:
        options.update(key_list=key_list, private_key=key_list.parent / f"{worker}.key")
    return options


def _run_processes(
    settings: FedAvgSettings, broker: str, on_round: Callable[[EpochRecord], None] | None, key_list: Path | None,
    checkpoint_dir: Path | None, transport_options: dict,
) -> dict:
    group = ProcessGroup()
    result_path = group.workdir / "server-result.json"
    try:
        # Workers train at the same time: share the cores. The server works while they wait.
        server = group.start(SERVER, {**server_options(settings, broker, key_list, checkpoint_dir, transport_options), "out": result_path, "progress_events": True}, threads_per_process(1))
        for index in range(settings.workers):
            group.start("fedavg-worker", worker_options(settings, broker, key_list, index, transport_options), threads_per_process(settings.workers), name=f"worker-{index}")

        def on_event(event: dict) -> None:
            if on_round and event.get("event") == "round":
                on_round(EpochRecord(**event["record"]))

        group.follow(server, on_event)
        for member in group.members:
            group.wait(member, settings.timeout)
    finally:
        group.stop()
    return json.loads(result_path.read_text())
