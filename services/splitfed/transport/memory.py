"""Queues in one process: the embedded default, for runs that need no broker."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

from splitfed.transport.base import Delivery, Transport, TransportError


class MemoryBroker:
    """Shared by every MemoryTransport of one run, as a broker is shared by connections."""

    def __init__(self) -> None:
        self._queues: dict[str, queue.Queue[bytes]] = {}
        self._lock = threading.Lock()
        self.holders: dict[str, MemoryTransport] = {}  # lock name -> the transport holding it
        self.taps: list[Callable[[str, bytes], None]] = []  # observers of every publish (tests, traffic)

    def queue(self, name: str) -> queue.Queue[bytes]:
        with self._lock:
            return self._queues.setdefault(name, queue.Queue())

    def delete(self, name: str) -> None:
        with self._lock:
            self._queues.pop(name, None)

    def exists(self, name: str) -> bool:
        with self._lock:
            return name in self._queues

    def hold(self, lock: str, transport: MemoryTransport) -> bool:
        with self._lock:
            return self.holders.setdefault(lock, transport) is transport

    def release(self, transport: MemoryTransport) -> None:
        with self._lock:
            self.holders = {lock: holder for lock, holder in self.holders.items() if holder is not transport}


class MemoryTransport(Transport):
    def __init__(self, broker: MemoryBroker):
        self.broker = broker

    def declare(self, queue: str, *, durable: bool = False) -> None:
        self.broker.queue(queue)

    def publish(self, queue: str, body: bytes, *, persistent: bool = False, must_exist: bool = False) -> None:
        if must_exist and not self.broker.exists(queue):
            raise TransportError(f"queue {queue!r} does not exist")
        for tap in self.broker.taps:
            tap(queue, body)
        self.broker.queue(queue).put(body)

    def receive(self, queue_name: str, timeout: float) -> Delivery | None:
        try:
            return Delivery(queue_name, self.broker.queue(queue_name).get(timeout=timeout))
        except queue.Empty:
            return None

    def ack(self, delivery: Delivery) -> None:
        """Nothing to do: a message in memory dies with the process that would redeliver it."""

    def hold(self, lock: str) -> bool:
        return self.broker.hold(lock, self)

    def holds(self, lock: str, timeout: float) -> bool:
        return self.broker.holders.get(lock) is self  # a connection in memory is never lost

    def delete(self, queue: str) -> None:
        self.broker.delete(queue)

    def close(self) -> None:
        self.broker.release(self)
