"""What each of several split clients trains on, and in which order, and what the split server,
which holds no data, knows of the data: pure, so that the roles and a one-process reference agree."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from splitfed.learning import cutting, data, models, train
from splitfed.learning.averaging import step_towards, weighted_average
from splitfed.learning.context import Context, context_of
from splitfed.learning.data import Samples
from splitfed.learning.defences import Defences
from splitfed.learning.device import Compute, state_of
from splitfed.learning.settings import DataShape, SplitNNSettings, split_client_name
from splitfed.learning.tasks import Task
from splitfed.learning.cutting import Parts


CLIENT_ROLE, SERVER_ROLE = "split-client", "split-server"  # as roles.split names them: what a task's context says


def client_context(settings: SplitNNSettings, index: int) -> Context:
    return context_of(settings, CLIENT_ROLE, split_client_name(index, settings.clients), index)


def check_evaluation(settings: SplitNNSettings) -> None:
    """--evaluate parties (or both) has every client score the epoch's model: only where they all
    hold its layers when the epoch closes."""
    if settings.evaluate != "server" and settings.clients > 1 and settings.schedule == "round-robin":
        raise ValueError(f"--evaluate {settings.evaluate} has every client score the model, and round-robin clients hold their own layers "
                         "until their turn: use --schedule splitfed-v1 or splitfed-v2, or --evaluate server")


class StatedTask(Task):
    """The task as the split server builds it when it cannot know the data's shape and classes
    itself: as the first client it accepts stated them in its hello."""

    def __init__(self, settings: SplitNNSettings, shape: tuple[int, ...], classes: tuple[str, ...]):
        super().__init__(settings)
        self.stated_shape, self.stated_classes = shape, classes

    def data_shape(self, context: Context) -> DataShape:
        return DataShape(self.settings.dataset, self.stated_shape, len(self.stated_classes))

    def classes(self, context: Context) -> tuple[str, ...]:
        return self.stated_classes


def client_share(task: Task, context: Context) -> Samples:
    """A client's training samples: all of them for a lone client (in order, so that a one-client
    run is the same computation as centralized training), else its own or its partition."""
    if context.parties == 1:
        return task.data(context, train=True)
    return task.training_share(context)


def periods(batches: list[torch.Tensor], count: int) -> list[list[torch.Tensor]]:
    """An epoch's batches cut into `count` runs as even as they come, in order: what a client
    trains between two averagings (--syncs-per-epoch)."""
    check_periods(len(batches), count, "a client's share")
    bounds = [len(batches) * period // count for period in range(count + 1)]
    return [batches[start:end] for start, end in zip(bounds, bounds[1:])]


def check_periods(batches: int, count: int, whose: str) -> None:
    if count > batches:
        raise ValueError(f"--syncs-per-epoch {count} is more than the {batches} batches of {whose}")


@dataclass
class ClientHalves:
    """One client's layers and optimiser in the reference loop."""

    parts: Parts
    opt: torch.optim.Optimizer
    share: Samples
    generator: torch.Generator
    defences: Defences

    def layers(self) -> list[nn.Module]:
        return [self.parts.head] + ([self.parts.tail] if self.parts.tail is not None else [])


