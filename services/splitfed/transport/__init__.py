"""Transports: `memory` (one process) and RabbitMQ (`amqp://` or `amqps://`)."""

from __future__ import annotations

from splitfed.transport.base import ChunkRefused, Delivery, Transport, TransportError
from splitfed.transport.broker import MEMORY, AmqpBroker, Broker, InMemory, warn_if_unencrypted
from splitfed.transport.connection import Connection, connect, passed_as_file
from splitfed.transport.memory import MemoryBroker, MemoryTransport

__all__ = [
    "MEMORY", "AmqpBroker", "Broker", "ChunkRefused", "Connection", "Delivery", "InMemory", "MemoryBroker", "MemoryTransport", "Transport",
    "TransportError", "connect", "passed_as_file", "warn_if_unencrypted",
]
