"""A peer's side of the tracker: register, follow the membership lists, beat, report, leave.
Shared by p2p-peer and smpl-peer; torch-free.

Heartbeats go out from a thread of their own, so that a long evaluation or a machine short of CPU
between two polls does not get a live peer evicted (the endpoint numbers and counts atomically,
and the transport hands its connection to one caller at a time)."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Collection

from splitfed.protocol import Message, ProtocolError
from splitfed.roles.endpoint import Endpoint
from splitfed.roles.p2p.common import (
    HEARTBEAT, LEAVE, REFUSED, REGISTER, REPORT, TRACKER, count, finite, fingerprint_of, heartbeat_period, incarnation_of, members_of, peer_queue,
    tracker_queue,
)
from splitfed.transport import TransportError

log = logging.getLogger(__name__)


class Membership:
    def __init__(self, endpoint: Endpoint, role: str, name: str, samples: int, planned: int, peer_timeout: float, fingerprint: dict):
        """`fingerprint`: this peer's model and classes (learning.tasks.fingerprint), which the
        tracker holds to the run's."""
        self.endpoint = endpoint
        self.role = role
        self.name = name
        self.samples = samples
        self.fingerprint = fingerprint
        self.planned = planned  # the epochs or hyperepochs this peer means to report
        self.tracker = tracker_queue(endpoint.session)
        self.incarnation = uuid.uuid4().hex  # this process: a restarted peer is another incarnation of its name
        self.period = heartbeat_period(peer_timeout)
        self.peers: dict[str, dict] = {}  # the other live peers: name -> {incarnation, epoch, samples}
        self.listed = (float("-inf"), -1)  # (tracker start, version) of the newest list followed
        self.nonce: str | None = None  # of the register waiting for its answer
        self.epoch = 0
        self.stopped = threading.Event()
        self.beating: threading.Thread | None = None

    # -- to the tracker ------------------------------------------------------------------------

    def register(self) -> None:
        """Announce this incarnation (again, if the tracker lost it); its answer is a members
        list carrying the register's nonce (`registered`), or `refused` if this peer's fingerprint
        is not the run's. Starts the heartbeats."""
        self.nonce = uuid.uuid4().hex
        self.send(self.tracker, REGISTER, started=time.time(), samples=self.samples, planned=self.planned, nonce=self.nonce,
                  fingerprint=self.fingerprint)
        if self.beating is None:
            self.beating = threading.Thread(target=self.beat, name=f"{self.name}-heartbeat", daemon=True)
            self.beating.start()

    def registered(self) -> bool:
        return self.nonce is None

    def beat(self) -> None:
        """Every --peer-timeout / 3 seconds until the peer stops; a transport that has stopped ends it."""
        while not self.stopped.wait(self.period):
            try:
                self.send(self.tracker, HEARTBEAT, epoch=self.epoch)
            except TransportError as exc:
                log.warning("%s: heartbeats stop: %s", self.name, exc)
                return

    def report(self, **record: object) -> None:
        self.send(self.tracker, REPORT, epoch=self.epoch, **record)

    def leave(self) -> None:
        self.stop()
        self.send(self.tracker, LEAVE)

    def stop(self) -> None:
        """No more heartbeats (the peer left, or failed: the tracker then evicts it)."""
        self.stopped.set()
        if self.beating is not None:
            self.beating.join()

    def send(self, queue: str, kind: str, tensors: dict | None = None, **meta: object) -> None:
        self.endpoint.send(queue, kind, tensors, incarnation=self.incarnation, **meta)

    # -- from the tracker ----------------------------------------------------------------------

    def check(self, message: Message) -> None:
        """A members list: from the tracker, well formed, newer than the one followed. A refusal:
        from the tracker, of the register waiting for its answer, with the run's fingerprint."""
        if message.sender != TRACKER:
            raise ProtocolError("sender", f"{message.kind} from {message.sender}")
        if message.kind == REFUSED:
            if self.nonce is None or message.meta.get("ref") != self.nonce:
                raise ProtocolError("stale", "refused answers a register this peer is not waiting on")
            fingerprint_of(message.meta)
            return
        started, version = finite(message.meta, "started"), count(message.meta, "version")
        members_of(message.meta, self.role)
        if (started, version) <= self.listed and message.meta.get("ref") != self.nonce:
            raise ProtocolError("duplicate", f"members version {version} is not newer than the list followed")

    def follow(self, message: Message) -> None:
        """Take the newer list. Not on it (evicted while alive, or a tracker that restarted and
        never heard of this peer): register again."""
        self.listed = (message.meta["started"], message.meta["version"])
        listed = message.meta["peers"]  # checked by `check`
        mine = listed.get(self.name)
        if message.meta.get("ref") == self.nonce and mine is not None:
            self.nonce = None
        self.peers = {name: entry for name, entry in listed.items() if name != self.name}
        if self.registered() and (mine is None or mine["incarnation"] != self.incarnation):
            log.warning("%s is not on the tracker's list: registering again", self.name)
            self.register()

    def incarnation_of(self, message: Message) -> str:
        """The sender's incarnation, which must be the live one the tracker lists; ProtocolError if not."""
        incarnation = incarnation_of(message.meta)
        entry = self.peers.get(message.sender)
        if entry is None or entry["incarnation"] != incarnation:
            raise ProtocolError("evicted", f"{message.kind} from {message.sender} ({incarnation[:8]}), which the tracker does not list as live")
        return incarnation

    # -- to and from other peers ---------------------------------------------------------------

    def send_to(self, name: str, kind: str, tensors: dict | None = None, **meta: object) -> bool:
        """False if `name`'s queue is gone (it died and its queue expired): nobody is waited for."""
        try:
            self.send(peer_queue(self.endpoint.session, name), kind, tensors, **meta)
        except TransportError as exc:
            log.warning("%s: cannot reach %s: %s", self.name, name, exc)
            return False
        return True

    def poll(self, until: float, kinds: Collection[str], check: Callable[[Message], None], handle: Callable[[Message], None],
             done: Callable[[], bool] | None = None) -> None:
        """Handle what is in the inbox, waiting for more until `until` (monotonic), or until `done()`
        says what was waited for has come. The peer drives
        its own run (training, averaging) and looks at its inbox between steps, for as long as it
        chooses: a driven exchange, not a receiving role's loop (`Role.consume`), which waits for
        messages until its work is done."""
        while True:
            received = self.endpoint.receive(kinds, None, check, wait=max(1e-3, until - time.monotonic()))
            if received is None:
                return
            message, delivery = received
            handle(message)
            self.endpoint.ack(delivery)
            if done is not None and done():
                return
