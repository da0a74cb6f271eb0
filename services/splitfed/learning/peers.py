"""What each peer of a decentralized run trains on and with (its share, its local loss with the
drift corrections, its synchronisation points), how it weighs the models it receives, and the
same training in one process: p2p in lock step, SMPL in global rounds (the baselines the
distributed runs equal, and are timed and scored against). Pure: no messages, no threads."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from splitfed.learning import data, federated, models, objectives, train
from splitfed.learning.averaging import weighted_average
from splitfed.learning.hyperedge import choose_start, draw_members
from splitfed.learning.context import Context, context_of
from splitfed.learning.data import Samples
from splitfed.learning.device import CPU, Compute, load_state, state_of
from splitfed.learning.tasks import Task
from splitfed.learning.settings import P2PSettings, PeerSettings, SMPLSettings


def peer_context(settings: PeerSettings, role: str, index: int) -> Context:
    """The context of peer `index` of a run of `role`s (p2p-peer, smpl-peer)."""
    if not 0 <= index < settings.peers:
        raise ValueError(f"--peer-index {index} is not below --peers {settings.peers}")
    return context_of(settings, role, f"{role}-{index}", index)


@dataclass(frozen=True)
class Received:
    """A model another peer sent: its samples and how many synchronisations its sender had done."""

    sender: str
    sync: int
    samples: int
    state: dict[str, np.ndarray]


def mixing_weights(own_sync: int, own_samples: int, received: list[Received], settings: P2PSettings) -> tuple[list[float], list[Received], list[Received]]:
    """Weights of (this peer's model, then each kept model), the kept models and the dropped ones.
    A model s = own_sync - its sync behind counts samples * discount^s; one more than
    --max-staleness behind is dropped (it would pull the peer back towards where it was). A model
    ahead of this peer counts in full: it holds more training, not less."""
    kept = [model for model in received if own_sync - model.sync <= settings.max_staleness]
    dropped = [model for model in received if own_sync - model.sync > settings.max_staleness]
    weights = [float(own_samples)] + [model.samples * settings.staleness_discount ** max(0, own_sync - model.sync) for model in kept]
    return weights, kept, dropped


def mix(own: Received, received: list[Received], settings: P2PSettings) -> tuple[dict[str, np.ndarray], list[Received], list[Received]]:
    """This peer's model averaged with what arrived: (the average, the models in it, the dropped).
    The models are summed in the order of their senders' names, so peers that averaged the same
    models hold the very same one."""
    weights, kept, dropped = mixing_weights(own.sync, own.samples, received, settings)
    if sum(weights[1:]) == 0:  # nothing kept, or every kept model's weight discounted to nothing
        return own.state, [], dropped
    ordered = sorted(zip([own, *kept], weights), key=lambda pair: pair[0].sender)
    return weighted_average([model.state for model, _ in ordered], [weight for _, weight in ordered]), kept, dropped


def sync_chunks(batches: list[torch.Tensor], syncs: int) -> list[list[torch.Tensor]]:
    """An epoch's batches cut into `syncs` consecutive runs, the first ones a batch longer where they
    do not divide evenly (a run is empty when there are fewer batches than syncs)."""
    size, longer = divmod(len(batches), syncs)
    bounds = np.cumsum([0] + [size + (index < longer) for index in range(syncs)])
    return [batches[start:end] for start, end in zip(bounds[:-1], bounds[1:])]


@dataclass
class Learner:
    """What one peer trains with: its model and optimiser, its share and batch order, and its local
    loss, corrected for drift as the settings ask (--lc-tau: calibrated by its own label counts;
    --prox-mu: the proximal term towards its model at its last synchronisation)."""

    model: nn.Module
    opt: torch.optim.Optimizer
    share: Samples
    generator: torch.Generator
    loss_of: train.Loss  # the task's loss: what scores use
    local_loss: train.Loss  # what training minimises
    proximal: objectives.Proximal | None
    compute: Compute = CPU


def training_share(task: Task, context: Context) -> Samples:
    """A peer's training samples: its own, or its share of the one data set; with --holdout, of
    what is left once the held-out samples are set aside."""
    if not task.settings.holdout:
        return task.training_share(context)
    task.check_partition()
    full = federated.training_data(task, context)
    return full if task.own_data else data.share_of(full, task.settings.partition, context.parties, context.seed, context.index)


def scoring_data(task: Task, context: Context) -> Samples:
    """What a peer scores its model on: its test set, or with --holdout the held-out training samples."""
    return federated.evaluation_data(task, context)


def learner(task: Task, context: Context, settings: PeerSettings) -> Learner:
    share = training_share(task, context)
    model = task.model(context)
    loss_of = task.loss(context)
    classes = models.output_shape(model, tuple(share.images.shape[1:]))[0]  # the model's logits: one per class
    offsets = objectives.calibration_offsets(share, classes, settings.lc_tau) if settings.lc_tau > 0 else None  # (classes,)
    return Learner(model, train.optimizer(model.parameters(), settings.optimizer, settings.lr), share, data.party_generator(settings.seed, context.index),
                   loss_of, objectives.adjusted(loss_of, offsets=offsets), objectives.Proximal(model, settings.prox_mu) if settings.prox_mu > 0 else None,
                   task.compute)


def train_batches(peer: Learner, batches: list[torch.Tensor], after_batch: Callable[[float], None] | None = None) -> list[float]:
    """A step on each of `batches`; their training losses. `after_batch(loss)` after each."""
    losses = []
    for indices in batches:
        losses.append(train.train_step(peer.model, peer.opt, *peer.share.batch(indices), peer.local_loss, peer.compute, peer.proximal))  # (B, C, H, W), (B,)
        if after_batch:
            after_batch(losses[-1])
    return losses


def synchronised(peer: Learner, state: dict[str, np.ndarray] | None = None) -> None:
    """The peer now holds the model it agreed on (`state`, loaded, or the one it has): the proximal
    term's anchor moves to it."""
    if state is not None:
        load_state(peer.model, state)
    if peer.proximal is not None:
        peer.proximal.anchor_here()


VALIDATION_SAMPLES = 512  # the first samples of an SMPL peer's own share score it for --epsilon's "best member"


def validation_loss(peer: Learner, settings: PeerSettings) -> float:
    """What an SMPL peer tells the tracker when it asks for a hyperedge: its model's loss on the
    first samples of its own share."""
    return scored(peer.model, peer.share.subset(slice(0, VALIDATION_SAMPLES)), settings, peer.loss_of, peer.compute).loss


def hyperedge_batches(share_size: int, settings: PeerSettings) -> int:
    """The batches an SMPL peer trains in each hyperedge: 1/--syncs-per-epoch of an epoch's, rounded up."""
    epoch_batches = -(-share_size // settings.batch_size)
    return -(-epoch_batches // settings.syncs_per_epoch)


def scored(model: nn.Module, test: Samples, settings: PeerSettings, loss_of: train.Loss = train.loss_fn, compute: Compute = CPU) -> train.Evaluation:
    with models.evaluating(model):
        return train.evaluate(model, test, settings.eval_batch_size, loss_of, compute)


def in_memory_run(settings: P2PSettings, every_epoch: bool = True) -> dict:
    """Every peer in this process, in lock step: each peer trains its part of the epoch, then every
    peer averages its model with every other's (all fresh, so weighted by samples alone), as often
    as --syncs-per-epoch says. What a distributed run does when every model arrives in time (as
    --sync-wait makes sure). Every peer then holds the same model: it is scored once per epoch
    (with every peer's own before the last average), or with `every_epoch` False only once, at the end."""
    task = Task(settings)
    # In the order of the peers' names, the order in which a distributed peer sums the models.
    contexts = sorted((peer_context(settings, "p2p-peer", index) for index in range(settings.peers)), key=lambda context: context.party)
    test = scoring_data(task, contexts[0])
    peers = [learner(task, context, settings) for context in contexts]
    history = []
    started = time.perf_counter()
    for epoch in range(1, settings.epochs + 1):
        orders = [sync_chunks(data.batch_order(len(peer.share), settings.batch_size, peer.generator), settings.syncs_per_epoch) for peer in peers]
        losses = []
        for sync in range(settings.syncs_per_epoch):
            losses += [loss for peer, order in zip(peers, orders) for loss in train_batches(peer, order[sync])]
            if sync == settings.syncs_per_epoch - 1 and every_epoch:
                before = [scored(peer.model, test, settings, peer.loss_of, peer.compute).accuracy for peer in peers]
            average = weighted_average([state_of(peer.model) for peer in peers], [len(peer.share) for peer in peers])
            for peer in peers:
                synchronised(peer, average)
        if not every_epoch and epoch < settings.epochs:
            continue
        after = scored(peers[0].model, test, settings, peers[0].loss_of, task.compute)
        history.append({"step": epoch, "accuracy": after.accuracy, "loss": after.loss, "train_loss": float(np.mean(losses)),
                        "accuracy_before": before if every_epoch else None, "seconds": time.perf_counter() - started})
    return {"accuracy": history[-1]["accuracy"], "loss": history[-1]["loss"], "spread": 0.0, "history": history, "traffic": {"messages": 0, "bytes": 0}}


def smpl_in_memory_run(settings: SMPLSettings, every_epoch: bool = True) -> dict:
    """SMPL with every peer in this process, in global rounds (what a distributed run with
    --no-async-global, --no-async-local, --max-hyperedges 1 and --sparsity 0 does): each round
    every peer states its validation loss; the round's hyperedges are drawn as the tracker draws
    them; each hyperedge's members move to its start model, train their part of an epoch, and all
    take the sample-weighted mean of their trained models. Peers are scored at the end of each
    epoch (with `every_epoch` False, of the last only): {"accuracy": the mean of the peers' final accuracies, "spread", "peers": each one's
    epoch records}."""
    if settings.async_global or settings.async_local or settings.max_hyperedges != 1 or settings.sparsity:
        raise ValueError("the one-process SMPL run is in global rounds: --no-async-global --no-async-local --max-hyperedges 1 --sparsity 0")
    if settings.peers % settings.hyperedge_size:
        raise ValueError(f"the one-process SMPL run puts every peer in a hyperedge each round: --hyperedge-size {settings.hyperedge_size} must divide --peers {settings.peers}")
    task = Task(settings)
    contexts = {context.party: context for context in (peer_context(settings, "smpl-peer", index) for index in range(settings.peers))}
    names = list(contexts)
    peers = {name: learner(task, contexts[name], settings) for name in names}
    tests = {name: scoring_data(task, contexts[name]) for name in names}
    streams: dict[str, list[torch.Tensor]] = {name: [] for name in names}  # each peer's batches of its epoch under way, taken from the end

    def next_batch(name: str) -> torch.Tensor:
        if not streams[name]:
            streams[name] = data.batch_order(len(peers[name].share), settings.batch_size, peers[name].generator)
        return streams[name].pop()

    rng = random.Random(f"splitfed-smpl/{settings.seed}")
    records: dict[str, list[dict]] = {name: [] for name in names}
    for round_number in range(1, settings.hyperepochs * settings.syncs_per_epoch + 1):
        # With --start mean the losses choose nothing that is used (the draws take the same numbers from the generator whatever they are).
        waiting = {name: validation_loss(peers[name], settings) if settings.start == "source" else 0.0 for name in sorted(names)}
        hyperedges = []
        while len(waiting) >= settings.hyperedge_size:
            members = draw_members(list(waiting), settings.hyperedge_size, rng, lambda members: True, 1)
            hyperedges.append((members, choose_start({name: waiting.pop(name) for name in members}, settings.epsilon, rng)))
        ends_epoch = round_number % settings.syncs_per_epoch == 0
        for members, source in hyperedges:
            if settings.start == "mean":
                start = weighted_average([state_of(peers[name].model) for name in sorted(members)], [len(peers[name].share) for name in sorted(members)])
            else:
                start = state_of(peers[source].model)
            for name in members:
                synchronised(peers[name], start)
                for _ in range(hyperedge_batches(len(peers[name].share), settings)):
                    train_batches(peers[name], [next_batch(name)])
            mean = weighted_average([state_of(peers[name].model) for name in members], [len(peers[name].share) for name in members])
            for name in members:
                synchronised(peers[name], mean)
                if ends_epoch and (every_epoch or round_number == settings.hyperepochs * settings.syncs_per_epoch):
                    score = scored(peers[name].model, tests[name], settings, peers[name].loss_of, peers[name].compute)
                    records[name].append({"epoch": round_number // settings.syncs_per_epoch, "accuracy": score.accuracy, "loss": score.loss})
    finals = [peer_records[-1]["accuracy"] for peer_records in records.values() if peer_records]
    return {"accuracy": float(np.mean(finals)), "spread": max(finals) - min(finals), "peers": records}
