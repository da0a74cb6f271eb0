"""p2p-tracker: who is in a decentralized session. Peers register, beat, report and leave; the
tracker evicts a peer that misses its heartbeats for --peer-timeout and tells every live peer each
time the membership changes. Models never pass through it. For SMPL it also draws the hyperedges
(roles.p2p.hyperedges). No torch.

Each peer is known by its name (p2p-peer-I) and its incarnation (drawn when its process starts):
a restarted peer is a new incarnation that replaces the old one, and a register is accepted only if
it started later than the incarnation the tracker knows, so a replayed register cannot bring a dead
incarnation back. Heartbeats, reports and leaves must name the live incarnation.

Every register states the peer's fingerprint (its model's tensors and its classes). The first
register the tracker accepts fixes the run's; a peer whose fingerprint differs is refused (counted
under `fingerprint`, logged) and told the run's (`refused`), and it stops, saying how they differ."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from splitfed.learning.settings import HyperedgeSettings
from splitfed.observability import metrics
from splitfed.protocol import Message, ProtocolError
from splitfed.roles.base import Role
from splitfed.roles.declaration import Identity, Progress, ProgressSink
from splitfed.roles.endpoint import Endpoint, Rejection, RoleTimeout
from splitfed.roles.limits import FRAME_HEADER_BYTES
from splitfed.roles.p2p.common import (
    HEARTBEAT, LEAVE, MEMBERS, P2P_PEER, REFUSED, REGISTER, REPORT, SMPL_PEER, TRACKER, WANT, count, finite, fingerprint_of, fraction, incarnation_of,
    peer_queue, peer_role, tracker_queue,
)
from splitfed.roles.p2p.hyperedges import Matchmaker
from splitfed.transport import Delivery, Transport, TransportError

log = logging.getLogger(__name__)


@dataclass
class Member:
    """A peer as the tracker knows it."""

    incarnation: str
    started: float  # the peer's own start time, under its signature: orders its incarnations
    samples: int
    planned: int  # the epochs (or hyperepochs) it means to report
    last_seen: float  # monotonic, this process's clock
    epoch: int = 0
    state: str = "live"  # live | left | evicted
    history: list[dict] = field(default_factory=list)

    def entry(self) -> dict:
        return {"incarnation": self.incarnation, "epoch": self.epoch, "samples": self.samples}


class Tracker(Role):
    # A silent peer is evicted only once the inbox is drained: every heartbeat sent before now has
    # been handled, so its silence is real (a tracker that fell behind would otherwise evict peers
    # whose heartbeats are waiting in its queue).
    drains = True

    def __init__(self, settings: HyperedgeSettings, deployment, transport: Transport, identity: Identity = Identity(), on_progress: ProgressSink | None = None):  # noqa: ANN001 (roles.p2p.TrackerDeployment)
        self.session = deployment.session
        self.peer_timeout = deployment.peer_timeout
        self.expect_peers = deployment.expect_peers
        self.on_progress = on_progress
        self.endpoint = Endpoint(
            transport, session=self.session, role=TRACKER, inbox=tracker_queue(self.session), timeout=deployment.timeout,
            signer=identity.signer, trusted=identity.trusted, ordered=False, peer_roles=(P2P_PEER, SMPL_PEER), handshake=(REGISTER,),
            max_message_bytes=FRAME_HEADER_BYTES,  # everything it receives is metadata: models never pass through it
        )
        self.started = time.time()  # orders trackers: a peer follows the newest one's lists
        self.version = 0
        self.members: dict[str, Member] = {}  # every peer ever registered, by name: its newest incarnation
        self.fingerprint: dict | None = None  # the run's model and classes: the first registered peer's
        self.refused: set[str] = set()  # peers whose fingerprint was not the run's
        self.reports = 0
        self.matchmaker = Matchmaker(settings, self.send_hyperedge, self.expect_peers)
        self.live_gauge = metrics.LIVE_PEERS.labels(TRACKER, self.session)
        self.evicted_counter = metrics.PEERS_EVICTED.labels(TRACKER, self.session)
        self.hyperedges_gauge = metrics.HYPEREDGES_ACTIVE.labels(TRACKER, self.session)

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> dict:
        log.info("p2p-tracker ready (peer timeout %.1fs%s)", self.peer_timeout, f", expecting {self.expect_peers} peers" if self.expect_peers else "")
        self.consume()
        return self.result()

    def expecting(self) -> tuple[tuple[str, ...], None]:
        return (REGISTER, HEARTBEAT, REPORT, LEAVE, WANT), None

    @property
    def finished(self) -> bool:
        """With --expect-peers N: once N peers have registered and none is live any more."""
        return bool(self.expect_peers) and len(self.members) >= self.expect_peers and not self.live()

    def on_idle(self) -> None:
        self.evict_silent()

    def next_deadline(self) -> float | None:
        """When the live peer heard from longest ago is due for eviction (the drained inbox decides)."""
        return min((member.last_seen + self.peer_timeout for member in self.live().values()), default=None)

    def on_silence(self, seconds: float) -> None:
        """Without peers for --timeout, a tracker expecting some gives up; one that is not waits on."""
        if self.expect_peers and not self.live():
            raise RoleTimeout(f"p2p-tracker: no peer for {seconds:.0f}s ({len(self.members)} of {self.expect_peers} registered)")

    def live(self) -> dict[str, Member]:
        return {name: member for name, member in self.members.items() if member.state == "live"}

    # -- checks --------------------------------------------------------------------------------

    def check(self, message: Message) -> None:
        if peer_role(message.sender) not in (P2P_PEER, SMPL_PEER):
            raise ProtocolError("sender", f"{message.sender[:80]!r} is not a peer's name")
        incarnation = incarnation_of(message.meta)
        if message.kind == REGISTER:
            started = finite(message.meta, "started")
            samples = count(message.meta, "samples", 1)
            count(message.meta, "planned", 1)
            ceiling = self.endpoint.trusted.max_samples(message.sender) if self.endpoint.trusted is not None else None
            if ceiling is not None and samples > ceiling:
                raise ProtocolError("samples", f"{message.sender} claims {samples} samples; its key allows {ceiling}")
            if not isinstance(message.meta.get("nonce"), str) or started is None:
                raise ProtocolError("malformed", "register needs a nonce and a start time")
            known = self.members.get(message.sender)
            if known is not None and started <= known.started:
                raise ProtocolError("replay", f"register of {message.sender} started no later than its known incarnation")
            stated = fingerprint_of(message.meta)
            if self.fingerprint is not None and stated != self.fingerprint:
                differing = ", ".join(field for field in sorted(stated) if stated[field] != self.fingerprint[field])
                raise ProtocolError("fingerprint", f"register of {message.sender}: its model and classes are not the run's (its {differing} differ)")
            return
        member = self.members.get(message.sender)
        # Reports and leaves are taken from an evicted incarnation too (it was slow, not dead, and
        # says what it did); its heartbeats wait until it has registered again.
        if member is None or member.incarnation != incarnation or member.state != "live" and not (message.kind in (REPORT, LEAVE) and member.state == "evicted"):
            raise ProtocolError("evicted", f"{message.kind} from {message.sender} ({incarnation[:8]}), which is not a live peer here")
        if message.kind in (HEARTBEAT, REPORT):
            epoch = count(message.meta, "epoch")
            if message.kind == REPORT and epoch <= (member.history[-1]["epoch"] if member.history else 0):
                raise ProtocolError("duplicate", f"report of epoch {epoch} from {message.sender} already had")
        if message.kind == REPORT:
            count(message.meta, "test_samples")
            for name in ("accuracy_before", "accuracy"):
                fraction(message.meta, name)
            for name in ("loss", "train_loss", "seconds", "staleness"):
                finite(message.meta, name)
            count(message.meta, "averaged")
            if not (message.meta.get("edge") is None or isinstance(message.meta["edge"], str) and len(message.meta["edge"]) <= 64):
                raise ProtocolError("malformed", "a report's hyperedge is an id of at most 64 characters")
        if message.kind == WANT:
            self.matchmaker.check(message)

    def on_reject(self, rejection: Rejection) -> None:
        """A heartbeat from an incarnation the tracker does not list (evicted while alive, or a
        tracker restarted since it registered) gets the membership list: the peer sees it is not on
        it and registers again. A replayed heartbeat costs one message and changes nothing. A
        register whose fingerprint is not the run's is answered with the run's fingerprint."""
        message = rejection.message
        if rejection.reason == "evicted" and message is not None and message.kind == HEARTBEAT:
            self.send_members([message.sender], self.listing())
        if rejection.reason == "fingerprint" and message is not None:  # a register: the peer stops, told how it differs
            self.refused.add(message.sender)
            self.send(message.sender, REFUSED, ref=message.meta["nonce"], fingerprint=self.fingerprint)

    # -- what peers say ------------------------------------------------------------------------

    def handle(self, message: Message, delivery: Delivery) -> None:
        now = time.monotonic()
        if message.kind == REGISTER:
            self.register(message, now)
            return
        member = self.members[message.sender]
        member.last_seen = now
        if message.kind == HEARTBEAT:
            member.epoch = max(member.epoch, message.meta["epoch"])
        elif message.kind == REPORT:
            self.report(message.sender, member, message.meta)
        elif message.kind == LEAVE:
            was_live, member.state = member.state == "live", "left"  # an evicted peer that leaves was slow, not dead
            log.info("%s left after %d reports", message.sender, len(member.history))
            if was_live:
                self.changed(dropped=[message.sender])
        elif message.kind == WANT:
            self.matchmaker.want(message.sender, message.meta)
            self.matchmaker.form(set(self.live()), len(self.members))

    def register(self, message: Message, now: float) -> None:
        meta = message.meta
        if self.fingerprint is None:
            self.fingerprint = meta["fingerprint"]
            log.info("the run's model is %s (%d tensors, %d values) in %d classes, as %s registered it", self.fingerprint["model"],
                     self.fingerprint["tensors"], self.fingerprint["parameters"], len(self.fingerprint["classes"]), message.sender)
        previous = self.members.get(message.sender)
        self.members[message.sender] = Member(meta["incarnation"], meta["started"], meta["samples"], meta["planned"], now,
                                              history=previous.history if previous else [])
        self.endpoint.resync(message.sender)
        log.info("%s registered (incarnation %s, %d samples)%s", message.sender, meta["incarnation"][:8], meta["samples"],
                 " replacing an earlier incarnation" if previous and previous.state == "live" else "")
        self.changed(dropped=[message.sender] if previous and previous.state == "live" else [], answer=(message.sender, meta["nonce"]))

    def report(self, name: str, member: Member, meta: dict) -> None:
        record = {key: meta.get(key) for key in ("epoch", "accuracy_before", "accuracy", "loss", "test_samples", "train_loss", "averaged", "staleness",
                                                 "seconds", "edge")}
        member.history.append(record)
        self.matchmaker.report(name, meta.get("edge"))
        member.epoch = max(member.epoch, meta["epoch"])
        self.reports += 1
        if self.on_progress:
            planned = sum(m.planned for m in self.members.values())
            self.on_progress(Progress("round", self.reports, max(planned, self.reports), meta.get("train_loss") or 0.0,
                                      {"step": self.reports, "accuracy": meta.get("accuracy"), "loss": meta.get("loss"),
                                       "train_loss": meta.get("train_loss"), "seconds": meta.get("seconds") or 0.0, "peer": name}))

    def evict_silent(self) -> None:
        now = time.monotonic()
        silent = [name for name, member in self.live().items() if now - member.last_seen > self.peer_timeout]
        for name in silent:
            self.members[name].state = "evicted"
            self.evicted_counter.inc()
            log.warning("%s evicted: no heartbeat for %.1fs", name, self.peer_timeout)
        if silent:
            self.changed(dropped=silent)

    # -- what the tracker says -----------------------------------------------------------------

    def changed(self, dropped: list[str], answer: tuple[str, str] | None = None) -> None:
        """Membership changed: every live peer gets the new list (the one that registered last,
        with the nonce of its register), and the matchmaker forgets the peers that went."""
        self.version += 1
        live = self.live()
        self.live_gauge.set(len(live))
        self.matchmaker.drop(dropped, set(live), len(self.members))
        newcomer, nonce = answer or (None, None)
        listing = self.listing()
        self.send_members([name for name in live if name != newcomer], listing)
        if newcomer is not None:
            self.send_members([newcomer], listing, ref=nonce)
        self.hyperedges_gauge.set(self.matchmaker.active())

    def listing(self) -> dict[str, dict]:
        """What a members list says of each live peer."""
        return {name: member.entry() for name, member in self.live().items()}

    def send_members(self, names: list[str], listing: dict[str, dict], **extra: object) -> None:
        for name in names:
            self.send(name, MEMBERS, version=self.version, started=self.started, peers=listing, **extra)

    def send_hyperedge(self, name: str, kind: str, **meta: object) -> None:
        self.send(name, kind, **meta)
        self.hyperedges_gauge.set(self.matchmaker.active())

    def send(self, name: str, kind: str, **meta: object) -> None:
        """A peer whose queue is gone (it died long ago and the queue expired) is skipped: the
        tracker must not fail for one peer."""
        try:
            self.endpoint.send(peer_queue(self.session, name), kind, **meta)
        except TransportError as exc:
            log.warning("p2p-tracker: cannot reach %s: %s", name, exc)

    def result(self) -> dict:
        finished = {name: member for name, member in self.members.items() if member.history}
        finals = [member.history[-1]["accuracy"] for member in finished.values() if member.history[-1]["accuracy"] is not None]
        losses = [member.history[-1]["loss"] for member in finished.values() if member.history[-1]["loss"] is not None]
        return {
            "accuracy": sum(finals) / len(finals) if finals else None,
            "loss": sum(losses) / len(losses) if losses else None,
            "spread": max(finals) - min(finals) if finals else None,
            "history": by_epoch(self.members),
            "peers": {name: {"state": member.state, "samples": member.samples, **final_score(member), "history": member.history}
                      for name, member in sorted(self.members.items())},
            "evicted": sorted(name for name, member in self.members.items() if member.state == "evicted"),
            "refused": sorted(self.refused),
            "fingerprint": self.fingerprint,
            "traffic": vars(self.endpoint.traffic),
        }


def final_score(member: Member) -> dict:
    """A peer's figure: its last report's score of the model on its own test data."""
    last = member.history[-1] if member.history else {}
    return {"accuracy": last.get("accuracy"), "loss": last.get("loss"), "test_samples": last.get("test_samples")}


def by_epoch(members: dict[str, Member]) -> list[dict]:
    """The run's history as one line per epoch: the mean over the peers that reported it, and each
    peer's accuracy before and after averaging."""
    epochs = sorted({record["epoch"] for member in members.values() for record in member.history})
    lines = []
    for epoch in epochs:
        records = {name: record for name, member in sorted(members.items()) for record in member.history if record["epoch"] == epoch}

        def mean(key: str) -> float | None:
            values = [record[key] for record in records.values() if record[key] is not None]
            return sum(values) / len(values) if values else None

        after = [record["accuracy"] for record in records.values() if record["accuracy"] is not None]
        lines.append({
            "step": epoch, "accuracy": mean("accuracy"), "loss": mean("loss"), "train_loss": mean("train_loss"), "accuracy_before": mean("accuracy_before"),
            "seconds": max((record["seconds"] or 0.0) for record in records.values()), "spread": max(after) - min(after) if after else None,
            "peers": {name: {"before": record["accuracy_before"], "after": record["accuracy"]} for name, record in records.items()},
        })
    return lines
