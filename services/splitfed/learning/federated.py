"""Federated learning without the messaging: a worker's local training, and the whole
FedAvg loop in one process (the baseline the distributed run must equal and is timed against)."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from splitfed.learning import data, models, strategies, train
from splitfed.learning.settings import FederatedSettings, PartitionSettings
from splitfed.learning.train import EpochRecord


def round_seed(seed: int, worker_index: int, round_number: int) -> int:
    """Each worker's batch order in each round: fixed by the run's seed, so runs repeat exactly."""
    return seed * 1_000_003 + worker_index * 10_007 + round_number


def local_training(model: torch.nn.Module, share: data.Split, settings: PartitionSettings, prox_mu: float, seed: int) -> float:
    """`local_epochs` over this worker's share; with prox_mu > 0 the FedProx term
    mu/2 * ||w - w_global||^2 keeps the local model near the global one. Returns the mean loss."""
    opt = train.optimizer(model.parameters(), settings.optimizer, settings.lr)
    anchor = [p.detach().clone() for p in model.parameters()] if prox_mu > 0 else None
    generator = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for _ in range(settings.local_epochs):
        for indices in data.batch_order(len(share), settings.batch_size, generator):
            opt.zero_grad(set_to_none=True)
            loss = train.loss_fn(model(share.images[indices]), share.labels[indices])
            if anchor is not None:
                loss = loss + prox_mu / 2 * sum((p - a).pow(2).sum() for p, a in zip(model.parameters(), anchor))
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return sum(losses) / max(1, len(losses))


def reference_run(
    settings: FederatedSettings, on_round: Callable[[EpochRecord], None] | None = None
) -> tuple[nn.Module, list[EpochRecord]]:
    """Federated settings run as a plain loop: each round every worker trains in turn from the
    global model, then the same strategy object the server uses combines the updates."""
    meta = data.info(settings.dataset)
    model = models.build(settings.model, meta, settings.seed)
    names = list(model.state_dict())
    full = data.load(settings.dataset, train=True, data_dir=settings.data_dir, limit=settings.limit)
    shares = [data.Split(full.images[i], full.labels[i]) for i in data.partition(full.labels, settings.partition, settings.workers, settings.seed)]
    test_data = data.load(settings.dataset, train=False, data_dir=settings.data_dir, limit=settings.test_limit)
    local = models.build(settings.model, meta, settings.seed)
    strategy = strategies.from_settings(settings)
    history = []
    for round_number in range(1, settings.rounds + 1):
        started = time.perf_counter()
        vectors, weights, losses = [], [], []
        for index, share in enumerate(shares):
            local.load_state_dict(model.state_dict())
            losses.append(local_training(local, share, settings, strategy.local_prox_mu, round_seed(settings.seed, index, round_number)))
            vectors.append(strategies.flatten(local.state_dict(), names))
            weights.append(float(len(share)))
        combined = strategy(torch.stack(vectors), torch.tensor(weights))  # (K, P), (K,) -> (P,)
        model.load_state_dict(strategies.unflatten(combined, model.state_dict(), names))
        model.eval()
        evaluation = train.evaluate(model, test_data, settings.eval_batch_size)
        history.append(EpochRecord(round_number, evaluation.accuracy, evaluation.loss, sum(losses) / len(losses), time.perf_counter() - started))
        if on_round:
            on_round(history[-1])
    return model, history
