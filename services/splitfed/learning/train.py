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


def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # Logits in, log-softmax inside: a softmax layer before CrossEntropy would apply it twice.
    return F.cross_entropy(logits, labels)


def evaluate(forward: Callable[[torch.Tensor], torch.Tensor], data: Samples, batch_size: int = 1000) -> Evaluation:
    """Accuracy and mean loss of `forward` (images -> logits) over `data`."""
    correct, total_loss = 0, 0.0
    with torch.no_grad():  # forward is responsible for putting its modules in eval mode
        for start in range(0, len(data), batch_size):
            images = data.images[start : start + batch_size]
            labels = data.labels[start : start + batch_size]
            logits = forward(images)
            total_loss += F.cross_entropy(logits, labels, reduction="sum").item()
            correct += (logits.argmax(1) == labels).sum().item()
    return Evaluation(correct / len(data), total_loss / len(data))


def train_step(model: nn.Module, opt: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.train()
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(model(images), labels)
    loss.backward()
    opt.step()
    return loss.item()


def fit(
    train_data: Samples,
    test_data: Samples,
    settings: TrainSettings,
    step: Callable[[torch.Tensor, torch.Tensor], float],
    forward: Callable[[torch.Tensor], torch.Tensor],
    on_batch: Callable[[int, int, float], None] | None = None,
    on_epoch: Callable[[EpochRecord], None] | None = None,
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
            losses.append(step(train_data.images[indices], train_data.labels[indices]))  # (B, C, H, W), (B,)
            if on_batch:
                on_batch(done, len(batches), losses[-1])
        evaluation = evaluate(forward, test_data, settings.eval_batch_size)
        history.append(EpochRecord(epoch, evaluation.accuracy, evaluation.loss, float(np.mean(losses)), time.perf_counter() - started))
        if on_epoch:
            on_epoch(history[-1])
    return history
