"""What the split benchmarks share: run every mode in turn, `repeat` times, and report medians.
Each ratio is the median of the ratios within one repetition (each mode against the baseline run
just before it), so load that comes and goes on a shared machine skews it less."""

from __future__ import annotations

import statistics
from collections.abc import Callable


def medians(runs: dict[str, Callable[[], dict]], repeat: int, baseline: str) -> dict[str, dict]:
    """`runs`: mode -> a run returning its figures, `seconds` among them (a figure may be None).
    Per mode: the median of each figure, `ratio` to `baseline`, and `ratios`, one per repetition."""
    samples: dict[str, list[dict]] = {name: [] for name in runs}
    for _ in range(max(1, repeat)):
        for name, run in runs.items():
            samples[name].append(run())
        for name in runs:
            samples[name][-1]["ratio"] = samples[name][-1]["seconds"] / samples[baseline][-1]["seconds"]
    return {
        name: {key: _median([sample[key] for sample in of_mode]) for key in of_mode[0]} | {"ratios": [sample["ratio"] for sample in of_mode]}
        for name, of_mode in samples.items()
    }


def _median(values: list):
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else None
