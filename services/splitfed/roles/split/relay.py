"""relay: forwards frames between the two halves of a split run, so neither half needs to know
where the other lives.

It validates framing, session and sender (the same Endpoint checks as every role), then forwards
the original bytes untouched. It follows the run the server's newest accepting hello names (by
the server's signed start time), and refuses messages of any other run as `replay`, so a frame
recorded in an earlier run (a `done` above all, which would end the relay) goes no further. It
keeps nothing else of a run: a restarted relay takes the run of the first run-bound message it gets (trust
on first use: the one moment a replay could mislead it) and goes on; sequence numbers are checked by the halves, which drop what a relay forwards
twice. It never imports torch, so its image stays small.

It holds no model either: each half's hello states the largest message that half accepts
(`receives`), and from the first hello on the relay accepts the larger of what the halves said.
A relay restarted mid-run sees no hello, and keeps its transport's limit.
"""

from __future__ import annotations

import logging

from splitfed.protocol import MAX_MESSAGE_BYTES, Message, ProtocolError
from splitfed.roles.base import Role
from splitfed.roles.declaration import Identity
from splitfed.roles.endpoint import Endpoint, queue_name
from splitfed.roles.limits import STATED_RANGE, stated_bytes
from splitfed.roles.split.common import CLIENT, DONE, HANDSHAKE, HELLO, KINDS, RELAY, SERVER
from splitfed.transport import Delivery, Transport

log = logging.getLogger(__name__)

ROUTES = {CLIENT: SERVER, SERVER: CLIENT}


class Relay(Role):
    def __init__(self, deployment, transport: Transport, identity: Identity = Identity()):  # noqa: ANN001 (roles.deployment.Service)
        """With a key list, only frames signed by a listed client or server are forwarded."""
        session = deployment.session
        self.endpoint = Endpoint(
            transport, session=session, role=RELAY, inbox=queue_name(session, RELAY), timeout=deployment.timeout, trusted=identity.trusted, peer_roles=tuple(ROUTES),
            ordered=False, max_message_bytes=MAX_MESSAGE_BYTES,  # until a half's hello says what it accepts (`handle`)
        )
        self.targets = {sender: queue_name(session, target) for sender, target in ROUTES.items()}
        for target in self.targets.values():
            transport.declare(target)
        self.forwarded = 0
        self.current_run: str | None = None  # the run being forwarded; None until a message names one
        self.receives: dict[str, int] = {}  # half -> the largest message its newest hello said it accepts
        self.current_started = float("-inf")  # its start, as the server's signed hello states it

    def run(self) -> dict:
        """Forward until the server's `done` has gone through: the session is over."""
        log.info("relay ready on %s", self.endpoint.inbox)
        self.consume()
        log.info("relay done after %d messages", self.forwarded)
        return {"forwarded": self.forwarded, "traffic": vars(self.endpoint.traffic)}

    def expecting(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        return KINDS, tuple(ROUTES)

    def check(self, message: Message) -> None:
        if message.kind == HELLO and stated_bytes(message.meta.get("receives")) is None:
            raise ProtocolError("malformed", f"a hello states the largest message its sender accepts, {STATED_RANGE} bytes")
        if message.kind in HANDSHAKE:
            return
        run = message.meta.get("run")
        if self.current_run is None and isinstance(run, str):
            self.current_run = run  # restarted mid-run: the first run-bound message says which run is on
        if run != self.current_run:
            raise ProtocolError("replay", f"{message.kind} from {message.sender} for run {run!r}, the relay forwards {self.current_run!r}")

    def handle(self, message: Message, delivery: Delivery) -> None:
        started = message.meta.get("started")
        if message.sender == SERVER and message.kind == HELLO and message.meta.get("ok") is True and isinstance(started, float) and started > self.current_started:
            self.current_run, self.current_started = message.meta.get("run"), started
        if message.kind == HELLO:  # before it is forwarded: what answers it may be as large as the halves accept
            self.receives[message.sender] = message.meta["receives"]
            self.endpoint.limit(max(self.receives.values()))
        self.endpoint.send_frame(self.targets[message.sender], message.kind, delivery.body)  # untouched: its signature covers it
        self.forwarded += 1
        self.finished = message.sender == SERVER and message.kind == DONE
