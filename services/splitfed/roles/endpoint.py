"""One party's end of the wire: frame and count what it sends; receive, validate, count and
reject what it gets. Every role talks through an Endpoint, so every role refuses bad input the
same way: a log line, a `splitfed_messages_rejected_total{reason}` increment, an ack (so the bad
frame is not redelivered), and on to the next message; and every role says the same way when
it runs without a key list (unsafe mode: a warning and `splitfed_unsafe_mode`).

A bound endpoint (`bind`) belongs to one run: every message it sends names the run and its
recipient (meta `run` and `to`, under the signature), and every message it accepts must name this
run and this party, so frames recorded in an earlier run of the same session are refused as
`replay`. Handshake kinds open a run and are exempt: they are neither bound nor in sequence.
Chunked messages are judged the same way by their first chunk (`admit`), before the transport
keeps any of them."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass

import numpy as np

from splitfed.observability import metrics
from splitfed.protocol import (
    MAX_MESSAGE_BYTES, Message, ProtocolError, body_digest, decode_header, decode_tensors, encode, encode_body, signed_header,
)
from splitfed.security.keys import KeyList, Signer
from splitfed.transport import ChunkRefused, Delivery, Transport, TransportError

log = logging.getLogger(__name__)


class RoleTimeout(RuntimeError):
    """No acceptable message arrived in time: the peer is gone or the run is misconfigured."""


def frame_digest(frame: bytes) -> str:
    """Names one frame, so a refusal can say which message it answers."""
    return hashlib.sha256(frame).hexdigest()


class Sent:
    """A message as it went out; `digest` is the frame_digest of what went on the wire, hashed
    when first asked for (most senders never ask), from the frame kept until then or given."""

    __slots__ = ("message", "_frame", "_digest")

    def __init__(self, message: Message, frame: bytes | None = None, *, digest: str | None = None):
        if (frame is None) == (digest is None):
            raise ValueError("a Sent needs its frame or its digest")
        self.message, self._frame, self._digest = message, frame, digest

    @property
    def digest(self) -> str:
        if self._digest is None:
            self._digest, self._frame = frame_digest(self._frame), None
        return self._digest

    def __repr__(self) -> str:
        return f"Sent({self.message.kind!r} seq {self.message.seq}, digest {self.digest[:12]}...)"


@dataclass(frozen=True)
class Rejection:
    """A refused frame, as a role's `on_reject` hook sees it."""

    reason: str
    detail: str
    message: Message | None  # None when the frame did not even decode
    digest: str


def queue_name(session: str, role: str, ident: str | None = None) -> str:
    return f"splitfed.{session}.{role}" + (f".{ident}" if ident else "")


@dataclass
class Traffic:
    messages: int = 0
    bytes: int = 0

    def add(self, size: int) -> None:
        self.messages += 1
        self.bytes += size


