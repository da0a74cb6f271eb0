"""One party's end of the wire: frame and count what it sends; receive, validate, count and
reject what it gets. Every role talks through an Endpoint, so every role refuses bad input the
same way: a log line, a `splitfed_messages_rejected_total{reason}` increment, an ack (so the bad
frame is not redelivered), and on to the next message."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass

import numpy as np

from splitfed.observability import metrics
from splitfed.protocol import MAX_MESSAGE_BYTES, Message, ProtocolError, decode, encode
from splitfed.transport import Delivery, Transport

log = logging.getLogger(__name__)


class RoleTimeout(RuntimeError):
    """No acceptable message arrived in time: the peer is gone or the run is misconfigured."""


def queue_name(session: str, role: str, ident: str | None = None) -> str:
    return f"splitfed.{session}.{role}" + (f".{ident}" if ident else "")


@dataclass
class Traffic:
    messages: int = 0
    bytes: int = 0

    def add(self, size: int) -> None:
        self.messages += 1
        self.bytes += size


class Endpoint:
    def __init__(
        self,
        transport: Transport,
        *,
        session: str,
        role: str,
        inbox: str,
        timeout: float = 300.0,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
    ):
        self.transport = transport
        self.session = session
        self.role = role
        self.sender = role
        self.inbox = inbox
        self.timeout = timeout
        self.max_message_bytes = max_message_bytes
        self.traffic = Traffic()
        self._seq = 0
        self._next_seq: dict[str, int] = {}  # sender -> the sequence number expected next
        transport.declare(inbox)

    def rejected(self, reason: str, detail: str) -> None:
        metrics.REJECTED.labels(self.role, self.session, reason).inc()
        log.warning("%s rejected a message (%s): %s", self.role, reason, detail)

    def send(self, queue: str, kind: str, tensors: dict[str, np.ndarray] | None = None, **meta: object) -> Message:
        self._seq += 1
        message = Message(kind, self.session, self.sender, seq=self._seq, meta=meta, tensors=tensors or {})
        self.send_frame(queue, kind, encode(message))
        return message

    def send_frame(self, queue: str, kind: str, frame: bytes) -> None:
        self.transport.publish(queue, frame)
        self._count(kind, "sent", len(frame))

    def _count(self, kind: str, direction: str, size: int) -> None:
        metrics.MESSAGES.labels(self.role, self.session, kind, direction).inc()
        metrics.BYTES.labels(self.role, self.session, kind, direction).inc(size)
        self.traffic.add(size)

    def receive(
        self,
        kinds: Collection[str],
        senders: Collection[str],
        check: Callable[[Message], None] | None = None,
    ) -> tuple[Message, Delivery]:
        """The next message that passes every check, in sequence from its sender. The caller acks
        it when its work is done; anything refused on the way is acked and counted here."""
        deadline = time.monotonic() + self.timeout
        while (remaining := deadline - time.monotonic()) > 0:
            delivery = self.transport.receive(self.inbox, remaining)
            if delivery is None:
                break
            try:
                message = self.validate(delivery.body, kinds, senders, check)
            except ProtocolError as exc:
                self.rejected(exc.reason, exc.detail)
                self.transport.ack(delivery)
                continue
            self._next_seq[message.sender] = message.seq + 1
            self._count(message.kind, "received", len(delivery.body))
            return message, delivery
        raise RoleTimeout(f"{self.role}: no valid {'/'.join(kinds)} message on {self.inbox} within {self.timeout:.0f}s")

    def validate(
        self, frame: bytes, kinds: Collection[str], senders: Collection[str], check: Callable[[Message], None] | None
    ) -> Message:
        message = decode(frame, self.max_message_bytes)
        if message.session != self.session:
            raise ProtocolError("session", f"message for session {message.session!r}, this is {self.session!r}")
        if message.sender not in senders:
            raise ProtocolError("sender", f"unexpected sender {message.sender!r}")
        expected = self._next_seq.get(message.sender, 1)
        if message.seq < expected:
            raise ProtocolError("duplicate", f"seq {message.seq} from {message.sender} already seen (expecting {expected})")
        if message.seq > expected:
            raise ProtocolError("out-of-order", f"seq {message.seq} from {message.sender}, expecting {expected}")
        if message.kind not in kinds:
            raise ProtocolError("kind", f"{message.kind!r} where {'/'.join(kinds)} was expected")
        if check is not None:
            check(message)
        return message

    def ack(self, delivery: Delivery) -> None:
        self.transport.ack(delivery)
