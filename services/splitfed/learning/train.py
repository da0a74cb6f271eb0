"""Optimisers, one epoch of centralized training, evaluation. Pure torch."""

from __future__ import annotations

from collections.abc import Callable, Iterable
import time
from dataclasses import dataclass

import numpy as np

import torch
from torch import nn
from torch.nn import functional as F

from splitfed.learning.data import Samples, batch_order
from splitfed.learning.device import CPU, Compute
from splitfed.learning.settings import OPTIMIZERS, TrainSettings


def optimizer(params: Iterable[nn.Parameter], name: str, lr: float) -> torch.optim.Optimizer:
    """Adam or SGD with momentum: both update each parameter on its own, so a model split across
    parties, each with its own optimiser over its own layers, updates exactly like the whole."""
    params = list(params)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


@dataclass
class EpochRecord:
    """One line of a run's history."""

    step: int
    accuracy: float
    loss: float
    train_loss: float
    seconds: float


@dataclass
class Evaluation:
    accuracy: float
    loss: float


Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, labels) -> the batch's mean loss


def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # Logits in, log-softmax inside: a softmax layer before CrossEntropy would apply it twice.
    return F.cross_entropy(logits, labels)


def summed_loss(loss_of: Loss, logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The batch's loss summed over its samples: cross-entropy summed as such, a task's own loss
    (a batch mean) times the batch's size."""
    if loss_of is loss_fn:
        return F.cross_entropy(logits, labels, reduction="sum").item()
    return loss_of(logits, labels).item() * len(labels)


@dataclass(frozen=True)
class Score:
    """A model's counts on some samples: what a party that scores reports, and what is added up."""

    correct: int
    loss_sum: float  # the loss of every sample, summed
    samples: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.samples

    @property
    def loss(self) -> float:
        return self.loss_sum / self.samples


def score(forward: Callable[[torch.Tensor], torch.Tensor], data: Samples, batch_size: int = 1000, loss_of: Loss = loss_fn, compute: Compute = CPU) -> Score:
    """The counts of `forward` (inputs -> logits) over `data`, each batch taken to the data's device
    and computed in the compute's precision."""
    correct, loss_sum = 0, 0.0
    with torch.no_grad():  # forward is responsible for putting its modules in eval mode
        for start in range(0, len(data), batch_size):
            images, labels = data.batch(slice(start, start + batch_size))
            with compute.autocast():
                logits = forward(images)
                loss_sum += summed_loss(loss_of, logits, labels)
            correct += (logits.argmax(1) == labels).sum().item()
    return Score(correct, loss_sum, len(data))


def evaluate(forward: Callable[[torch.Tensor], torch.Tensor], data: Samples, batch_size: int = 1000, loss_of: Loss = loss_fn, compute: Compute = CPU) -> Evaluation:
    """Accuracy and mean loss of `forward` (inputs -> logits) over `data`."""
    counts = score(forward, data, batch_size, loss_of, compute)
    return Evaluation(counts.accuracy, counts.loss)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor, loss_of: Loss = loss_fn, compute: Compute = CPU,
               penalty: Callable[[], torch.Tensor] | None = None) -> float:
    """One optimiser step on `loss_of` over the batch, plus `penalty()` (a term on the parameters,
    such as a proximal one) where given; the loss stepped on."""
    model.train()
    opt.zero_grad(set_to_none=True)
    with compute.autocast():
        loss = loss_of(model(images), labels)
    if penalty is not None:
        loss = loss + penalty()
    compute.backward(loss)
    compute.step(opt)
    return loss.item()


def fit(
    train_data: Samples,
    test_data: Samples,
    settings: TrainSettings,
    step: Callable[[torch.Tensor, torch.Tensor], float],
    forward: Callable[[torch.Tensor], torch.Tensor],
    on_batch: Callable[[int, int, float], None] | None = None,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    loss_of: Loss = loss_fn,
    compute: Compute = CPU,
) -> list[EpochRecord]:
    """The epoch loop every scenario shares: seeded batch order, `step` per batch, then evaluate
    `forward` on the test set. Same seed, same batches, whichever party computes the step."""
    generator = torch.Generator().manual_seed(settings.seed)
    history: list[EpochRecord] = []
    for epoch in range(1, settings.epochs + 1):
        started = time.perf_counter()
        batches = batch_order(len(train_data), settings.batch_size, generator)
        losses = []
        for done, indices in enumerate(batches, 1):
            losses.append(step(*train_data.batch(indices)))  # (B, C, H, W), (B,) on the data's device
            if on_batch:
                on_batch(done, len(batches), losses[-1])
        evaluation = evaluate(forward, test_data, settings.eval_batch_size, loss_of, compute)
        history.append(EpochRecord(epoch, evaluation.accuracy, evaluation.loss, float(np.mean(losses)), time.perf_counter() - started))
        if on_epoch:
            on_epoch(history[-1])
    return history
