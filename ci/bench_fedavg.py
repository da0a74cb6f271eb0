"""FedAvg benchmarks, ratios measured in one run.

    .venv/bin/python ci/bench_fedavg.py overhead [--limit 12000] [--rounds 3]
        Seconds per round: 3 workers as separate processes over RabbitMQ against the plain
        single-process loop doing the same training and averaging (learning.federated).
        Goal: ratio <= 1.05.
    .venv/bin/python ci/bench_fedavg.py scale [--workers 25 50 100 200]
        The tiny model on digits; workers share a few processes, each worker with its own
        connection, key and signed updates; one server. Goal: >= 100 workers with rounds < 10 s.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from splitfed.learning import federated
from splitfed.learning.settings import FederatedSettings, PartitionSettings
from splitfed.roles.declaration import Identity
from splitfed.roles.fedavg import ServerDeployment, WorkerDeployment, worker_ids
from splitfed.roles.fedavg.server import FedAvgServer
from splitfed.roles.fedavg.worker import FedAvgWorker
from splitfed.scenarios import fedavg, launch
from splitfed.scenarios.fedavg import FedAvgRun
from splitfed.scenarios.launch import RoleThread, new_session
from splitfed.security import keys
from splitfed.transport.rabbitmq import RabbitTransport

BROKER = "amqp://guest:guest@127.0.0.1:5672/"


def overhead(args) -> None:
    """Plain loop and distributed run alternate `--repeat` times; each pair gives one ratio."""
    settings = FederatedSettings(dataset=args.dataset, limit=args.limit, test_limit=args.test_limit, rounds=args.rounds, partition="iid")
    table = Table(title=f"FedAvg, 3 workers, {args.dataset} ({args.limit} samples), mean s/round over rounds 2..{args.rounds}")
    for column in ("pair", "plain loop, 1 process", "RabbitMQ, 4 processes", "ratio", "accuracy plain / RabbitMQ"):
        table.add_column(column, justify="right")
    ratios = []
    for pair in range(1, args.repeat + 1):
        _, plain = federated.reference_run(settings)
        distributed = launch.run(fedavg.SCENARIO, settings, FedAvgRun(broker=args.broker))
        # Round 1 includes the workers' start-up; compare the rounds after it.
        plain_seconds = statistics.mean(r.seconds for r in plain[1:])
        broker_seconds = statistics.mean(r["seconds"] for r in distributed["history"][1:])
        ratios.append(broker_seconds / plain_seconds)
        table.add_row(str(pair), f"{plain_seconds:.2f}", f"{broker_seconds:.2f}", f"{ratios[-1]:.3f}x", f"{plain[-1].accuracy:.4f} / {distributed['accuracy']:.4f}")
    table.add_row("median", "", "", f"{statistics.median(ratios):.3f}x", "")
    Console().print(table)


def scale(args) -> None:
    table = Table(title="FedAvg scale: tiny model on digits, one server, signed updates")
    for column in ("workers", "processes", "mean s/round", "max s/round", "final accuracy"):
        table.add_column(column, justify="right")
    for count in args.workers:
        mean, worst, accuracy = scale_run(count, args.per_process, args.rounds)
        table.add_row(str(count), str(-(-count // args.per_process)), f"{mean:.2f}", f"{worst:.2f}", f"{accuracy:.4f}")
        Console().print(table)
        if worst > 10:
            break


def scale_run(count: int, per_process: int, rounds: int) -> tuple[float, float, float]:
    directory = Path(tempfile.mkdtemp(prefix="splitfed-scale-"))
    key_list = keys.generate(directory, ["fedavg-server", *worker_ids(count)])
    session = new_session()
    settings = FederatedSettings(dataset="digits", model="tiny", batch_size=16, rounds=rounds, workers=count, partition="iid", lr=0.05)
    server_transport = RabbitTransport(BROKER, name="scale-server", prefetch=2 * count + 16)
    identity = Identity.load("fedavg-server", key_list, directory / "fedavg-server.key")
    server = FedAvgServer(settings, ServerDeployment(session=session, timeout=300), server_transport, identity)
    helpers = [
        subprocess.Popen([sys.executable, __file__, "workers", "--session", session, "--first", str(first), "--count", str(min(per_process, count - first)),
                          "--total", str(count), "--rounds", str(rounds), "--key-list", str(key_list)])
        for first in range(0, count, per_process)
    ]
    try:
        result = server.run()
    finally:
        server_transport.close()
        for helper in helpers:
            helper.wait(120)
    seconds = [r["seconds"] for r in result["history"][1:]]  # round 1 waits for the helpers to start
    return statistics.mean(seconds), max(seconds), result["accuracy"]


def workers(args) -> None:
    """A helper process hosting `count` workers, each on its own thread and connection."""
    torch.set_num_threads(1)
    settings = PartitionSettings(dataset="digits", model="tiny", batch_size=16, workers=args.total, partition="iid", lr=0.05)
    threads = []
    for index in range(args.first, args.first + args.count):
        name = f"worker-{index}"
        transport = RabbitTransport(BROKER, name=name)
        identity = Identity.load(name, args.key_list, args.key_list.parent / f"{name}.key")
        role = FedAvgWorker(settings, WorkerDeployment(session=args.session, timeout=300, worker_id=name, index=index), transport, identity)
        threads.append((transport, RoleThread(name, role.run)))
    for _, thread in threads:
        thread.start()
    for transport, thread in threads:
        thread.outcome(600)
        transport.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    over = commands.add_parser("overhead")
    over.add_argument("--dataset", default="fashion-mnist")
    over.add_argument("--limit", type=int, default=12000)
    over.add_argument("--test-limit", type=int, default=2000)
    over.add_argument("--rounds", type=int, default=4)
    over.add_argument("--broker", default=BROKER)
    over.add_argument("--repeat", type=int, default=3)
    many = commands.add_parser("scale")
    many.add_argument("--workers", type=int, nargs="+", default=[25, 50, 100, 200])
    many.add_argument("--per-process", type=int, default=25)
    many.add_argument("--rounds", type=int, default=4)
    helper = commands.add_parser("workers")
    helper.add_argument("--session", required=True)
    helper.add_argument("--first", type=int, required=True)
    helper.add_argument("--count", type=int, required=True)
    helper.add_argument("--total", type=int, required=True)
    helper.add_argument("--rounds", type=int, required=True)
    helper.add_argument("--key-list", type=Path, required=True)
    args = parser.parse_args()
    {"overhead": overhead, "scale": scale, "workers": workers}[args.command](args)


if __name__ == "__main__":
    main()
