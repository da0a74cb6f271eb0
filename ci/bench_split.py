"""Benchmark: seconds per epoch of centralized, split in memory, split over RabbitMQ direct and
split over RabbitMQ via the relay, on the same data subset, in one run; ratios to centralized.

    .venv/bin/python ci/bench_split.py [--limit 10000] [--dataset fashion-mnist] [--broker URL]

Goals: direct <= 1.3x, relay <= 1.5x centralized at the default cut layer.
Timings are of the epoch (training plus evaluation), not of process start-up.
"""

from __future__ import annotations

import argparse
import json

from rich.console import Console
from rich.table import Table

from splitfed.learning.settings import SplitSettings, TrainSettings
from splitfed.scenarios import centralized, launch, split
from splitfed.scenarios.split import SplitRun


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--limit", type=int, default=10000)
    parser.add_argument("--test-limit", type=int, default=2000)
    parser.add_argument("--broker", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--out", help="also write the table as JSON")
    args = parser.parse_args()

    common = dict(dataset=args.dataset, limit=args.limit, test_limit=args.test_limit, epochs=1)
    runs = {
        "centralized": lambda: launch.run(centralized.SCENARIO, TrainSettings(**common), centralized.CentralizedRun()),
        "split, memory": lambda: launch.run(split.SCENARIO, SplitSettings(**common), SplitRun(via="direct")),
        "split, RabbitMQ direct": lambda: launch.run(split.SCENARIO, SplitSettings(**common), SplitRun(broker=args.broker, via="direct")),
        "split, RabbitMQ relay": lambda: launch.run(split.SCENARIO, SplitSettings(**common), SplitRun(broker=args.broker, via="relay")),
    }
    rows = {}
    for name, run in runs.items():
        result = run()
        rows[name] = {"seconds": result["history"][0]["seconds"], "accuracy": result["accuracy"], "messages": result["traffic"]["messages"], "bytes": result["traffic"]["bytes"]}
    base = rows["centralized"]["seconds"]
    table = Table(title=f"split learning, {args.dataset}, {args.limit} samples, 1 epoch")
    for column in ("mode", "s/epoch", "ratio", "accuracy", "messages", "MB"):
        table.add_column(column, justify="right")
    for name, row in rows.items():
        row["ratio"] = row["seconds"] / base
        table.add_row(name, f"{row['seconds']:.2f}", f"{row['ratio']:.2f}x", f"{row['accuracy']:.4f}", str(row["messages"]), f"{row['bytes'] / 1e6:.0f}")
    Console().print(table)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
