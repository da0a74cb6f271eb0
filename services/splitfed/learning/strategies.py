"""Aggregation strategies for federated rounds: pure math on the workers' models, no I/O.

Each update is a flat float32 vector (all parameters of one worker's model, `flatten`), with a
weight (its number of training samples). A strategy turns the round's updates into the next
global model; the server role and the plain reference loop call the same objects. Robust rules
ignore the weights: weighting by a number the worker itself reports would hand a poisoning
worker the lever it needs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from splitfed.learning.settings import STRATEGIES, FederatedSettings


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
    """sum_k n_k w_k / sum_k n_k. updates: (K, P), weights: (K,)."""
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


@dataclass(frozen=True)
class Strategy:
    """One aggregation rule with its own parameters (dataclass fields named as the settings that
    set them). `local_prox_mu` is the proximal weight workers add to their local loss."""

    name: ClassVar[str]
    local_prox_mu: ClassVar[float] = 0.0

    def aggregate(self, updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """K updates (K, P) with weights (K,) -> the next global model (P,)."""
        raise NotImplementedError

    def __call__(self, updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if updates.ndim != 2 or updates.shape[0] == 0 or weights.shape != updates.shape[:1]:
            raise ValueError(f"aggregation needs K >= 1 updates (K, P) and K weights, got {tuple(updates.shape)} and {tuple(weights.shape)}")
        return self.aggregate(updates, weights)


@dataclass(frozen=True)
class FedAvg(Strategy):
    name = "fedavg"

    def aggregate(self, updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return weighted_mean(updates, weights)


@dataclass(frozen=True)
class FedProx(FedAvg):
    """FedAvg's server side; the workers keep near the global model with mu/2 ||w - w_global||^2."""

    name = "fedprox"
    prox_mu: float = 0.01

    @property
    def local_prox_mu(self) -> float:  # type: ignore[override]
        return self.prox_mu


@dataclass(frozen=True)
class Median(Strategy):
    name = "median"

    def aggregate(self, updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return coordinate_median(updates)


@dataclass(frozen=True)
class TrimmedMean(Strategy):
    name = "trimmed-mean"
    trim: float = 0.2

    def aggregate(self, updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return trimmed_mean(updates, self.trim)


@dataclass(frozen=True)
class Krum(Strategy):
    name = "krum"
    byzantine: int = 1

    def aggregate(self, updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return krum(updates, self.byzantine)


REGISTRY: dict[str, type[Strategy]] = {cls.name: cls for cls in (FedAvg, FedProx, Median, TrimmedMean, Krum)}
assert tuple(REGISTRY) == STRATEGIES, "learning.settings.STRATEGIES must list every strategy"


def from_settings(settings: FederatedSettings) -> Strategy:
    """The strategy `settings.strategy` names, with its parameters taken from the settings."""
    if settings.strategy not in REGISTRY:
        raise ValueError(f"unknown strategy {settings.strategy!r}; choose one of {', '.join(REGISTRY)}")
    cls = REGISTRY[settings.strategy]
    return cls(**{field.name: getattr(settings, field.name) for field in dataclasses.fields(cls)})
