"""Benchmark: seconds per epoch of centralized, split in memory, split over RabbitMQ direct and
split over RabbitMQ via the relay, on the same data subset, in one run; ratios to centralized.

    .venv/bin/python ci/bench_split.py [--limit 10000] [--dataset fashion-mnist] [--broker URL] [--repeat N]

Goals: direct <= 1.15x, relay <= 1.25x centralized at the default cut layer.
Each run trains 2 epochs and the table shows the second (training plus evaluation), as
ci/bench_splitnn.py does: the roles start as fresh processes, whose first epoch also pays for
torch's first calls (oneDNN primitives, the allocator's first blocks), while centralized runs in
this process, warm from the runs before it. `rt p50` is the
client's median round trip (send a batch's activations, hold the answer). On a shared machine,
`--repeat N` runs the modes N times in turn and reports medians (ci/bench_repeat.py).
"""

from __future__ import annotations

import argparse
import json

from rich.console import Console
from rich.table import Table

from splitfed.learning.settings import SplitSettings, TrainSettings
from splitfed.scenarios import centralized, launch, split
from splitfed.scenarios.split import SplitRun

from bench_repeat import medians  # ci/, beside this script


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--limit", type=int, default=10000)
    parser.add_argument("--test-limit", type=int, default=2000)
    parser.add_argument("--broker", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--repeat", type=int, default=1, help="run every mode this many times, in turn; report medians")
    parser.add_argument("--out", help="also write the table as JSON")
    args = parser.parse_args()

    common = dict(dataset=args.dataset, limit=args.limit, test_limit=args.test_limit, epochs=2)
    runs = {
        "centralized": lambda: figures(launch.run(centralized.SCENARIO, TrainSettings(**common), centralized.CentralizedRun())),
        "split, memory": lambda: figures(launch.run(split.SCENARIO, SplitSettings(**common), SplitRun(via="direct"))),
        "split, RabbitMQ direct": lambda: figures(launch.run(split.SCENARIO, SplitSettings(**common), SplitRun(broker=args.broker, via="direct"))),
        "split, RabbitMQ relay": lambda: figures(launch.run(split.SCENARIO, SplitSettings(**common), SplitRun(broker=args.broker, via="relay"))),
    }
    rows = medians(runs, args.repeat, "centralized")
    repeated = f", median of {args.repeat}" if args.repeat > 1 else ""
    table = Table(title=f"split learning, {args.dataset}, {args.limit} samples, the second epoch{repeated}")
    for column in ("mode", "s/epoch", "ratio", "rt p50 ms", "accuracy", "messages", "MB"):
        table.add_column(column, justify="right")
    for name, row in rows.items():
        p50 = "" if row["round_trip_p50_ms"] is None else f"{row['round_trip_p50_ms']:.2f}"
        table.add_row(name, f"{row['seconds']:.2f}", f"{row['ratio']:.2f}x", p50, f"{row['accuracy']:.4f}", f"{row['messages']:.0f}", f"{row['bytes'] / 1e6:.0f}")
    Console(width=160).print(table)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(rows, handle, indent=2)


def figures(result: dict) -> dict:
    timing = result.get("timing") or {}
    traffic = result.get("traffic", {})
    return {
        "seconds": result["history"][-1]["seconds"], "accuracy": result["accuracy"], "messages": traffic.get("messages", 0),
        "bytes": traffic.get("bytes", 0), "round_trip_p50_ms": timing.get("round_trip_p50_ms"),
    }


if __name__ == "__main__":
    main()
