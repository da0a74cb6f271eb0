"""Weighted averages of parameter sets, and the step from where a period began towards one, in
numpy only, so that the torch-free fed role, the split clients and the split server (for its
per-client halves) share one definition."""

from __future__ import annotations

import numpy as np

BATCHNORM_STATISTICS = ("running_mean", "running_var")  # buffers, not weights: averaged, never stepped


def weighted_average(states: list[dict[str, np.ndarray]], weights: list[float]) -> dict[str, np.ndarray]:
    """The weighted mean of `states` (same names and shapes), accumulated in float64 and returned
    in each tensor's own dtype. Integer tensors (BatchNorm's batch counters) are not averages of
    anything: they take the largest value."""
    if not states or len(states) != len(weights) or min(weights) < 0 or sum(weights) <= 0:
        raise ValueError("a weighted average needs as many non-negative weights as states, not all zero")
    total = float(sum(weights))
    averaged = {}
    for name, first in states[0].items():
        if np.issubdtype(first.dtype, np.integer):
            averaged[name] = np.asarray(np.max(np.stack([state[name] for state in states]), axis=0), dtype=first.dtype)
            continue
        accumulated = np.zeros(first.shape, dtype=np.float64)
        for state, weight in zip(states, weights):
            accumulated += (weight / total) * state[name]
        averaged[name] = accumulated.astype(first.dtype)
    return averaged


def step_towards(start: dict[str, np.ndarray], average: dict[str, np.ndarray], lr: float) -> dict[str, np.ndarray]:
    """start + lr * (average - start) for the trained weights (lr 1: the average itself; Reddi et
    al.'s server learning rate). BatchNorm's running statistics and counters take the average as
    it is: stepping past a variance could make it negative. They are told apart by torch's names
    for them, so no party has to say which of its tensors are weights."""
    if lr == 1.0:
        return average
    return {
        name: value if name.endswith(BATCHNORM_STATISTICS) or not np.issubdtype(value.dtype, np.floating)
        else (start[name] + lr * (value.astype(np.float64) - start[name])).astype(value.dtype)
        for name, value in average.items()
    }
