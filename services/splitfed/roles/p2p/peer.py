"""p2p-peer: trains on its own share; after every local epoch it sends its model to every live
peer the tracker lists and averages whatever models have arrived (learning.peers.mix: weighted by
samples, discounted by staleness), never waiting for anyone. A peer that joins a run under way
first asks the most advanced live peer for its model (`fetch`) and starts from that."""

from __future__ import annotations

import logging
import time
import uuid

from splitfed.learning import data, train
from splitfed.learning.peers import Received, load_state, mix, scored, state_of
from splitfed.learning.settings import P2PSettings
from splitfed.observability import metrics
from splitfed.protocol import Message, ProtocolError, TensorSpec, check_tensors
from splitfed.roles.declaration import Identity, Progress, ProgressSink
from splitfed.roles.endpoint import RoleTimeout
from splitfed.roles.p2p.common import FETCH, MEMBERS, MODEL, P2P_PEER, REFUSED, count, peer_queue
from splitfed.roles.p2p.peering import POLL_SECONDS, Peer
from splitfed.transport import Transport

log = logging.getLogger(__name__)


class P2PPeer(Peer):
    KINDS = (MEMBERS, REFUSED, MODEL, FETCH)

    def __init__(self, settings: P2PSettings, deployment, transport: Transport, identity: Identity = Identity(), on_progress: ProgressSink | None = None):  # noqa: ANN001 (roles.p2p.PeerDeployment)
        super().__init__(P2P_PEER, settings, deployment, transport, identity, on_progress, settings.epochs)
        self.layout = {name: TensorSpec(value.dtype.name, value.shape) for name, value in state_of(self.model).items()}
        self.peer_timeout = deployment.peer_timeout
        self.received: dict[str, Received] = {}  # the newest model from each peer since the last average
        self.last_epoch: dict[tuple[str, str], int] = {}  # (peer, incarnation) -> the newest epoch taken from it
        self.published: Received | None = None  # this peer's model after its last average: what a fetch gets
        self.fetch_nonce: str | None = None
        self.fetched: Received | None = None
        self.staleness = metrics.PEER_STALENESS.labels(P2P_PEER, self.session)

    # -- the run, top to bottom ----------------------------------------------------------------

    def train(self) -> dict:
        self.join()
        first = self.membership.epoch + 1
        for epoch in range(first, first + self.settings.epochs):
            started = time.perf_counter()
            train_loss = self.train_epoch()
            before = scored(self.model, self.test, self.settings, self.loss_of, self.compute)
            own = state_of(self.model)
            self.send_model(own, epoch)
            self.poll(until=time.monotonic())  # whatever has arrived by now; nobody is waited for
            average, kept, dropped = mix(own, epoch, len(self.share), list(self.received.values()), self.settings)
            load_state(self.model, average)
            self.received = {}
            self.published = Received(self.name, epoch, len(self.share), average)
            after = scored(self.model, self.test, self.settings, self.loss_of, self.compute)
            self.record_epoch(epoch, before, after, train_loss, kept, dropped, time.perf_counter() - started)
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
                load_state(self.model, self.fetched.state)
                self.membership.epoch = self.fetched.epoch
                log.info("%s starts from %s's model of epoch %d", self.name, name, self.fetched.epoch)
                return

    def fetch_from(self, name: str) -> bool:
        self.fetch_nonce = uuid.uuid4().hex
        if not self.membership.send_to(name, FETCH, nonce=self.fetch_nonce):
            return False
        deadline = time.monotonic() + self.peer_timeout
        while self.fetched is None and time.monotonic() < deadline and name in self.membership.peers:
            self.poll(until=min(deadline, time.monotonic() + POLL_SECONDS))
        return self.fetched is not None

    def train_epoch(self) -> float:
        losses = []
        batches = data.batch_order(len(self.share), self.settings.batch_size, self.generator)
        for done, indices in enumerate(batches, 1):
            losses.append(train.train_step(self.model, self.opt, *self.share.batch(indices), self.loss_of, self.compute))  # (B, C, H, W), (B,)
            self.poll_if_due()  # fetches are answered and models kept while training
            if self.on_progress:
                self.on_progress(Progress("batch", done, len(batches), losses[-1]))
        return sum(losses) / len(losses)

    def record_epoch(self, epoch: int, before: train.Evaluation, after: train.Evaluation, train_loss: float, kept: list[Received], dropped: list[Received], seconds: float) -> None:
        staleness = max((max(0, epoch - model.epoch) for model in kept), default=0)
        self.staleness.set(staleness)
        self.counted["averaged"].inc(len(kept))
        self.counted["dropped"].inc(len(dropped))
        self.record({"epoch": epoch, "train_loss": train_loss, "averaged": len(kept), "staleness": staleness, "seconds": seconds}, before, after)
        log.info("%s epoch %d: accuracy %.4f before averaging, %.4f after (%d models, %d dropped as stale)", self.name, epoch, before.accuracy,
                 after.accuracy, len(kept), len(dropped))

    # -- messages ------------------------------------------------------------------------------

    def send_model(self, state: dict, epoch: int) -> None:
        """The same model to every live peer: serialised once, numbered and signed for each; a peer
        whose queue is gone (it died and the queue expired) is skipped."""
        batch = [(peer_queue(self.session, name), Message(MODEL, "", "", meta={"incarnation": self.membership.incarnation, "epoch": epoch}, tensors=state), None)
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
        epoch = count(message.meta, "epoch", 1)
        if "ref" in message.meta:  # the answer to a fetch: it may repeat the epoch its sender has just sent everyone
            if message.meta["ref"] != self.fetch_nonce or self.fetch_nonce is None:
                raise ProtocolError("stale", f"model from {message.sender} answers a fetch this peer is not waiting for (any more)")
        elif epoch <= self.last_epoch.get((message.sender, incarnation), 0):
            raise ProtocolError("duplicate", f"model of epoch {epoch} from {message.sender} is not newer than one already taken")
        check_tensors(message, self.layout)

    def handle(self, message: Message) -> None:
        if message.kind == MEMBERS:
            self.membership.follow(message)
        elif message.kind == REFUSED:
            self.refused(message)
        elif message.kind == FETCH:
            if self.published is not None:
                self.membership.send_to(message.sender, MODEL, self.published.state, epoch=self.published.epoch, ref=message.meta["nonce"])
        else:
            # Weighted by the samples the tracker lists for it, not by what the model claims.
            model = Received(message.sender, message.meta["epoch"], self.membership.peers[message.sender]["samples"], message.tensors)
            self.counted["received"].inc()
            if "ref" in message.meta:
                self.fetched, self.fetch_nonce = model, None
            else:
                self.last_epoch[(message.sender, message.meta["incarnation"])] = model.epoch
                self.received[message.sender] = model
