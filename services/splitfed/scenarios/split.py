"""split: the relay reference's split modes. Client (data, labels, first layers), server (the
rest) and optionally the relay, over the in-memory transport or RabbitMQ."""

from __future__ import annotations

import json
import time
from pathlib import Path

from safetensors.torch import load_file, save_file

from splitfed.roles.endpoint import queue_name
from splitfed.roles.relay import Relay
from splitfed.roles.split_client import SplitClient
from splitfed.roles.split_common import CLIENT, RELAY, SERVER, SplitSettings
from splitfed.roles.split_server import SplitServer
from splitfed.scenarios.launch import ProcessGroup, RoleThread, TransportFactory, delete_queues, identity, redact, resolve_launch, threads_per_process, transport_factory
from splitfed.scenarios.progress import Reporter
from splitfed.security.keys import KeyList
from splitfed.learning.train import EpochRecord

def run(
    settings: SplitSettings,
    broker: str = "memory",
    reporter: Reporter | None = None,
    save_model: Path | None = None,
    launch: str | None = None,
    transport_options: dict | None = None,
    key_list: Path | None = None,
) -> dict:
    """Run one split session. `launch`: "threads" (default for memory) or "processes"
    (default for amqp://, every role its own `splitfed serve` process). With `key_list`, the
    halves sign with PARTY.key from its folder and every receiver checks signatures."""
    launch = resolve_launch(broker, launch)
    connect = transport_factory(broker, transport_options or {})
    started = time.perf_counter()
    if launch == "processes":
        client_result = _run_processes(settings, broker, reporter, save_model, transport_options or {}, key_list)
        delete_queues(connect, [queue_name(settings.session, role) for role in (CLIENT, SERVER, RELAY)])
    else:
        client_result = run_threads(settings, connect, reporter, save_model, key_list)
    return {
        "scenario": "split",
        **client_result,
        "wall_seconds": time.perf_counter() - started,
        "config": {**settings.config(), "broker": redact(broker), "launch": launch, "authenticated": key_list is not None},
    }


def run_threads(
    settings: SplitSettings, connect: TransportFactory, reporter: Reporter | None = None, save_model: Path | None = None,
    key_list: Path | None = None,
) -> dict:
    """Every role in this process, each on its own transport connection; the client on this thread."""
    transports = {role: connect(role) for role in (SERVER, CLIENT, *((RELAY,) if settings.via == "relay" else ()))}
    parts_dir = Path(save_model).parent if save_model else None
    try:
        server = SplitServer(settings, transports[SERVER], save=parts_dir / f".{SERVER}.safetensors" if parts_dir else None, **identity(key_list, SERVER))
        helpers = [RoleThread(SERVER, server.run)]
        if settings.via == "relay":
            relay = Relay(settings.session, transports[RELAY], settings.timeout, KeyList.load(key_list) if key_list else None)
            helpers.append(RoleThread(RELAY, relay.run))
        for thread in helpers:
            thread.start()
        client = SplitClient(settings, transports[CLIENT], save=parts_dir / f".{CLIENT}.safetensors" if parts_dir else None, **identity(key_list, CLIENT))
        result = client.run(reporter.batch if reporter else None, reporter.epoch if reporter else None)
        for thread in helpers:
            thread.outcome(settings.timeout)
        for role in transports:
            transports[CLIENT].delete(queue_name(settings.session, role))
    finally:
        for transport in transports.values():
            transport.close()
    if save_model:
        merge_parts(save_model, [parts_dir / f".{role}.safetensors" for role in (CLIENT, SERVER)])
    return result


def merge_parts(save_model: Path, part_files: list[Path]) -> None:
    """One model file from the parties' part files (disjoint layer indices)."""
    merged = {}
    for path in part_files:
        merged.update(load_file(str(path)))  # safetensors: no code runs on load
        path.unlink()
    save_file(merged, str(save_model))


def compute_threads(settings: SplitSettings) -> tuple[int, int]:
    """Torch threads for the client and server processes. The halves compute in turn, so the
    client may use every core; the server gets cores in proportion to its share of the work,
    since idle OpenMP threads spin and a small server half with many threads only slows the
    client (measured: a 2-thread server doubles its per-batch time on 2 cores)."""
    from splitfed.learning import data, models, split as cutting

    meta = data.info(settings.dataset)
    parts = cutting.cut(models.build(settings.model, meta, settings.seed), settings.cut_layer, settings.mode)
    head = models.forward_flops(parts.head, meta.shape)
    body = models.forward_flops(parts.body, models.output_shape(parts.head, meta.shape))
    cores = threads_per_process(1)
    return cores, max(1, round(cores * body / max(1, head + body)))


def _run_processes(
    settings: SplitSettings, broker: str, reporter: Reporter | None, save_model: Path | None, transport_options: dict, key_list: Path | None,
) -> dict:
    group = ProcessGroup()
    common = {**settings.config(), "broker": broker, **transport_options, "key_list": key_list}
    keys = {role: key_list.parent / f"{role}.key" if key_list else None for role in (CLIENT, SERVER)}
    client_threads, server_threads = compute_threads(settings)
    parts = {role: group.workdir / f"{role}.safetensors" for role in (CLIENT, SERVER)}
    result_path = group.workdir / "client-result.json"
    try:
        if settings.via == "relay":
            group.start(RELAY, {"session": settings.session, "broker": broker, "timeout": settings.timeout, "key_list": key_list, **transport_options}, threads=1)
        group.start(SERVER, {**common, "private_key": keys[SERVER], "save": parts[SERVER] if save_model else None}, server_threads)
        client = group.start(CLIENT, {**common, "private_key": keys[CLIENT], "save": parts[CLIENT] if save_model else None, "out": result_path, "progress_events": True}, client_threads)

        def on_event(event: dict) -> None:
            if not reporter:
                return
            if event.get("event") == "batch":
                reporter.batch(event["done"], event["total"], event["loss"])
            elif event.get("event") == "epoch":
                reporter.epoch(EpochRecord(**event["record"]))

        group.follow(client, on_event)
        for member in group.members:
            group.wait(member, settings.timeout)
    finally:
        group.stop()
    if save_model:
        merge_parts(save_model, [parts[CLIENT], parts[SERVER]])
    return json.loads(result_path.read_text())
