"""Benchmark: decentralized p2p training over RabbitMQ, two figures measured in one run.

    .venv/bin/python ci/bench_p2p.py [--scale 16,32,64] [--limit 12000] [--broker URL] [--out FILE]

1. Scale: how many peers one tracker and one broker sustain on this machine with epochs still
   progressing (tiny model, digits; every peer a thread of this process with its own RabbitMQ
   connection, as bench_fedavg hosts its workers). For each count: wall time, epochs completed per
   second over all peers, peers evicted (0 means every heartbeat arrived in time), peers that
   finished. Goal: >= 64 peers, none evicted.
2. Overhead: a 4-peer p2p run over RabbitMQ, every party its own process, against the same training
   in one process with in-memory averaging (learning.peers.in_memory_run: each epoch every peer
   trains, then all average). Both are timed from the first epoch's start to the last epoch's end
   (process start-up and data loading are reported apart), so the ratio is what the messaging
   costs. Goal: <= 1.15x.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from rich.console import Console
from rich.table import Table

from splitfed.learning.peers import in_memory_run
from splitfed.learning.settings import P2PSettings
from splitfed.scenarios import launch
from splitfed.scenarios.p2p import P2P, PeerRun


def scale(count: int, broker: str, epochs: int) -> dict:
    settings = P2PSettings(dataset="digits", model="tiny", peers=count, epochs=epochs, batch_size=32, lr=1e-2)
    started = time.perf_counter()
    result = launch.run(P2P, settings, PeerRun(broker=broker, launch="threads", log_level="warning", timeout=600))
    wall = time.perf_counter() - started
    epochs_done = sum(len(peer["history"]) for peer in result["peers"].values())
    return {"peers": count, "wall_seconds": wall, "epochs_per_second": epochs_done / wall, "evicted": len(result["evicted"]),
            "finished": sum(peer["state"] == "left" for peer in result["peers"].values()), "accuracy": result["accuracy"]}


def training_span(result: dict) -> float:
    """From the earliest epoch start to the latest epoch end over the peers (each epoch record's
    seconds run from its start to its report; peers start within moments of each other)."""
    return max(sum(record["seconds"] for record in peer["history"]) for peer in result["peers"].values())


def overhead(broker: str, limit: int, test_limit: int, epochs: int) -> dict:
    settings = P2PSettings(dataset="fashion-mnist", limit=limit, test_limit=test_limit, peers=4, epochs=epochs)
    started = time.perf_counter()
    local = in_memory_run(settings)
    local_wall = time.perf_counter() - started
    started = time.perf_counter()
    distributed = launch.run(P2P, settings, PeerRun(broker=broker, log_level="warning"))
    distributed_wall = time.perf_counter() - started
    local_span, distributed_span = local["history"][-1]["seconds"], training_span(distributed)
    return {"in-memory": {"training_seconds": local_span, "wall_seconds": local_wall, "accuracy": local["accuracy"]},
            "RabbitMQ": {"training_seconds": distributed_span, "wall_seconds": distributed_wall, "accuracy": distributed["accuracy"],
                         "spread": distributed["spread"]},
            "ratio": distributed_span / local_span}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--broker", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--scale", default="16,32,64", help="comma-separated peer counts")
    parser.add_argument("--scale-epochs", type=int, default=3)
    parser.add_argument("--limit", type=int, default=12000)
    parser.add_argument("--test-limit", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", help="also write the figures as JSON")
    args = parser.parse_args()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the scale test's peers share this process: one thread each

    console = Console()
    rows = [scale(int(count), args.broker, args.scale_epochs) for count in args.scale.split(",") if count]
    table = Table(title=f"p2p scale: peers as threads of one process, one RabbitMQ connection each, tiny model on digits, {args.scale_epochs} epochs")
    for column in ("peers", "wall s", "epochs/s", "evicted", "finished", "accuracy"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(str(row["peers"]), f"{row['wall_seconds']:.1f}", f"{row['epochs_per_second']:.2f}", str(row["evicted"]),
                      f"{row['finished']}/{row['peers']}", f"{row['accuracy']:.4f}")
    console.print(table)

    torch.set_num_threads(threads)
    measured = overhead(args.broker, args.limit, args.test_limit, args.epochs)
    table = Table(title=f"4 peers, fashion-mnist, {args.limit} samples, {args.epochs} epochs: training time (first epoch's start to last epoch's end)")
    for column in ("run", "training s", "wall s (with start-up)", "accuracy", "ratio"):
        table.add_column(column, justify="right")
    for name in ("in-memory", "RabbitMQ"):
        row = measured[name]
        table.add_row(name, f"{row['training_seconds']:.1f}", f"{row['wall_seconds']:.1f}", f"{row['accuracy']:.4f}",
                      "1.00x" if name == "in-memory" else f"{measured['ratio']:.2f}x")
    console.print(table)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"scale": rows, "overhead": measured}, handle, indent=2)


if __name__ == "__main__":
    main()
