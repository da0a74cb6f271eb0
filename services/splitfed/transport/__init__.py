"""Transports: `memory` (one process) and RabbitMQ (`amqp://` or `amqps://`)."""

from __future__ import annotations

from splitfed.transport.base import Delivery, Transport, TransportError
from splitfed.transport.memory import MemoryBroker, MemoryTransport

__all__ = ["Delivery", "Transport", "TransportError", "MemoryBroker", "MemoryTransport", "is_amqp"]


def is_amqp(broker: str) -> bool:
    return broker.startswith(("amqp://", "amqps://"))
