"""Benchmark: seconds per epoch of split learning with several clients, for each schedule, over
the in-memory transport and over RabbitMQ, beside centralized training on the same data, with
each one's ratio to centralized, measured in one run.

    .venv/bin/python ci/bench_splitnn.py [--clients 5] [--limit 10000] [--broker URL] [--out FILE]
                                         [--syncs-per-epoch S --fed-lr LR] [--repeat N]
                                         [--schedules S,...] [--transports memory,RabbitMQ]

--syncs-per-epoch and --fed-lr apply to splitfed-v1 and v2 (round-robin hands its layers on).

Each run trains 2 epochs and the table shows the second: from the first epoch's close to the
second's evaluation on the test set (as centralized's epoch is timed), so process start-up and
the clients' first hellos are not counted. On a shared machine, `--repeat N` runs every mode N
times in turn and reports medians (ci/bench_repeat.py); the `ratios` column lists each
repetition's. Goal: splitfed-v2 over RabbitMQ with 5 parallel clients
no slower than round-robin over RabbitMQ, both <= 1.3x centralized.
"""

from __future__ import annotations

import argparse
import json

from rich.console import Console
from rich.table import Table

from splitfed.learning.settings import SCHEDULES, SplitNNSettings, TrainSettings
from splitfed.scenarios import centralized, launch, splitnn

from bench_repeat import medians  # ci/, beside this script


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--limit", type=int, default=10000)
    parser.add_argument("--test-limit", type=int, default=2000)
    parser.add_argument("--broker", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--schedules", default=",".join(SCHEDULES), help="comma-separated")
    parser.add_argument("--transports", default="memory,RabbitMQ", help="comma-separated: memory, RabbitMQ or both")
    parser.add_argument("--syncs-per-epoch", type=int, default=1, help="splitfed-v1 and v2: averagings per epoch")
    parser.add_argument("--fed-lr", type=float, default=1.0, help="splitfed-v1 and v2: the step of each averaging")
    parser.add_argument("--repeat", type=int, default=1, help="run every mode this many times, in turn; report medians")
    parser.add_argument("--out", help="also write the table as JSON")
    args = parser.parse_args()

    common = dict(dataset=args.dataset, limit=args.limit, test_limit=args.test_limit, epochs=2)
    runs = {"centralized": lambda: figures(launch.run(centralized.SCENARIO, TrainSettings(**common), centralized.CentralizedRun()))}
    for schedule in args.schedules.split(","):
        periods = {} if schedule == "round-robin" else {"syncs_per_epoch": args.syncs_per_epoch, "fed_lr": args.fed_lr}
        settings = SplitNNSettings(**common, clients=args.clients, schedule=schedule, **periods)
        brokers = {"memory": "memory", "RabbitMQ": args.broker}
        for transport in args.transports.split(","):
            runs[f"{schedule}, {transport}"] = lambda settings=settings, broker=brokers[transport]: figures(launch.run(splitnn.SCENARIO, settings, splitnn.SplitNNRun(broker=broker)))
    rows = medians(runs, args.repeat, "centralized")
    periods = f", v1/v2 averaging {args.syncs_per_epoch}x an epoch with fed lr {args.fed_lr}" if args.syncs_per_epoch > 1 or args.fed_lr != 1 else ""
    repeated = f", median of {args.repeat}" if args.repeat > 1 else ""
    table = Table(title=f"split learning, {args.clients} clients, {args.dataset}, {args.limit} samples, the second epoch{periods}{repeated}")
    for column in ("run", "s/epoch", "ratio", "ratios", "accuracy", "server messages"):
        table.add_column(column, justify="right")
    for name, row in rows.items():
        table.add_row(name, f"{row['seconds']:.2f}", f"{row['ratio']:.2f}x", " ".join(f"{ratio:.2f}" for ratio in row["ratios"]), f"{row['accuracy']:.4f}", f"{row['messages']:.0f}")
    Console(width=160).print(table)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(rows, handle, indent=2)


def figures(result: dict) -> dict:
    return {"seconds": result["history"][-1]["seconds"], "accuracy": result["accuracy"], "messages": result["traffic"]["messages"]}


if __name__ == "__main__":
    main()
