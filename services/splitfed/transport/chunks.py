"""Frames larger than a transport's chunk size travel as numbered chunks: how a frame is cut, and
how a consumer puts the chunks back together. Pure (no broker, no clock of its own): the RabbitMQ
transport feeds it what it consumes and acts on the outcomes (deliver, or ack and report).

Partly arrived messages are bounded per queue (count, and the chunks they announce, reserved when
they start) and per sender, and expire after a while; the reserved chunks never exceed the part of
the prefetch window set aside for them (`Reassembler.reserve`), so partials that never complete
cannot stall consumption, and memory in flight stays within the window.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from splitfed.transport.base import AdmitHook, ChunkRefused

CHUNK_ID, CHUNK_INDEX, CHUNK_COUNT = "x-splitfed-chunk-id", "x-splitfed-chunk-index", "x-splitfed-chunk-count"
MAX_PENDING_REASSEMBLIES = 64  # per queue; a new partial beyond them is refused, none is evicted
MAX_PENDING_PER_SENDER = 4  # a sender's messages arrive in order: more than a few in progress is a flood
PARTIAL_TTL = 120.0  # seconds a partly arrived message may wait for its other chunks


def chunk_count(size: int, chunk_size: int) -> int:
    """Chunks a frame of `size` bytes travels in."""
    return -(-size // chunk_size)


def split(body: bytes, chunk_size: int) -> Iterator[tuple[bytes, dict[str, Any]]]:
    """`body` as chunks of `chunk_size` bytes (the last one shorter), each with the headers that
    name its message (a fresh id), its place and their number."""
    chunk_id = uuid.uuid4().hex
    count = chunk_count(len(body), chunk_size)
    view = memoryview(body)
    for index in range(count):
        yield bytes(view[index * chunk_size : (index + 1) * chunk_size]), {CHUNK_ID: chunk_id, CHUNK_INDEX: index, CHUNK_COUNT: count}


@dataclass(frozen=True)
class Whole:
    """A message to deliver: a frame that came whole, or all the chunks of one, joined."""

    queue: str
    body: bytes
    tags: list  # the deliveries it was made of, acked together once the work is done


@dataclass(frozen=True)
class Refused:
    """Deliveries refused for good (redelivering them would not make them valid): to ack at once
    and report. `reason` is the metric label."""

    queue: str
    tags: list
    reason: str
    detail: str


@dataclass(frozen=True)
class Admission:
    """What a queue's consumer accepts as chunked messages (see `Transport.watch`)."""

    max_bytes: int
    admit: AdmitHook | None


@dataclass
class _Partial:
    queue: str
    sender: str  # as the admission hook named it ("" without one)
    parts: list[bytes | None]
    started: float
    tags: list = field(default_factory=list)
    size: int = 0


