"""p2p-peer: trains on its own share; --syncs-per-epoch times in each local epoch it sends its
model to every live peer the tracker lists and averages whatever models have arrived
(learning.peers.mix: weighted by samples, discounted by staleness), waiting for nobody, or for at
most --sync-wait seconds for the others' models of the same synchronisation. A peer that joins a
run under way first asks the most advanced live peer for its model (`fetch`) and starts from that."""

from __future__ import annotations

import logging
import time
import uuid

import numpy as np

from splitfed.learning import data, train
from splitfed.learning.device import state_of
from splitfed.learning.peers import Received, mix, scored, sync_chunks, synchronised, train_batches
from splitfed.learning.settings import P2PSettings
from splitfed.observability import metrics
from splitfed.protocol import Message, ProtocolError, check_tensors
from splitfed.roles.declaration import Identity, Progress, ProgressSink
from splitfed.roles.endpoint import RoleTimeout
from splitfed.roles.limits import message_bytes
from splitfed.roles.p2p.common import FETCH, MEMBERS, MODEL, P2P_PEER, REFUSED, count, peer_name, peer_queue
from splitfed.roles.p2p.peering import POLL_SECONDS, Peer
from splitfed.transport import Transport

log = logging.getLogger(__name__)


class P2PPeer(Peer):
    KINDS = (MEMBERS, REFUSED, MODEL, FETCH)

    def __init__(self, settings: P2PSettings, deployment, transport: Transport, identity: Identity = Identity(), on_progress: ProgressSink | None = None):  # noqa: ANN001 (roles.p2p.PeerDeployment)
        super().__init__(P2P_PEER, settings, deployment, transport, identity, on_progress, settings.epochs)
        self.peer_timeout = deployment.peer_timeout
        self.syncs = 0  # synchronisations done (a late joiner starts from those of the model it fetched)
        self.received: dict[str, Received] = {}  # the newest model from each peer since the last average
        self.held: dict[str, Received] = {}  # with --sync-wait: models of a later synchronisation than this peer's next, kept for it
        self.last_sync: dict[tuple[str, str], int] = {}  # (peer, incarnation) -> the newest synchronisation taken from it
        self.ever_listed: set[str] = set()  # peers the tracker has listed: one no longer listed has left or was evicted
        self.published: Received | None = None  # this peer's model after its last average: what a fetch gets
        self.fetch_nonce: str | None = None
        self.fetched: Received | None = None
        self.staleness = metrics.PEER_STALENESS.labels(P2P_PEER, self.session)

    def largest_message(self) -> int:
        """A peer's model, sent at a synchronisation or in answer to a fetch."""
        return message_bytes(self.specs)

    # -- the run, top to bottom ----------------------------------------------------------------

    def train(self) -> dict:
        self.join()
        first = self.membership.epoch + 1
        for epoch in range(first, first + self.settings.epochs):
            started = time.perf_counter()
            parts = sync_chunks(data.batch_order(len(self.share), self.settings.batch_size, self.learner.generator), self.settings.syncs_per_epoch)
            losses, kept, dropped, staleness = [], 0, 0, 0
            for part, batches in enumerate(parts, 1):
                losses += train_batches(self.learner, batches, self.after_batch)
                if part == len(parts):  # scored once an epoch, at its last synchronisation
                    before = scored(self.model, self.test, self.settings, self.loss_of, self.compute)
                models_in, models_dropped = self.synchronise()
                kept, dropped = kept + len(models_in), dropped + len(models_dropped)
                staleness = max([staleness, *(self.syncs - model.sync for model in models_in)])
            after = scored(self.model, self.test, self.settings, self.loss_of, self.compute)
            self.record_epoch(epoch, before, after, float(np.mean(losses)) if losses else None, kept, dropped, staleness, time.perf_counter() - started)
        self.poll(until=time.monotonic())  # fetches and frames that came during the last epoch are answered and counted
        self.membership.leave()
        log.info("%s done: %d epochs, accuracy %.4f", self.name, self.settings.epochs, self.history[-1]["accuracy"])
        return self.result()

    def join(self) -> None:
        """Register; if the run is under way, start from the model of the most advanced live peer
        that answers (a fresh model averaged into trained ones drags them down)."""
        self.membership.register()
        deadline = time.monotonic() + self.endpoint.timeout
        while not self.membership.registered():
            if time.monotonic() > deadline:
                raise RoleTimeout(f"{self.name}: no answer from the tracker within {self.endpoint.timeout:.0f}s")
            self.poll(until=time.monotonic() + POLL_SECONDS)
        ahead = sorted(((entry["epoch"], name) for name, entry in self.membership.peers.items() if entry["epoch"] > 0), reverse=True)
        for _, name in ahead:
            if self.fetch_from(name):
                synchronised(self.learner, self.fetched.state)
                self.syncs = self.fetched.sync
                self.membership.epoch = self.fetched.sync // self.settings.syncs_per_epoch
                log.info("%s starts from %s's model of synchronisation %d", self.name, name, self.fetched.sync)
                return

    def fetch_from(self, name: str) -> bool:
        self.fetch_nonce = uuid.uuid4().hex
        if not self.membership.send_to(name, FETCH, nonce=self.fetch_nonce):
            return False
        deadline = time.monotonic() + self.peer_timeout
        while self.fetched is None and time.monotonic() < deadline and name in self.membership.peers:
            self.poll(until=min(deadline, time.monotonic() + POLL_SECONDS), done=lambda: self.fetched is not None)
        return self.fetched is not None

    def after_batch(self, loss: float) -> None:
        self.poll_if_due()  # fetches are answered and models kept while training
        if self.on_progress:
            self.on_progress(Progress("batch", self.syncs, self.settings.epochs * self.settings.syncs_per_epoch, loss))

    def synchronise(self) -> tuple[list[Received], list[Received]]:
        """Send this peer's model to every live peer, take what has arrived (having waited up to
        --sync-wait for the others' models of this synchronisation), average: (kept, dropped)."""
        own = Received(self.name, self.syncs + 1, len(self.share), state_of(self.model))
        self.send_model(own.state, own.sync)
        if self.settings.sync_wait > 0:
            deadline = time.monotonic() + self.settings.sync_wait
            while not self.heard_from_all() and time.monotonic() < deadline:
                self.poll(until=min(deadline, time.monotonic() + POLL_SECONDS), done=self.heard_from_all)
        self.poll(until=time.monotonic())  # whatever else has arrived by now; nobody is waited for
        average, kept, dropped = mix(own, list(self.received.values()), self.settings)
        synchronised(self.learner, average)
        self.syncs = own.sync
        self.received = {name: self.held.pop(name) for name, model in list(self.held.items()) if model.sync <= self.syncs + 1}
        self.published = Received(self.name, self.syncs, len(self.share), average)
        return kept, dropped

    def heard_from_all(self) -> bool:
        """Whether every other peer of the run that has not left (or been evicted) has sent its
        model of this peer's next synchronisation."""
        expected = {peer_name(P2P_PEER, index) for index in range(self.settings.peers)} - {self.name} - (self.ever_listed - set(self.membership.peers))
        return all(name in self.received and self.received[name].sync > self.syncs for name in expected)

    def record_epoch(self, epoch: int, before: train.Evaluation, after: train.Evaluation, train_loss: float | None, kept: int, dropped: int, staleness: int,
                     seconds: float) -> None:
        """`kept`, `dropped`: models averaged and dropped over the epoch's synchronisations; `staleness`: the most synchronisations an averaged model was behind."""
        self.staleness.set(staleness)
        self.counted["averaged"].inc(kept)
        self.counted["dropped"].inc(dropped)
        self.record({"epoch": epoch, "train_loss": train_loss, "averaged": kept, "staleness": staleness, "seconds": seconds}, before, after)
        log.info("%s epoch %d: accuracy %.4f before its last average, %.4f after (%d models in %d synchronisations, %d dropped as stale)", self.name, epoch,
                 before.accuracy, after.accuracy, kept, self.settings.syncs_per_epoch, dropped)

    # -- messages ------------------------------------------------------------------------------

    def send_model(self, state: dict, sync: int) -> None:
        """The same model to every live peer: serialised once, numbered and signed for each; a peer
        whose queue is gone (it died and the queue expired) is skipped."""
        batch = [(peer_queue(self.session, name), Message(MODEL, "", "", meta={"incarnation": self.membership.incarnation, "sync": sync}, tensors=state), None)
                 for name in sorted(self.membership.peers)]
        sent = self.endpoint.send_messages(batch, unreachable=lambda queue, exc: log.warning("%s: cannot reach %s: %s", self.name, queue, exc))
        self.counted["sent"].inc(len(sent))

    def check(self, message: Message) -> None:
        if message.kind in (MEMBERS, REFUSED):
            self.membership.check(message)
            return
        incarnation = self.membership.incarnation_of(message)
        if message.kind == FETCH:
            if not isinstance(message.meta.get("nonce"), str):
                raise ProtocolError("malformed", "fetch needs a nonce")
            return
        sync = count(message.meta, "sync", 1)
        if "ref" in message.meta:  # the answer to a fetch: it may repeat the model its sender has just sent everyone
            if message.meta["ref"] != self.fetch_nonce or self.fetch_nonce is None:
                raise ProtocolError("stale", f"model from {message.sender} answers a fetch this peer is not waiting for (any more)")
        elif sync <= self.last_sync.get((message.sender, incarnation), 0):
            raise ProtocolError("duplicate", f"model of synchronisation {sync} from {message.sender} is not newer than one already taken")
        check_tensors(message, self.specs)

    def handle(self, message: Message) -> None:
        if message.kind == MEMBERS:
            self.membership.follow(message)
            self.ever_listed |= set(self.membership.peers)
        elif message.kind == REFUSED:
            self.refused(message)
        elif message.kind == FETCH:
            if self.published is not None:
                self.membership.send_to(message.sender, MODEL, self.published.state, sync=self.published.sync, ref=message.meta["nonce"])
        else:
            # Weighted by the samples the tracker lists for it, not by what the model claims.
            model = Received(message.sender, message.meta["sync"], self.membership.peers[message.sender]["samples"], message.tensors)
            self.counted["received"].inc()
            if "ref" in message.meta:
                self.fetched, self.fetch_nonce = model, None
            else:
                self.last_sync[(message.sender, message.meta["incarnation"])] = model.sync
                if self.settings.sync_wait > 0 and model.sync > self.syncs + 1:
                    # From a peer that has already averaged this peer's next synchronisation and trained on:
                    # it goes into the one after, so that peers waiting for each other average models of the same one.
                    self.held[message.sender] = model
                else:
                    self.received[message.sender] = model
