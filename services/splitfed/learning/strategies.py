"""Aggregation strategies for federated rounds: pure math on the workers' models, no I/O.

Each update is a flat float32 vector (all parameters of one worker's model, `flatten`), with a
weight (its number of training samples). A strategy turns the current global model and the
round's updates into the next global model (`step`); the server role and the plain reference
loop call the same objects. Robust rules ignore the weights: weighting by a number the worker
itself reports would hand a poisoning worker the lever it needs.

Server optimisers (Reddi et al. 2021, "Adaptive Federated Optimization") treat the difference
between the combined update and the global model as a pseudo-gradient and apply momentum, Adam,
Yogi or Adagrad to it on the server; they keep state (`state()` / `load_state()`) that the
server checkpoints with the model. SCAFFOLD (Karimireddy et al. 2020) adds control variates
that correct each worker's local gradients for client drift.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
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
    set them). What workers do differently is said by `local_prox_mu` (the proximal weight of
    their local loss), `local_absent_scale` (how much the logits of classes a worker does not hold
    count, 1: as any other) and `control_variates` (SCAFFOLD's drift correction)."""

    name: ClassVar[str]
    local_prox_mu: ClassVar[float] = 0.0
    local_absent_scale: ClassVar[float] = 1.0
    local_frozen_head: ClassVar[bool] = False  # workers leave the model's last layer as it is
    local_calibration_tau: ClassVar[float] = 0.0  # > 0: workers calibrate their logits by their label counts (FedLC)
    control_variates: ClassVar[bool] = False

    def aggregate(self, updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """K updates (K, P) with weights (K,) -> their combination (P,)."""
        raise NotImplementedError

    def __call__(self, updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if updates.ndim != 2 or updates.shape[0] == 0 or weights.shape != updates.shape[:1]:
            raise ValueError(f"aggregation needs K >= 1 updates (K, P) and K weights, got {tuple(updates.shape)} and {tuple(weights.shape)}")
        return self.aggregate(updates, weights)

    def step(self, current: torch.Tensor, updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The next global model (P,) from the current one (P,) and the round's updates (K, P)."""
        return self(updates, weights)

    def state(self) -> dict[str, torch.Tensor]:
        """Server-side state that must survive a restart (momentum, moments, control variates)."""
        return {}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"{self.name} keeps no state, but a checkpoint holds {sorted(state)}")


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


@dataclass(frozen=True)
class FedRS(FedAvg):
    """FedRS (Li and Zhan, KDD 2021, "Federated Learning with Restricted Softmax for Label
    Distribution Non-IID Data"): workers scale the logits of classes they hold no sample of by
    `rs_alpha` < 1, so local training stops pushing those classes' weights away from the data
    it has never seen them with; the server averages as FedAvg."""

    name = "fedrs"
    rs_alpha: float = 0.5

    @property
    def local_absent_scale(self) -> float:  # type: ignore[override]
        return self.rs_alpha


@dataclass(frozen=True)
class FedBABU(FedAvg):
    """FedBABU (Oh, Kim and Yun, ICLR 2022, "FedBABU: Toward Enhanced Representation for Federated
    Image Classification"): the classifier head keeps its random initialisation and workers train
    only the body, so no worker can tilt the shared head towards its own classes; the server
    averages as FedAvg."""

    name = "fedbabu"
    local_frozen_head = True


RULES: dict[str, type[Strategy]] = {"mean": FedAvg, "median": Median, "trimmed-mean": TrimmedMean, "krum": Krum}


@dataclass(frozen=True)
class StatefulStrategy(Strategy):
    """A strategy with server-side tensors (float64) that the server checkpoints with the model."""

    buffers: dict[str, torch.Tensor] = field(default_factory=dict, init=False, compare=False, repr=False)

    def state(self) -> dict[str, torch.Tensor]:
        return dict(self.buffers)

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.buffers.clear()
        self.buffers.update({name: value.to(torch.float64) for name, value in state.items()})


@dataclass(frozen=True)
class ServerOptimizer(StatefulStrategy):
    """Combines the round's models with `rule` (mean, or a robust rule), takes the difference to
    the global model as a pseudo-gradient delta (P,), and steps the global model along it."""

    rule: str = "mean"
    trim: float = 0.2
    byzantine: int = 1
    server_lr: float | None = None  # None: the strategy's own default
    default_server_lr: ClassVar[float] = 1.0

    @property
    def lr(self) -> float:
        return self.default_server_lr if self.server_lr is None else self.server_lr

    def aggregate(self, updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if self.rule not in RULES:
            raise ValueError(f"unknown rule {self.rule!r}; choose one of {', '.join(RULES)}")
        rule = RULES[self.rule]
        params = {f.name: getattr(self, f.name) for f in dataclasses.fields(rule) if f.init}
        return rule(**params)(updates, weights)

    def step(self, current: torch.Tensor, updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        delta = (self(updates, weights).to(torch.float64) - current.to(torch.float64))  # (P,) pseudo-gradient, pointing downhill
        return (current.to(torch.float64) + self.move(delta)).to(torch.float32)

    def move(self, delta: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def buffer(self, name: str, like: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        if name not in self.buffers:
            self.buffers[name] = torch.full_like(like, fill, dtype=torch.float64)
        return self.buffers[name]


@dataclass(frozen=True)
class FedAvgM(ServerOptimizer):
    """Server momentum: m = mu m + delta; x = x + lr m (lr 1, mu 0 is FedAvg)."""

    name = "fedavgm"
    server_momentum: float = 0.9

    def move(self, delta: torch.Tensor) -> torch.Tensor:
        momentum = self.buffer("momentum", delta)
        momentum.mul_(self.server_momentum).add_(delta)
        return self.lr * momentum


@dataclass(frozen=True)
class FedLC(FedAvgM):
    """FedLC (Zhang et al., ICML 2022, "Federated Learning with Label Distribution Skew via Logits
    Calibration"): each worker's local loss is the cross-entropy of its logits calibrated by its own
    label counts, z_c - lc_tau * n_c^(-1/4), so the classes it holds few or none of (n_c = 0 counts
    as 1) are not pushed down as hard as they are by the plain loss. The server steps as fedavgm
    (server momentum 0 and server lr 1 is the paper's FedAvg)."""

    name = "fedlc"
    lc_tau: float = 1.0

    @property
    def local_calibration_tau(self) -> float:  # type: ignore[override]
        return self.lc_tau


@dataclass(frozen=True)
class AdaptiveServerOptimizer(ServerOptimizer):
    """m = b1 m + (1 - b1) delta; v from delta^2 as each method says; x = x + lr m / (sqrt(v) + tau)."""

    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    default_server_lr: ClassVar[float] = 0.01

    def move(self, delta: torch.Tensor) -> torch.Tensor:
        first = self.buffer("first_moment", delta)
        first.mul_(self.beta1).add_(delta, alpha=1 - self.beta1)
        second = self.buffer("second_moment", delta, self.initial_second_moment())
        self.update_second_moment(second, delta * delta)
        return self.lr * first / (second.sqrt() + self.tau)

    def initial_second_moment(self) -> float:
        return self.tau**2  # v_{-1} >= tau^2, as in the paper

    def update_second_moment(self, second: torch.Tensor, squared: torch.Tensor) -> None:
        raise NotImplementedError


@dataclass(frozen=True)
class FedAdagrad(AdaptiveServerOptimizer):
    name = "fedadagrad"

    def update_second_moment(self, second: torch.Tensor, squared: torch.Tensor) -> None:
        second.add_(squared)


@dataclass(frozen=True)
class FedAdam(AdaptiveServerOptimizer):
    name = "fedadam"

    def update_second_moment(self, second: torch.Tensor, squared: torch.Tensor) -> None:
        second.mul_(self.beta2).add_(squared, alpha=1 - self.beta2)


@dataclass(frozen=True)
class FedYogi(AdaptiveServerOptimizer):
    name = "fedyogi"

    def update_second_moment(self, second: torch.Tensor, squared: torch.Tensor) -> None:
        second.sub_((1 - self.beta2) * squared * torch.sign(second - squared))


@dataclass(frozen=True)
class Scaffold(StatefulStrategy):
    """SCAFFOLD: workers correct each local gradient by (c - c_i); the server steps the global
    model by lr times the mean model change and moves c by the mean change of the c_i
    (all workers take part in every round, so |S| / N = 1)."""

    name = "scaffold"
    control_variates = True
    server_lr: float | None = None

    def aggregate(self, updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return weighted_mean(updates, weights)

    def step(self, current: torch.Tensor, updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        lr = 1.0 if self.server_lr is None else self.server_lr
        delta = self(updates, weights).to(torch.float64) - current.to(torch.float64)
        return (current.to(torch.float64) + lr * delta).to(torch.float32)

    def control(self, like: torch.Tensor) -> torch.Tensor:
        """The server's control variate c (P,), float32, zero at the start."""
        return self.buffers.get("control", torch.zeros_like(like, dtype=torch.float64)).to(torch.float32)

    def update_control(self, control_deltas: torch.Tensor, total_workers: int) -> None:
        """c += sum_i delta c_i / N over the K workers heard this round. control_deltas: (K, P)."""
        change = control_deltas.to(torch.float64).sum(0) / total_workers
        self.buffers["control"] = self.buffers.get("control", torch.zeros_like(change)) + change


REGISTRY: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (FedAvg, FedProx, Median, TrimmedMean, Krum, FedAvgM, FedAdam, FedYogi, FedAdagrad, Scaffold, FedRS, FedBABU, FedLC)
}
assert tuple(REGISTRY) == STRATEGIES, "learning.settings.STRATEGIES must list every strategy"


def from_settings(settings: FederatedSettings) -> Strategy:
    """The strategy `settings.strategy` names, with its parameters taken from the settings."""
    if settings.strategy not in REGISTRY:
        raise ValueError(f"unknown strategy {settings.strategy!r}; choose one of {', '.join(REGISTRY)}")
    cls = REGISTRY[settings.strategy]
    return cls(**{field.name: getattr(settings, field.name) for field in dataclasses.fields(cls) if field.init})