def reference_run(settings: SplitNNSettings) -> tuple[list[Parts], list[nn.Module]]:
    """round-robin or splitfed-v1 (or any schedule of one client) in one process, without
    messages, with the clients' defences applied at the cut: each client's parts and the server's
    layers (one set, or one per client in splitfed-v1) after the last epoch. (splitfed-v2 of
    several clients has no single reference: the server trains on batches in the order they arrive.)"""
    if settings.schedule == "splitfed-v2" and settings.clients > 1:
        raise ValueError("splitfed-v2's outcome depends on the order its clients' batches arrive in")
    task = Task(settings)
    loss_of = task.loss(client_context(settings, 0))
    whole = cutting.cut(task.sequential(client_context(settings, 0)), settings.cut_layer, settings.mode)
    clients = []
    for index in range(settings.clients):
        parts = copy.deepcopy(whole)
        params = [p for module in (parts.head, parts.tail) if module is not None for p in module.parameters()]
        context = client_context(settings, index)
        share = client_share(task, context)
        defences = Defences(settings, index, len(share), len(task.classes(context)))
        clients.append(ClientHalves(parts, train.optimizer(params, settings.optimizer, settings.lr), share, data.party_generator(settings.seed, index), defences))
    per_client = settings.schedule == "splitfed-v1"
    bodies = [client.parts.body for client in clients] if per_client else [whole.body] * settings.clients
    if per_client:
        server_opts = [train.optimizer(body.parameters(), settings.optimizer, settings.lr) for body in bodies]
    else:  # one optimiser over the one set of layers, whoever's turn it is
        server_opts = [train.optimizer(whole.body.parameters(), settings.optimizer, settings.lr)] * settings.clients
    last = None  # splitfed-v1: the last average, where every client's layers began the period
    for epoch in range(settings.epochs):
        epoch_periods = [periods(data.batch_order(len(client.share), settings.batch_size, client.generator), settings.syncs_per_epoch) for client in clients]
        for period in range(settings.syncs_per_epoch):
            for index, client in enumerate(clients):
                if not per_client and (index, epoch) != (0, 0):  # round-robin: start from the previous client's layers
                    for mine, theirs in zip(client.layers(), clients[index - 1].layers()):
                        mine.load_state_dict(theirs.state_dict())
                _train_batches(client, bodies[index], server_opts[index], epoch_periods[index][period], loss_of, task.compute)
            if per_client:
                weights = [sum(len(indices) for indices in runs[period]) for runs in epoch_periods]
                last = _average_into([client.layers() + [body] for client, body in zip(clients, bodies)], weights, last, settings.fed_lr)
    return [client.parts for client in clients], bodies if per_client else bodies[:1]


def _train_batches(client: ClientHalves, body: nn.Module, server_opt: torch.optim.Optimizer, batches: list[torch.Tensor], loss_of: train.Loss, compute: Compute) -> None:
    """The client's `batches` through its layers and `body`, as the split roles compute them, with
    the client's defences where the roles apply them: on the activations at the cut, the labels
    the server's layers train on, the gradient flowing back into them, and NoPeek's term."""
    defences = client.defences
    for indices in batches:
        images, labels = client.share.batch(indices)  # (B, C, H, W), (B,) on the device
        for module in (client.parts.head, body, client.parts.tail):
            if module is not None:
                module.train()
        client.opt.zero_grad(set_to_none=True)
        server_opt.zero_grad(set_to_none=True)
        with compute.autocast():
            activations = client.parts.head(images)
        sent = defences.outgoing(activations)
        prior = None
        if defences.needs_prior(indices):
            with models.evaluating(body), compute.autocast():
                prior = body(sent)
        labels = defences.release(indices, labels, prior)
        with compute.autocast():
            outputs = body(sent)
            if client.parts.tail is not None:
                outputs.register_hook(defences.returned)  # the server's layers get the returned gradient, the tail the true one
            logits = client.parts.tail(outputs) if client.parts.tail is not None else outputs
            loss = loss_of(logits, labels)
        penalty = defences.penalty(images, activations)
        (loss if penalty is None else loss + penalty).backward()
        server_opt.step()
        client.opt.step()


def _average_into(groups: list[list[nn.Module]], weights: list[int], last: list[dict[str, np.ndarray]] | None, lr: float) -> list[dict[str, np.ndarray]]:
    """Every member's modules (module by module) restart from the weighted average of all
    members', stepped by `lr` from the `last` average (None: this is the first), as the fed (client
    halves) and the split server (splitfed-v1's server halves) do. Returns the new ones."""
    new = []
    for position in range(len(groups[0])):
        average = weighted_average([state_of(group[position]) for group in groups], weights)
        if last is not None:
            average = step_towards(last[position], average, lr)
        for group in groups:
            group[position].load_state_dict({k: torch.from_numpy(v.copy()) for k, v in average.items()})
        new.append(average)
    return new
