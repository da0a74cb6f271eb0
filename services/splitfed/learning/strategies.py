"""Aggregation strategies for federated rounds: pure math on the workers' models, no I/O.

Each update is a flat float32 vector (all parameters of one worker's model, `flatten`), with a
weight (its number of training samples). A strategy turns the current global model and the
round's updates into the next global model (`step`); the server role and the plain reference
loop call the same objects. Robust rules ignore the weights: weighting by a number the worker
itself reports would hand a poisoning worker the lever it needs.

Server optimisers (Reddi et al. 2021, "Adaptive Federated Optimization") treat the difference
between the combined update and the global model as a pseudo-gradient and apply momentum, Adam,
Yogi or Adagrad to it on the server; they keep state (float64 tensors, `StrategyState`) that
`step` takes and returns, and that the server checkpoints with the model. SCAFFOLD (Karimireddy
et al. 2020) adds control variates that correct each worker's local gradients for client drift.

What a strategy asks of each worker's local training is one record, its `recipe`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from splitfed.learning.settings import FederatedSettings

StrategyState = dict[str, torch.Tensor]
"""A strategy's server-side tensors (float64) carried from round to round: momentum, moments,
SCAFFOLD's control variate. Empty for a strategy that keeps none."""


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
class LocalRecipe:
    """What a strategy asks of each worker's local training; the defaults are plain local SGD."""

    prox_mu: float = 0.0  # > 0: FedProx's proximal term mu/2 ||w - w_global||^2 in the local loss
    absent_scale: float = 1.0  # < 1: FedRS scales the logits of classes the worker holds no sample of by it
    calibration_tau: float = 0.0  # > 0: FedLC calibrates the logits by the worker's label counts
    frozen_head: bool = False  # FedBABU: the model's last layer is left as it is
    control_variates: bool = False  # SCAFFOLD: the server's control travels with the model, the change of the worker's with its update


