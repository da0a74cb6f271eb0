"""The one small interface every role talks through; in-memory and RabbitMQ implement it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class TransportError(RuntimeError):
    """The transport cannot go on (refused credentials, closed for good)."""


@dataclass
class Delivery:
    queue: str
    body: bytes
    tag: Any = None  # what `ack` needs; opaque to roles


RejectHook = Callable[[str, str], None]  # (reason, detail) for frames refused below the protocol


class LockLost(TransportError):
    """A lock this connection held was taken by another while the connection was down: whatever
    the holder was doing is now someone else's, so the transport stops."""


class ChunkRefused(Exception):
    """An admission hook's verdict on a chunked message's first chunk; `reason` is the metric label."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# Judges a chunked message by its first chunk, before any of it is kept: returns who sent it, or
# raises ChunkRefused. With a key list, that is where a forged or replayed message stops.
AdmitHook = Callable[[bytes], str]


class Transport(ABC):
    @abstractmethod
    def declare(self, queue: str, *, durable: bool = False) -> None:
        """Create `queue` if missing (idempotent). Durable queues and persistent messages survive a broker restart."""

    @abstractmethod
    def publish(self, queue: str, body: bytes, *, persistent: bool = False, must_exist: bool = False) -> None:
        """Send `body` to `queue`; returns once the broker has it (publisher confirm). A queue
        nobody declared is a TransportError (the broker cannot route it); `must_exist` asks for
        that error from transports that would otherwise create the queue."""

    @abstractmethod
    def receive(self, queue: str, timeout: float) -> Delivery | None:
        """Next delivery from `queue`, or None after `timeout` seconds."""

    @abstractmethod
    def ack(self, delivery: Delivery) -> None:
        """The work for `delivery` is done; until then it comes back if this party dies."""

    def watch(self, queue: str, *, max_bytes: int, on_reject: RejectHook, admit: AdmitHook | None = None) -> None:
        """What `queue`'s consumer accepts: messages of at most `max_bytes` (larger ones are
        refused before they are put together), who hears of frames refused below the protocol
        (bad or abandoned chunks), and `admit`, which judges a chunked message by its first chunk
        (None: any sender may start one). Transports that do not chunk need none of it."""

    @abstractmethod
    def hold(self, lock: str) -> bool:
        """Try to become the only holder of `lock`: True when this connection holds it (now or
        already), False while another one does. It is let go when the connection closes or its
        process dies. A connection that is lost and, on reconnecting, finds the lock taken stops
        with LockLost: a holder cut off from the broker never acts beside its successor."""

    @abstractmethod
    def holds(self, lock: str, timeout: float) -> bool:
        """Whether this connection holds `lock` now, waiting up to `timeout` seconds for a lost
        connection to come back with it. Raises LockLost when it came back without it."""

    def delete(self, queue: str) -> None:
        """Remove `queue` (end of a session)."""

    def close(self) -> None:
        """Release the connection."""

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
