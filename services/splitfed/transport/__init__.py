"""Transports: `memory` (one process) and RabbitMQ (`amqp://` or `amqps://`)."""

from __future__ import annotations

from splitfed.transport.base import ChunkRefused, Delivery, Transport, TransportError
from splitfed.transport.connection import Connection, connect, is_amqp, redact
from splitfed.transport.memory import MemoryBroker, MemoryTransport

__all__ = ["ChunkRefused", "Connection", "Delivery", "Transport", "TransportError", "MemoryBroker", "MemoryTransport", "connect", "is_amqp", "redact"]
