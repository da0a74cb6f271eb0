"""Aggregation rules for federated rounds: pure functions of the workers' models.

Each update is a flat float32 vector (all parameters of one worker's model, `flatten`),
with a weight (its number of training samples). Robust rules ignore the weights: weighting by a
number the worker itself reports would hand a poisoning worker the lever it needs.
"""

from __future__ import annotations

import torch

STRATEGIES = ("fedavg", "fedprox", "median", "trimmed-mean", "krum")


def flatten(state: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    return torch.cat([state[name].reshape(-1).to(torch.float32) for name in names])


def unflatten(vector: torch.Tensor, like: dict[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    out, offset = {}, 0
    for name in names:
        size = like[name].numel()
        out[name] = vector[offset : offset + size].reshape(like[name].shape).clone()
        offset += size
    return out


def weighted_mean(updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """FedAvg (and FedProx's server side): sum_k n_k w_k / sum_k n_k. updates: (K, P), weights: (K,)."""
    weights = weights.to(torch.float64)
    return ((updates.to(torch.float64) * (weights / weights.sum())[:, None]).sum(0)).to(torch.float32)


def coordinate_median(updates: torch.Tensor) -> torch.Tensor:
    """Coordinate-wise median (the mean of the two middle values for an even count)."""
    return updates.quantile(0.5, dim=0) if updates.shape[0] % 2 == 0 else updates.median(dim=0).values


def trimmed_mean(updates: torch.Tensor, trim: float) -> torch.Tensor:
    """Coordinate-wise mean after dropping the `trim` fraction of largest and of smallest values."""
    k = int(trim * updates.shape[0])
    if 2 * k >= updates.shape[0]:
        raise ValueError(f"trim {trim} leaves no updates out of {updates.shape[0]}")
    ordered = updates.sort(dim=0).values
    return ordered[k : updates.shape[0] - k].mean(0)


def krum(updates: torch.Tensor, byzantine: int) -> torch.Tensor:
    """Krum (Blanchard et al. 2017): the update whose n - f - 2 nearest neighbours are closest."""
    n = updates.shape[0]
    neighbours = max(1, n - byzantine - 2)
    distances = torch.cdist(updates.to(torch.float64), updates.to(torch.float64)).pow(2)  # (K, K)
    scores = distances.sort(dim=1).values[:, 1 : neighbours + 1].sum(1)  # skip the distance to itself
    return updates[int(scores.argmin())].clone()


def aggregate(strategy: str, updates: torch.Tensor, weights: torch.Tensor, *, trim: float = 0.2, byzantine: int = 1) -> torch.Tensor:
    """Combine K updates (K, P) into one (P,) by `strategy`."""
    if updates.ndim != 2 or updates.shape[0] == 0:
        raise ValueError("aggregate needs at least one update")
    if strategy in ("fedavg", "fedprox"):
        return weighted_mean(updates, weights)
    if strategy == "median":
        return coordinate_median(updates)
    if strategy == "trimmed-mean":
        return trimmed_mean(updates, trim)
    if strategy == "krum":
        return krum(updates, byzantine)
    raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
