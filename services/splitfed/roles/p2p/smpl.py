"""smpl-peer: trains in the hyperedges the tracker draws (learning.hyperedge has the maths).

A peer asks the tracker for a hyperedge whenever it is in fewer than --max-hyperedges (`want`, with
its validation loss). For each hyperedge it is told the members and whose model they start from;
that member sends its model (`start`) and every member moves to it (with --start mean, every
member sends its model and all move to their weighted mean), unless it is still training in
another hyperedge, which would lose that one's work (it then starts from its own model). Each
member trains 1/--syncs-per-epoch of a pass over its share (learning.peers.hyperedge_batches)
with its drift corrections (--lc-tau; --prox-mu, towards the hyperedge's start), sends its own
change (`delta`: top-k entries by magnitude with --sparsity, as indices and values; a tensor
sent whole as its values alone), and when every live member's change is in, or
--hyperedge-timeout has passed, adds the weighted mean of the changes less its own to its model.
Changes are added, never assigned, so concurrent hyperedges lose nothing. A member that dies
holds nobody up past the timeout; the tracker's list says at once when it is evicted. Every
--syncs-per-epoch hyperedges make an epoch: the last one's close is scored before and after, and
the epoch is reported."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from splitfed.learning import data, train
from splitfed.learning.averaging import weighted_average
from splitfed.learning.hyperedge import DeltaLedger, densify, from_wire, largest_wire, layout_of, sparsify, to_wire
from splitfed.learning.device import from_numpy, load_state, state_of
from splitfed.learning.peers import Learner, hyperedge_batches, scored, synchronised, train_batches, validation_loss
from splitfed.learning.settings import SMPLSettings
from splitfed.observability import metrics
from splitfed.protocol import Message, ProtocolError, TensorSpec, check_tensors
from splitfed.roles.declaration import Identity, ProgressSink
from splitfed.roles.endpoint import RoleTimeout
from splitfed.roles.limits import message_bytes
from splitfed.roles.p2p.common import DELTA, HYPEREDGE, MEMBERS, REFUSED, SMPL_PEER, START, TRACKER, WANT
from splitfed.roles.p2p.peering import POLL_SECONDS, Peer
from splitfed.transport import Transport

log = logging.getLogger(__name__)


@dataclass
class Edge:
    """One hyperedge as a member sees it."""

    id: str
    members: list[str]  # the others
    weights: dict[str, int]  # each other member's samples as the tracker listed them when the hyperedge formed
    source: str
    deadline: float  # monotonic: when it stops waiting for the start model or the others' changes
    phase: str = "starting"  # starting | training | exchanging
    trained: int = 0  # batches trained since it opened
    started: float = field(default_factory=time.perf_counter)
    own_sent: dict[str, np.ndarray] | None = None
    deltas: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # member -> its dense change
    applied: dict[str, float] = field(default_factory=dict)  # --async-mid: member -> the weight its change was applied with
    train_loss: list[float] = field(default_factory=list)
    averaged: int = 0  # the members' changes it closed with
    starts: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # --start mean: each member's model (this peer's too) until it begins


class SMPLPeer(Peer):
    KINDS = (MEMBERS, REFUSED, HYPEREDGE, START, DELTA)

    def __init__(self, settings: SMPLSettings, deployment, transport: Transport, identity: Identity = Identity(), on_progress: ProgressSink | None = None):  # noqa: ANN001 (roles.p2p.PeerDeployment)
        super().__init__(SMPL_PEER, settings, deployment, transport, identity, on_progress, settings.hyperepochs)
        self.snapshot = state_of(self.model)  # the model when own training was last counted
        self.layout = layout_of(self.snapshot)
        self.edge_batches = hyperedge_batches(len(self.share), settings)
        self.planned_edges = settings.hyperepochs * settings.syncs_per_epoch
        self.closed = 0  # hyperedges closed; every --syncs-per-epoch of them make an epoch's record
        self.epoch_edges: list[Edge] = []  # those of the epoch under way
        self.batches: list[torch.Tensor] = []
        self.ledger = DeltaLedger()
        self.edges: dict[str, Edge] = {}
        self.ended: set[str] = set()  # the hyperedges this peer closed or left: anything more for them is a replay or too late
        self.early: dict[str, dict[tuple[str, str], Message]] = {}  # edge -> (kind, sender) -> a change or start model that came before its hyperedge did
        self.early_since: dict[str, float] = {}  # when each of those hyperedges was first heard of (monotonic)
        self.asked: float | None = None  # when this peer asked for the hyperedge it waits for (monotonic)
        self.active = metrics.HYPEREDGES_ACTIVE.labels(SMPL_PEER, self.session)

    def largest_message(self) -> int:
        """A start model, or a member's change at its largest (`hyperedge.largest_wire`). Called
        while the peer is built, before its own `layout`: the model's specs say the same."""
        layout = {name: (spec.dtype, spec.shape) for name, spec in self.specs.items()}
        change = {name: TensorSpec(dtype, shape) for name, (dtype, shape) in largest_wire(layout, self.settings.sparsity).items()}
        return max(message_bytes(self.specs), message_bytes(change))

    # -- the run, top to bottom ----------------------------------------------------------------

    def train(self) -> dict:
        self.membership.register()
        deadline = time.monotonic() + self.endpoint.timeout
        while self.closed < self.planned_edges:
            self.ask()
            if self.settings.async_local or any(edge.phase == "training" for edge in self.edges.values()):
                self.train_batch()
            else:
                self.poll(until=time.monotonic() + POLL_SECONDS)
            self.poll_if_due()
            self.advance()
            if not self.membership.registered() and time.monotonic() > deadline:
                raise RoleTimeout(f"{self.name}: no answer from the tracker within {self.endpoint.timeout:.0f}s")
        self.membership.leave()
        return self.result()

    def ask(self) -> None:
        """Ask for a hyperedge while this peer has room for one and hyperedges left to fill."""
        busy = len(self.edges) + self.closed
        if self.asked is not None and time.monotonic() - self.asked > self.endpoint.timeout and not self.edges:
            raise RoleTimeout(f"{self.name}: no hyperedge from the tracker within {self.endpoint.timeout:.0f}s of asking")
        if self.asked is not None or not self.membership.registered() or len(self.edges) >= self.settings.max_hyperedges or busy >= self.planned_edges:
            return
        loss = validation_loss(self.learner, self.settings)
        self.membership.send(self.membership.tracker, WANT, loss=loss, open=sorted(self.edges))
        self.asked = time.monotonic()

    def train_batch(self) -> None:
        """One local step (or one per thread, Hogwild!), counted for every hyperedge in training."""
        if not self.batches:
            self.batches = data.batch_order(len(self.share), self.settings.batch_size, self.learner.generator)
        if self.settings.local_parallel == "hogwild":
            taken, self.batches = self.batches[: self.settings.local_workers], self.batches[self.settings.local_workers :]
            losses = hogwild_steps(self.learner, taken, self.settings.lr)
        else:
            losses = train_batches(self.learner, [self.batches.pop()])
        for edge in self.edges.values():
            if edge.phase == "training":
                edge.trained += len(losses)
                edge.train_loss.extend(losses)

    def advance(self) -> None:
        """Move each hyperedge on: send its change once its pass is trained, close it once every
        live member's change is in, give up on what the deadline has passed."""
        now = time.monotonic()
        for edge_id, since in list(self.early_since.items()):  # never told of it (or it was left): forgotten after the timeout
            if edge_id in self.edges or now - since > self.settings.hyperedge_timeout:
                del self.early_since[edge_id]
                if edge_id not in self.edges:
                    self.early.pop(edge_id, None)
        for edge in list(self.edges.values()):
            live = [name for name in edge.members if name in self.membership.peers]
            if edge.phase == "starting" and self.settings.start == "mean" and now <= edge.deadline:
                self.begin_at_mean(edge)  # a member evicted since: its model is not waited for
            elif edge.phase == "starting" and (now > edge.deadline or self.settings.start == "source" and edge.source not in self.membership.peers):
                log.warning("%s: hyperedge %s: no start model from %s; leaving it", self.name, edge.id,
                            edge.source if self.settings.start == "source" else sorted(set(live) - set(edge.starts)))
                self.drop(edge)
            elif edge.phase == "training" and edge.trained >= self.edge_batches:
                self.send_delta(edge)
            elif edge.phase == "exchanging" and (all(name in edge.deltas for name in live) or now > edge.deadline):
                self.close(edge)

    # -- a hyperedge's steps -------------------------------------------------------------------

    def begin(self, edge: Edge, start: dict[str, np.ndarray] | None) -> None:
        """Move to the agreed start (unless training in another hyperedge) and count own training from here."""
        self.count_own_training()
        if start is not None and not any(other.phase != "starting" for other in self.edges.values() if other is not edge):
            load_state(self.model, start)
            self.snapshot = state_of(self.model)
        synchronised(self.learner)  # the proximal term's anchor: the model this hyperedge starts from
        self.ledger.open(edge.id, self.layout)
        edge.phase, edge.deadline = "training", float("inf")
        for message in self.early.pop(edge.id, {}).values():
            if message.kind == DELTA and message.sender in edge.members:
                self.take_delta(edge, message)
            else:  # came before the hyperedge did, from a party the hyperedge gives no such say
                self.endpoint.rejected("sender", f"{message.kind} for hyperedge {edge.id} from {message.sender}, not its source or a member")

    def begin_at_mean(self, edge: Edge) -> None:
        """--start mean: once every live member's model is in, begin from their sample-weighted mean
        (summed in the order of the members' names, so every member starts from the same model)."""
        live = [name for name in edge.members if name in self.membership.peers]
        if not all(name in edge.starts for name in live):
            return
        names = sorted([self.name, *live])
        weights = {self.name: len(self.share), **edge.weights}
        self.begin(edge, weighted_average([edge.starts[name] for name in names], [float(weights[name]) for name in names]))
        edge.starts = {}

    def send_delta(self, edge: Edge) -> None:
        self.count_own_training()
        sparse = sparsify(self.ledger.own(edge.id), self.settings.sparsity)
        edge.own_sent = densify(sparse, self.layout)
        for name in edge.members:
            if self.membership.send_to(name, DELTA, to_wire(sparse), edge=edge.id):
                self.counted["sent"].inc()
        edge.phase, edge.deadline = "exchanging", time.monotonic() + self.settings.hyperedge_timeout
        if self.settings.async_mid:
            for name in list(edge.deltas):
                self.apply_early(edge, name)

    def close(self, edge: Edge) -> None:
        """Add the hyperedge's mean change less this peer's own (less what --async-mid applied
        already). The hyperedge that ends an epoch scores the model before and after."""
        self.count_own_training()
        ends_epoch = (self.closed + 1) % self.settings.syncs_per_epoch == 0
        before = scored(self.model, self.test, self.settings, self.loss_of, self.compute) if ends_epoch else None
        present = [name for name in edge.members if name in edge.deltas]
        weights = [float(len(self.share))] + [float(edge.weights[name]) for name in present]
        correction = self.ledger.close(edge.id, edge.own_sent, [edge.own_sent, *(edge.deltas[name] for name in present)], weights)
        for name, weight in edge.applied.items():
            for key, change in edge.deltas[name].items():
                correction[key] = correction[key] - (weight * change).astype(change.dtype)
        self.add(correction)
        synchronised(self.learner)
        self.end(edge)
        self.counted["averaged"].inc(len(present))
        self.closed += 1
        edge.averaged = len(present)
        self.epoch_edges.append(edge)
        if ends_epoch:
            self.record_epoch(before, scored(self.model, self.test, self.settings, self.loss_of, self.compute))

    def apply_early(self, edge: Edge, name: str) -> None:
        """--async-mid: a member's change goes into the model as it arrives, weighted by its share of
        every member's samples; `close` makes the weights right for whoever did come."""
        weight = edge.weights[name] / (len(self.share) + sum(edge.weights.values()))
        self.count_own_training()
        self.add({key: (weight * change).astype(change.dtype) for key, change in edge.deltas[name].items()})
        edge.applied[name] = weight

    def drop(self, edge: Edge) -> None:
        self.ledger.discard(edge.id)
        self.end(edge)

    def end(self, edge: Edge) -> None:
        del self.edges[edge.id]
        self.ended.add(edge.id)
        self.active.set(len(self.edges))

    def record_epoch(self, before: train.Evaluation, after: train.Evaluation) -> None:
        """An epoch's hyperedges are closed: one record, naming the last of them (whose close the scores straddle)."""
        edges, self.epoch_edges = self.epoch_edges, []
        losses = [loss for edge in edges for loss in edge.train_loss]
        averaged = sum(edge.averaged for edge in edges)
        self.record({"edge": edges[-1].id, "train_loss": float(np.mean(losses)) if losses else None, "averaged": averaged, "staleness": 0.0,
                     "seconds": time.perf_counter() - edges[0].started}, before, after)
        log.info("%s epoch %d of %d (%d hyperedges, the last %s): accuracy %.4f before synchronising, %.4f after (%d changes)", self.name,
                 len(self.history), self.settings.hyperepochs, len(edges), edges[-1].id, before.accuracy, after.accuracy, averaged)

    # -- the model -----------------------------------------------------------------------------

    def count_own_training(self) -> None:
        """Credit the training since the last count to every open hyperedge, before anything that
        is not own training (a start, a correction) changes the model."""
        state = state_of(self.model)
        if self.ledger.edges:
            self.ledger.record({name: state[name] - self.snapshot[name] for name in state})
        self.snapshot = state

    def add(self, change: dict[str, np.ndarray]) -> None:
        with torch.no_grad():
            for name, tensor in self.model.state_dict().items():
                tensor.add_(from_numpy(np.ascontiguousarray(change[name]), tensor.device))
        self.snapshot = state_of(self.model)

    # -- messages ------------------------------------------------------------------------------

    def check(self, message: Message) -> None:
        if message.kind in (MEMBERS, REFUSED):
            self.membership.check(message)
        elif message.kind == HYPEREDGE:
            self.check_hyperedge(message)
        else:
            self.membership.incarnation_of(message)
            edge_id = message.meta.get("edge")
            if not isinstance(edge_id, str) or len(edge_id) > 64:
                raise ProtocolError("malformed", f"{message.kind} names no hyperedge")
            if edge_id in self.ended:
                raise ProtocolError("stale", f"{message.kind} from {message.sender} for hyperedge {edge_id}, which ended here")
            edge = self.edges.get(edge_id)
            if message.kind == START:
                check_tensors(message, self.specs)
                if edge is not None and self.settings.start == "source" and (edge.phase != "starting" or edge.source != message.sender):
                    raise ProtocolError("sender", f"start of hyperedge {edge_id} from {message.sender}, not its source, or too late")
                if edge is not None and self.settings.start == "mean" and (edge.phase != "starting" or message.sender not in edge.members or message.sender in edge.starts):
                    raise ProtocolError("sender", f"start model for hyperedge {edge_id} from {message.sender}: not a member, already had, or too late")
            else:
                if edge is not None and (message.sender not in edge.members or message.sender in edge.deltas):
                    raise ProtocolError("duplicate", f"change from {message.sender} for hyperedge {edge_id}: not a member, or already had")
                try:
                    message.tensors = densify(from_wire(message.tensors), self.layout)
                except ValueError as exc:
                    raise ProtocolError("shape", f"change from {message.sender}: {exc}") from None
            if edge is None and len(self.early) >= 4 * self.settings.max_hyperedges:
                raise ProtocolError("kind", f"{message.kind} for hyperedge {edge_id}, which this peer was not told of")

    def check_hyperedge(self, message: Message) -> None:
        members, source, edge_id = message.meta.get("members"), message.meta.get("source"), message.meta.get("edge")
        if message.sender != TRACKER:
            raise ProtocolError("sender", f"hyperedge from {message.sender}")
        if not isinstance(members, list) or not 1 <= len(members) <= self.settings.hyperedge_size or self.name not in members or source not in members:
            raise ProtocolError("malformed", f"a hyperedge of at most {self.settings.hyperedge_size} peers with this one and its source among them")
        if not isinstance(edge_id, str) or edge_id in self.edges or edge_id in self.ended or len(edge_id) > 64:
            raise ProtocolError("duplicate", f"hyperedge {str(edge_id)[:64]!r} already open here")


    def handle(self, message: Message) -> None:
        if message.kind == MEMBERS:
            self.membership.follow(message)
            if not self.membership.registered():  # registering again (a new tracker): its want is asked again too
                self.asked = None
        elif message.kind == REFUSED:
            self.refused(message)
        elif message.kind == HYPEREDGE:
            self.asked = None
            # The tracker lists every peer before drawing it, so a member not listed now has gone since.
            others = [name for name in message.meta["members"] if name != self.name and name in self.membership.peers]
            # Weighted by the samples the tracker lists (not what a member claims), as listed now: a
            # member that finishes and leaves before this peer closes the hyperedge still counts.
            weights = {name: self.membership.peers[name]["samples"] for name in others}
            edge = Edge(message.meta["edge"], others, weights, message.meta["source"], time.monotonic() + self.settings.hyperedge_timeout)
            self.edges[edge.id] = edge
            self.active.set(len(self.edges))
            if self.settings.start == "mean":  # every member sends its model; all start from their weighted mean
                edge.starts[self.name] = state_of(self.model)
                for name in others:
                    self.membership.send_to(name, START, edge.starts[self.name], edge=edge.id)
                for name in others:
                    if (start := self.early.get(edge.id, {}).pop((START, name), None)) is not None:
                        edge.starts[name] = start.tensors
                self.begin_at_mean(edge)
            elif edge.source == self.name:
                for name in others:
                    self.membership.send_to(name, START, state_of(self.model), edge=edge.id)
                self.begin(edge, None)
            elif (start := self.early.get(edge.id, {}).pop((START, edge.source), None)) is not None:
                self.begin(edge, start.tensors)
        else:
            self.counted["received"].inc()
            edge = self.edges.get(message.meta["edge"])
            if edge is None:  # it can overtake the tracker's word of the hyperedge: kept, bounded
                self.early.setdefault(message.meta["edge"], {})[(message.kind, message.sender)] = message
                self.early_since.setdefault(message.meta["edge"], time.monotonic())
            elif message.kind == START and self.settings.start == "mean":
                edge.starts[message.sender] = message.tensors
                self.begin_at_mean(edge)
            elif message.kind == START:
                self.begin(edge, message.tensors)
            else:
                self.take_delta(edge, message)

    def take_delta(self, edge: Edge, message: Message) -> None:
        edge.deltas[message.sender] = message.tensors
        if self.settings.async_mid and edge.phase == "exchanging":
            self.apply_early(edge, message.sender)


def hogwild_steps(peer: Learner, batches: list[torch.Tensor], lr: float) -> list[float]:
    """Hogwild! (Recht et al. 2011): one thread per batch, each computing its gradient of the peer's
    local loss and stepping the shared parameters by plain SGD at `lr`, without locks. Gradients go
    through autograd.grad, not the shared .grad fields, so threads never mix each other's gradients."""
    model, compute = peer.model, peer.compute
    params = [p for p in model.parameters() if p.requires_grad]
    losses: list[float] = [0.0] * len(batches)

    def step(slot: int, indices: torch.Tensor) -> None:
        images, labels = peer.share.batch(indices)  # (B, C, H, W), (B,) on the device
        with compute.autocast():
            loss = peer.local_loss(model(images), labels)
        if peer.proximal is not None:
            loss = loss + peer.proximal()
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for param, grad in zip(params, grads):
                param.add_(grad, alpha=-lr)
        losses[slot] = loss.item()

    model.train()
    threads = [threading.Thread(target=step, args=(slot, indices)) for slot, indices in enumerate(batches)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return losses