class Reassembler:
    """Chunks in, whole messages or refusals out, for every queue one consumer reads. `now` is
    the caller's monotonic clock."""

    def __init__(self, chunk_size: int, max_message_bytes: int, partial_ttl: float = PARTIAL_TTL):
        self.chunk_size = chunk_size
        self.max_message_bytes = max_message_bytes
        self.partial_ttl = partial_ttl
        # The chunks partial messages may hold at once: two of the largest (senders publishing at
        # the same time interleave their chunks). The consumer's prefetch window makes room for them.
        self.reserve = 2 * chunk_count(max_message_bytes, chunk_size)
        self._admissions: dict[str, Admission] = {}
        self._partials: dict[str, _Partial] = {}  # "queue/chunk id" -> the chunks so far

    def watch(self, queue: str, max_bytes: int, admit: AdmitHook | None) -> None:
        self._admissions[queue] = Admission(min(max_bytes, self.max_message_bytes), admit)

    def clear(self) -> None:
        """Forget every partial message (their chunks come again, redelivered on a new connection)."""
        self._partials.clear()

    def take(self, queue: str, tag: Any, headers: dict, body: bytes, now: float) -> Whole | Refused | None:
        """What one delivery from `queue` makes: a whole message, a refusal (of this delivery, or
        of every chunk of its message so far), or None while its message is still partial."""
        if CHUNK_ID not in headers:
            return Whole(queue, body, [tag])
        chunk_id, index, count = headers.get(CHUNK_ID), headers.get(CHUNK_INDEX), headers.get(CHUNK_COUNT)
        if not (isinstance(chunk_id, (str, bytes)) and isinstance(index, int) and isinstance(count, int)) or not 0 <= index < count:
            return Refused(queue, [tag], "malformed", f"bad chunk headers on {queue}")
        limit = self._limit(queue)
        if count > chunk_count(limit, self.chunk_size):  # more chunks than a message this queue accepts can have
            return Refused(queue, [tag], "oversized", f"{count} chunks of {self.chunk_size} bytes exceed the {limit}-byte limit of {queue}")
        key = f"{queue}/{chunk_id!s}"
        partial = self._partials.get(key)
        if partial is None:
            opened = self._open(queue, key, tag, index, count, body, now)
            if isinstance(opened, Refused):
                return opened
            partial = opened
        if len(partial.parts) != count or partial.parts[index] is not None:
            return Refused(queue, [tag], "malformed", f"chunk {index}/{count} of {key} conflicts with earlier chunks")
        partial.parts[index] = body
        partial.tags.append(tag)
        partial.size += len(body)
        if partial.size > limit:
            del self._partials[key]
            return Refused(queue, partial.tags, "oversized", f"chunked message {key} exceeds {limit} bytes")
        if all(part is not None for part in partial.parts):
            del self._partials[key]
            return Whole(queue, b"".join(partial.parts), partial.tags)
        return None

    def expire(self, now: float) -> list[Refused]:
        """Refuse messages whose other chunks have not come within the partial TTL: they would
        hold memory and prefetch slots for ever."""
        expired = []
        for key, partial in list(self._partials.items()):
            if now - partial.started > self.partial_ttl:
                del self._partials[key]
                expired.append(Refused(partial.queue, partial.tags, "expired", f"chunked message {key} incomplete after {self.partial_ttl:.0f}s"))
        return expired

    def _open(self, queue: str, key: str, tag: Any, index: int, count: int, body: bytes, now: float) -> _Partial | Refused:
        """A place for a new chunked message, or its first delivery's refusal. With an admission
        hook the message must open with its first chunk, which the hook judges (signature, run)
        before anything is kept. The message reserves the chunks it announces; when they do not
        fit beside those already reserved, or the queue or sender holds its most partials, the
        newcomer is refused rather than a message still arriving evicted: a flood can neither
        push out a genuine message nor fill the prefetch window, and it expires on its own."""
        admission = self._admissions.get(queue)
        sender = ""
        if admission is not None and admission.admit is not None:
            if index != 0:
                return Refused(queue, [tag], "malformed", f"chunk {index}/{count} of {key}, which did not open with its first chunk")
            try:
                sender = admission.admit(body)
            except ChunkRefused as refused:
                return Refused(queue, [tag], refused.reason, f"first chunk of {key}: {refused.detail}")
        partials = [partial for partial in self._partials.values() if partial.queue == queue]
        reserved = sum(len(partial.parts) for partial in partials)  # each consumer has its own window
        if len(partials) >= MAX_PENDING_REASSEMBLIES or reserved + count > self.reserve:
            return Refused(queue, [tag], "partials", f"{len(partials)} messages on {queue} ({reserved} chunks) are already partly here")
        if sender and sum(partial.sender == sender for partial in partials) >= MAX_PENDING_PER_SENDER:
            return Refused(queue, [tag], "partials", f"{MAX_PENDING_PER_SENDER} messages from {sender} on {queue} are already partly here")
        partial = self._partials[key] = _Partial(queue, sender, [None] * count, now)
        return partial

    def _limit(self, queue: str) -> int:
        return self._admissions[queue].max_bytes if queue in self._admissions else self.max_message_bytes
