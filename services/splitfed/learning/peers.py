"""What each peer of a decentralized run trains on, how it weighs the models it receives, and the
same training in one process (the baseline a distributed p2p run is timed and scored against).
Pure: no messages, no threads."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from splitfed.learning import data, models, train
from splitfed.learning.averaging import weighted_average
from splitfed.learning.context import Context, context_of
from splitfed.learning.data import Samples
from splitfed.learning.device import CPU, Compute, to_numpy
from splitfed.learning.tasks import Task
from splitfed.learning.settings import P2PSettings, PeerSettings


def peer_context(settings: PeerSettings, role: str, index: int) -> Context:
    """The context of peer `index` of a run of `role`s (p2p-peer, smpl-peer)."""
    if not 0 <= index < settings.peers:
        raise ValueError(f"--peer-index {index} is not below --peers {settings.peers}")
    return context_of(settings, role, f"{role}-{index}", index)


@dataclass(frozen=True)
class Received:
    """A model another peer sent: its samples and the epoch it had finished."""

    sender: str
    epoch: int
    samples: int
    state: dict[str, np.ndarray]


def mixing_weights(own_epoch: int, own_samples: int, received: list[Received], settings: P2PSettings) -> tuple[list[float], list[Received], list[Received]]:
    """Weights of (this peer's model, then each kept model), the kept models and the dropped ones.
    A model s = own_epoch - its epoch behind counts samples * discount^s; one more than
    --max-staleness behind is dropped (it would pull the peer back towards where it was). A model
    ahead of this peer counts in full: it holds more training, not less."""
    kept = [model for model in received if own_epoch - model.epoch <= settings.max_staleness]
    dropped = [model for model in received if own_epoch - model.epoch > settings.max_staleness]
    weights = [float(own_samples)] + [model.samples * settings.staleness_discount ** max(0, own_epoch - model.epoch) for model in kept]
    return weights, kept, dropped


def mix(own: dict[str, np.ndarray], own_epoch: int, own_samples: int, received: list[Received], settings: P2PSettings) -> tuple[dict[str, np.ndarray], list[Received], list[Received]]:
    """This peer's model averaged with what arrived: (the average, the models in it, the dropped)."""
    weights, kept, dropped = mixing_weights(own_epoch, own_samples, received, settings)
    if sum(weights[1:]) == 0:  # nothing kept, or every kept model's weight discounted to nothing
        return own, [], dropped
    return weighted_average([own, *(model.state for model in kept)], weights), kept, dropped


def state_of(model: nn.Module) -> dict[str, np.ndarray]:
    return {name: to_numpy(value).copy() for name, value in model.state_dict().items()}


def load_state(model: nn.Module, state: dict[str, np.ndarray]) -> None:
    model.load_state_dict({name: torch.from_numpy(np.array(value, copy=True)) for name, value in state.items()})


@dataclass
class LocalPeer:
    """One peer of the one-process run: its model, optimiser, data and batch order."""

    model: nn.Module
    opt: torch.optim.Optimizer
    share: Samples
    generator: torch.Generator
    loss_of: train.Loss = train.loss_fn
    compute: Compute = CPU


def train_epoch(peer: LocalPeer, settings: PeerSettings) -> float:
    """One pass over the peer's share; its mean training loss."""
    losses = [
        train.train_step(peer.model, peer.opt, *peer.share.batch(indices), peer.loss_of, peer.compute)  # (B, C, H, W), (B,)
        for indices in data.batch_order(len(peer.share), settings.batch_size, peer.generator)
    ]
    return float(np.mean(losses))


def scored(model: nn.Module, test: Samples, settings: PeerSettings, loss_of: train.Loss = train.loss_fn, compute: Compute = CPU) -> train.Evaluation:
    with models.evaluating(model):
        return train.evaluate(model, test, settings.eval_batch_size, loss_of, compute)


def in_memory_run(settings: P2PSettings) -> dict:
    """Every peer in this process, in lock step: each epoch every peer trains, then every peer
    averages its model with every other's (all fresh, so weighted by samples alone). What a
    distributed run does when every model arrives in time."""
    started = time.perf_counter()
    task = Task(settings)
    contexts = [peer_context(settings, "p2p-peer", index) for index in range(settings.peers)]
    test = task.data(contexts[0], train=False)
    peers = []
    for context in contexts:
        model = task.model(context)
        peers.append(LocalPeer(model, train.optimizer(model.parameters(), settings.optimizer, settings.lr), task.training_share(context),
                               data.party_generator(settings.seed, context.index), task.loss(context), task.compute))
    history = []
    started = time.perf_counter()
    for epoch in range(1, settings.epochs + 1):
        losses = [train_epoch(peer, settings) for peer in peers]
        before = [scored(peer.model, test, settings, peer.loss_of, peer.compute).accuracy for peer in peers]
        average = weighted_average([state_of(peer.model) for peer in peers], [len(peer.share) for peer in peers])
        for peer in peers:
            load_state(peer.model, average)
        after = scored(peers[0].model, test, settings, peers[0].loss_of, task.compute)
        history.append({"step": epoch, "accuracy": after.accuracy, "loss": after.loss, "train_loss": float(np.mean(losses)),
                        "accuracy_before": before, "seconds": time.perf_counter() - started})
    return {"accuracy": history[-1]["accuracy"], "loss": history[-1]["loss"], "history": history, "traffic": {"messages": 0, "bytes": 0}}