@dataclass(frozen=True)
class Strategy:
    """One aggregation rule with its own parameters (dataclass fields named as the settings that
    set them). What workers do differently is said by `recipe`."""

    name: ClassVar[str]

    @property
    def recipe(self) -> LocalRecipe:
        return LocalRecipe()

    def aggregate(self, updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """K updates (K, P) with weights (K,) -> their combination (P,)."""
        raise NotImplementedError

    def __call__(self, updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if updates.ndim != 2 or updates.shape[0] == 0 or weights.shape != updates.shape[:1]:
            raise ValueError(f"aggregation needs K >= 1 updates (K, P) and K weights, got {tuple(updates.shape)} and {tuple(weights.shape)}")
        return self.aggregate(updates, weights)

    def step(self, current: torch.Tensor, updates: torch.Tensor, weights: torch.Tensor, state: StrategyState) -> tuple[torch.Tensor, StrategyState]:
        """The next global model (P,) from the current one (P,) and the round's updates (K, P),
        and the strategy's state after the step (`state` itself is left as it is)."""
        return self(updates, weights), state

    def loaded_state(self, tensors: dict[str, torch.Tensor]) -> StrategyState:
        """The state that checkpointed `tensors` hold; ValueError for tensors this strategy cannot use."""
        if tensors:
            raise ValueError(f"{self.name} keeps no state, but a checkpoint holds {sorted(tensors)}")
        return {}


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
    def recipe(self) -> LocalRecipe:
        return LocalRecipe(prox_mu=self.prox_mu)


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
    def recipe(self) -> LocalRecipe:
        return LocalRecipe(absent_scale=self.rs_alpha)


@dataclass(frozen=True)
class FedBABU(FedAvg):
    """FedBABU (Oh, Kim and Yun, ICLR 2022, "FedBABU: Toward Enhanced Representation for Federated
    Image Classification"): the classifier head keeps its random initialisation and workers train
    only the body, so no worker can tilt the shared head towards its own classes; the server
    averages as FedAvg."""

    name = "fedbabu"

    @property
    def recipe(self) -> LocalRecipe:
        return LocalRecipe(frozen_head=True)


RULES: dict[str, type[Strategy]] = {"mean": FedAvg, "median": Median, "trimmed-mean": TrimmedMean, "krum": Krum}


@dataclass(frozen=True)
class StatefulStrategy(Strategy):
    """A strategy with server-side tensors (float64) that the server checkpoints with the model."""

    def loaded_state(self, tensors: dict[str, torch.Tensor]) -> StrategyState:
        return {name: value.to(torch.float64) for name, value in tensors.items()}


def buffer(state: StrategyState, name: str, like: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """`state[name]`, or a float64 tensor shaped as `like` filled with `fill` before the first step."""
    return state[name] if name in state else torch.full_like(like, fill, dtype=torch.float64)


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

    def step(self, current: torch.Tensor, updates: torch.Tensor, weights: torch.Tensor, state: StrategyState) -> tuple[torch.Tensor, StrategyState]:
        delta = (self(updates, weights).to(torch.float64) - current.to(torch.float64))  # (P,) pseudo-gradient, pointing downhill
        move, state = self.move(delta, state)
        return (current.to(torch.float64) + move).to(torch.float32), state

    def move(self, delta: torch.Tensor, state: StrategyState) -> tuple[torch.Tensor, StrategyState]:
        """The step (P,) along `delta` (P,), and the state after it."""
        raise NotImplementedError


@dataclass(frozen=True)
class FedAvgM(ServerOptimizer):
    """Server momentum: m = mu m + delta; x = x + lr m (lr 1, mu 0 is FedAvg)."""

    name = "fedavgm"
    server_momentum: float = 0.9

    def move(self, delta: torch.Tensor, state: StrategyState) -> tuple[torch.Tensor, StrategyState]:
        momentum = buffer(state, "momentum", delta).mul(self.server_momentum).add(delta)
        return self.lr * momentum, {**state, "momentum": momentum}


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
    def recipe(self) -> LocalRecipe:
        return LocalRecipe(calibration_tau=self.lc_tau)


@dataclass(frozen=True)
class AdaptiveServerOptimizer(ServerOptimizer):
    """m = b1 m + (1 - b1) delta; v from delta^2 as each method says; x = x + lr m / (sqrt(v) + tau)."""

    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    default_server_lr: ClassVar[float] = 0.01

    def move(self, delta: torch.Tensor, state: StrategyState) -> tuple[torch.Tensor, StrategyState]:
        first = buffer(state, "first_moment", delta).mul(self.beta1).add(delta, alpha=1 - self.beta1)
        second = self.next_second_moment(buffer(state, "second_moment", delta, self.initial_second_moment()), delta * delta)
        return self.lr * first / (second.sqrt() + self.tau), {**state, "first_moment": first, "second_moment": second}

    def initial_second_moment(self) -> float:
        return self.tau**2  # v_{-1} >= tau^2, as in the paper

    def next_second_moment(self, second: torch.Tensor, squared: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class FedAdagrad(AdaptiveServerOptimizer):
    name = "fedadagrad"

    def next_second_moment(self, second: torch.Tensor, squared: torch.Tensor) -> torch.Tensor:
        return second.add(squared)


@dataclass(frozen=True)
class FedAdam(AdaptiveServerOptimizer):
    name = "fedadam"

    def next_second_moment(self, second: torch.Tensor, squared: torch.Tensor) -> torch.Tensor:
        return second.mul(self.beta2).add(squared, alpha=1 - self.beta2)


@dataclass(frozen=True)
class FedYogi(AdaptiveServerOptimizer):
    name = "fedyogi"

    def next_second_moment(self, second: torch.Tensor, squared: torch.Tensor) -> torch.Tensor:
        return second.sub((1 - self.beta2) * squared * torch.sign(second - squared))


@dataclass(frozen=True)
class Scaffold(StatefulStrategy):
    """SCAFFOLD: workers correct each local gradient by (c - c_i); the server steps the global
    model by lr times the mean model change and moves c by the mean change of the c_i
    (all workers take part in every round, so |S| / N = 1)."""

    name = "scaffold"
    server_lr: float | None = None

    @property
    def recipe(self) -> LocalRecipe:
        return LocalRecipe(control_variates=True)

    def aggregate(self, updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return weighted_mean(updates, weights)

    def step(self, current: torch.Tensor, updates: torch.Tensor, weights: torch.Tensor, state: StrategyState) -> tuple[torch.Tensor, StrategyState]:
        lr = 1.0 if self.server_lr is None else self.server_lr
        delta = self(updates, weights).to(torch.float64) - current.to(torch.float64)
        return (current.to(torch.float64) + lr * delta).to(torch.float32), state

    def control(self, like: torch.Tensor, state: StrategyState) -> torch.Tensor:
        """The server's control variate c (P,), float32, zero at the start."""
        return state.get("control", torch.zeros_like(like, dtype=torch.float64)).to(torch.float32)

    def next_control(self, control_deltas: torch.Tensor, total_workers: int, state: StrategyState) -> StrategyState:
        """c + sum_i delta c_i / N over the K workers heard this round. control_deltas: (K, P)."""
        change = control_deltas.to(torch.float64).sum(0) / total_workers
        return {**state, "control": state.get("control", torch.zeros_like(change)) + change}


REGISTRY: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (FedAvg, FedProx, Median, TrimmedMean, Krum, FedAvgM, FedAdam, FedYogi, FedAdagrad, Scaffold, FedRS, FedBABU, FedLC)
}


def from_settings(settings: FederatedSettings) -> Strategy:
    """The strategy `settings.strategy` names, with its parameters taken from the settings."""
    if settings.strategy not in REGISTRY:
        raise ValueError(f"unknown strategy {settings.strategy!r}; choose one of {', '.join(REGISTRY)}")
    cls = REGISTRY[settings.strategy]
    return cls(**{field.name: getattr(settings, field.name) for field in dataclasses.fields(cls) if field.init})