def _header_of(frame: bytes) -> Message | None:
    """What a refused frame says about itself, if that much of it is readable."""
    try:
        return decode_header(frame)[0]
    except ProtocolError:
        return None


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
        signer: Signer | None = None,
        trusted: KeyList | None = None,
        ordered: bool = True,
        durable: bool = False,
        name: str | None = None,
        on_arrival: Callable[[], None] | None = None,
        peer_roles: Collection[str] = (),
        handshake: Collection[str] = (),
    ):
        """`name` is this party's sender id (default: the role); `signer` signs what it sends;
        `trusted` lists whose signed messages it accepts (None: unsafe mode, anyone).
        `ordered`: each sender numbers its messages to each recipient 1, 2, 3... and anything else is a duplicate
        or out of order; roles that deduplicate by round instead turn it off. `on_arrival` is
        called for every frame that arrives, valid or not. `peer_roles`: with a key list, a
        sender's key must be allowed to act as one of these roles. `handshake`: kinds that open a
        run (exempt from run binding and sequence; the role calls `resync` when it accepts one)."""
        self.transport = transport
        self.session = session
        self.role = role
        self.sender = name or role
        if signer is not None and signer.party != self.sender:
            raise ValueError(f"the private key is for {signer.party!r}, but this party is {self.sender!r}")
        self.signer = signer
        self.trusted = trusted
        self.ordered = ordered
        self.inbox = inbox
        self.timeout = timeout
        self.traffic = Traffic()
        self.on_arrival = on_arrival
        self.peer_roles = tuple(peer_roles)
        self.handshake = tuple(handshake)
        self.run: str | None = None  # see `bind`
        self._seq: dict[str | None, int] = {}  # recipient -> the last number sent to it: each receiver sees 1, 2, 3...
        self._next_seq: dict[str, int] = {}  # sender -> the sequence number expected next
        self._counters: dict[tuple[str, str], tuple] = {}  # (kind, direction) -> MESSAGES and BYTES children
        # Numbering and counting are atomic, so a role may send from a second thread (a peer's
        # heartbeats); the transport hands its connection to one caller at a time itself.
        self._numbering = threading.Lock()
        metrics.UNSAFE_MODE.labels(role, session).set(trusted is None)
        if trusted is None:
            log.warning("%s is running in **** UNSAFE MODE ****: no key list, messages are not authenticated", self.sender)
        transport.declare(inbox, durable=durable)
        self.limit(max_message_bytes)

    def limit(self, max_message_bytes: int) -> None:
        """Accept messages of at most `max_message_bytes` from now on: the largest this role can
        legitimately receive (roles.limits), which a role that learns its model's shapes only
        after it starts (from a hello) raises then."""
        self.max_message_bytes = max_message_bytes
        # Oversized messages are refused before their chunks are put together, and refusals below
        # the protocol (bad or abandoned chunks) are counted like any other.
        # With a key list, a chunked message is judged by its signed first chunk before any of it is kept.
        self.transport.watch(self.inbox, max_bytes=max_message_bytes, on_reject=self.rejected, admit=self.admit if self.trusted is not None else None)

    def bind(self, run: str) -> None:
        """From now on, send and accept only messages of `run` (handshakes aside)."""
        self.run = run

    def resync(self, sender: str) -> None:
        """An accepted handshake starts its sender's numbered messages afresh, from 1."""
        self._next_seq[sender] = 1

    def rejected(self, reason: str, detail: str) -> None:
        metrics.REJECTED.labels(self.role, self.session, reason).inc()
        log.warning("%s rejected a message (%s): %s", self.role, reason, detail)

    def send(self, queue: str, kind: str, tensors: dict[str, np.ndarray] | None = None, *, to: str | None = None, **meta: object) -> Sent:
        """`to`: the recipient, which a bound endpoint names with its run in every message."""
        return self.send_message(queue, Message(kind, self.session, self.sender, meta=meta, tensors=tensors or {}), to=to)

    def send_message(self, queue: str, message: Message, *, to: str | None = None, persistent: bool = False, must_exist: bool = False) -> Sent:
        """Number, bind, sign and send `message` (its kind, round, meta and tensors set by the caller).
        Handshakes go out unnumbered (seq 0): a receiver may refuse them (an answer to another
        hello), and a number it never accepts would leave a gap in the sequence."""
        frame = self._frame(message, to)
        self.send_frame(queue, message.kind, frame, persistent=persistent, must_exist=must_exist)
        return Sent(message, frame)

    def send_messages(
        self, batch: list[tuple[str, Message, str | None]], *, persistent: bool = False, unreachable: Callable[[str, TransportError], None] | None = None,
    ) -> list[Sent]:
        """`send_message` for many (queue, message, recipient), e.g. one model to every sampled
        worker: messages that share one tensors dict share one encoded body and its digest, so
        the model is serialised and hashed once, not once per worker; each is still numbered,
        bound and signed for its recipient. `unreachable(queue, error)`: told of a queue the
        transport cannot deliver to, and the rest are still sent (without it, the error stops them)."""
        bodies: dict[int, tuple[bytes, bytes | None]] = {}  # id(tensors) -> (body, digest); the dicts stay alive in `batch`
        sent = []
        for queue, message, to in batch:
            frame = self._frame(message, to, bodies)
            try:
                self.send_frame(queue, message.kind, frame, persistent=persistent)
            except TransportError as exc:
                if unreachable is None:
                    raise
                unreachable(queue, exc)
                continue
            sent.append(Sent(message, digest=frame_digest(frame)))  # hashed now: holding every frame till the end would hold a model per worker
        return sent

    def _frame(self, message: Message, to: str | None, bodies: dict[int, tuple[bytes, bytes | None]] | None = None) -> bytes:
        """Number, bind and sign `message`; its frame. `bodies`: encoded bodies to reuse, by the
        identity of the tensors dict they were made from. The body is hashed only to be signed:
        an unsigned frame states no digest, and nothing else reads it."""
        handshake = message.kind in self.handshake
        with self._numbering:
            if not handshake:
                self._seq[to] = self._seq.get(to, 0) + 1
            message.seq = 0 if handshake else self._seq[to]
        message.session, message.sender = self.session, self.sender
        if self.run is not None and not handshake:
            if to is None:
                raise ValueError(f"{self.sender}: a bound {message.kind} must name its recipient")
            message.meta.update(run=self.run, to=to)
        if bodies is not None and id(message.tensors) in bodies:
            body, digest = bodies[id(message.tensors)]
        else:
            body = encode_body(message.tensors)
            digest = body_digest(body) if self.signer else None
            if bodies is not None:
                bodies[id(message.tensors)] = body, digest
        if self.signer:
            message.sig = self.signer.sign(signed_header(message, digest))
        return encode(message, body, digest)

    def send_frame(self, queue: str, kind: str, frame: bytes, *, persistent: bool = False, must_exist: bool = False) -> None:
        """`must_exist`: TransportError rather than creating `queue` where the transport would."""
        self.transport.publish(queue, frame, persistent=persistent, must_exist=must_exist)
        self._count(kind, "sent", len(frame))

    def _count(self, kind: str, direction: str, size: int) -> None:
        counters = self._counters.get((kind, direction))
        if counters is None:  # the labelled children, looked up once per kind and direction
            labels = (self.role, self.session, kind, direction)
            counters = self._counters[(kind, direction)] = (metrics.MESSAGES.labels(*labels), metrics.BYTES.labels(*labels))
        counters[0].inc()
        counters[1].inc(size)
        with self._numbering:
            self.traffic.add(size)

    def receive(
        self,
        kinds: Collection[str],
        senders: Collection[str] | None,
        check: Callable[[Message], None] | None = None,
        on_reject: Callable[[Rejection], None] | None = None,
        wait: float | None = None,
    ) -> tuple[Message, Delivery] | None:
        """The next message that passes every check, in sequence from its sender (`senders` None:
        from anyone the key list allows). The caller acks it when its work is done; anything
        refused on the way is acked and counted here. Gives up after the endpoint's timeout
        (RoleTimeout) or, when `wait` is given, after `wait` seconds (None)."""
        deadline = time.monotonic() + (self.timeout if wait is None else wait)
        while (remaining := deadline - time.monotonic()) > 0:
            delivery = self.transport.receive(self.inbox, remaining)
            if delivery is None:
                break
            if self.on_arrival:
                self.on_arrival()
            try:
                message = self.validate(delivery.body, kinds, senders, check)
            except ProtocolError as exc:
                self.rejected(exc.reason, exc.detail)
                self.transport.ack(delivery)
                if on_reject:
                    on_reject(Rejection(exc.reason, exc.detail, _header_of(delivery.body), frame_digest(delivery.body)))
                continue
            if self.ordered and message.kind not in self.handshake:
                self._next_seq[message.sender] = message.seq + 1
            self._count(message.kind, "received", len(delivery.body))
            return message, delivery
        if wait is not None:
            return None
        raise RoleTimeout(f"{self.role}: no valid {'/'.join(kinds)} message on {self.inbox} within {self.timeout:.0f}s")

    def validate(
        self, frame: bytes, kinds: Collection[str], senders: Collection[str] | None, check: Callable[[Message], None] | None
    ) -> Message:
        """The message in `frame` if it passes every check `receive` applies; ProtocolError if not.
        Who sent it (session, sender, key list, signature over the header and the body's digest)
        is checked before the body is parsed: an unsigned frame costs a hash, not a parse.
        Without a key list nothing is signed, so the body is not hashed.
        Sequence numbers are checked but not advanced."""
        message, body = decode_header(frame, self.max_message_bytes)
        self._check_origin(message, body_digest(body) if self.trusted is not None else b"", senders)
        message.tensors = decode_tensors(body)
        self._check_content(message, kinds, check)
        return message

    def admit(self, first_chunk: bytes) -> str:
        """The sender of a chunked message, judged on its first chunk before the transport keeps
        any of it: the whole header must be there, signed by a listed party for this run (over
        the body digest the header states; the whole body is checked against it on arrival), and
        not a message already received. Runs on whichever thread drives the transport's connection
        (its I/O thread, or a caller waiting on it)."""
        try:
            message, _ = decode_header(first_chunk, self.max_message_bytes)
            try:
                digest = bytes.fromhex(message.digest or "")
            except ValueError:
                raise ProtocolError("malformed", "header field 'digest' is not hex") from None
            self._check_origin(message, digest, None)
            self._check_sequence(message, whole=False)
        except ProtocolError as exc:
            raise ChunkRefused(exc.reason, exc.detail) from None
        return message.sender

    def _check_origin(self, message: Message, digest: bytes, senders: Collection[str] | None) -> None:
        if message.session != self.session:
            raise ProtocolError("session", f"message for session {message.session!r}, this is {self.session!r}")
        if senders is not None and message.sender not in senders:
            raise ProtocolError("sender", f"unexpected sender {message.sender!r}")
        if self.trusted is not None:
            if message.sender not in self.trusted:
                raise ProtocolError("unknown-key", f"{message.sender!r} is not in the key list")
            if self.peer_roles and not self.trusted.allows(message.sender, self.peer_roles):
                raise ProtocolError("role", f"{message.sender!r}'s key may not act as {' or '.join(self.peer_roles)}")
            if not message.sig:
                raise ProtocolError("unsigned", f"{message.kind} from {message.sender!r} carries no signature")
            if not self.trusted.verify(message.sender, message.sig, signed_header(message, digest)):
                raise ProtocolError("signature", f"{message.kind} from {message.sender!r} has a bad signature")
        if self.run is not None and message.kind not in self.handshake:
            if message.meta.get("run") != self.run or message.meta.get("to") != self.sender:
                raise ProtocolError("replay", f"{message.kind} from {message.sender!r} belongs to another run or recipient")

    def _check_sequence(self, message: Message, *, whole: bool) -> None:
        """Handshakes unnumbered, everything else next in its sender's sequence. A first chunk
        (`whole` False) may run ahead: the messages before it can still be waiting for the role."""
        if not self.ordered:
            return
        if message.kind in self.handshake:
            if message.seq != 0:
                raise ProtocolError("out-of-order", f"{message.kind} from {message.sender} numbered {message.seq}: handshakes are unnumbered")
            return
        expected = self._next_seq.get(message.sender, 1)
        if message.seq < expected:
            raise ProtocolError("duplicate", f"seq {message.seq} from {message.sender} already seen (expecting {expected})")
        if whole and message.seq > expected:
            raise ProtocolError("out-of-order", f"seq {message.seq} from {message.sender}, expecting {expected}")

    def _check_content(self, message: Message, kinds: Collection[str], check: Callable[[Message], None] | None) -> None:
        self._check_sequence(message, whole=True)
        if message.kind not in kinds:
            raise ProtocolError("kind", f"{message.kind!r} where {'/'.join(kinds)} was expected")
        if check is not None:
            check(message)

    def ack(self, delivery: Delivery) -> None:
        self.transport.ack(delivery)
