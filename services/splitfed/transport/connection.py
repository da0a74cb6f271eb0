"""How a role reaches its broker: the settings (one CLI flag and one SPLITFED_* variable each)
and the one function that turns them into a transport."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from splitfed.config import setting
from splitfed.transport.base import Transport
from splitfed.transport.broker import AmqpBroker, TLSOptions

DEFAULT_BROKER = "amqp://guest:guest@127.0.0.1:5672/"


@dataclass(kw_only=True)
class Connection:
    """How a role reaches RabbitMQ."""

    broker: str = setting(
        DEFAULT_BROKER, "RabbitMQ URL: amqp://user:pass@host:port/vhost, or amqps://... for TLS; several, comma-separated, for a cluster's nodes "
        "(tried in turn at start and on every reconnect).", metavar="URL",
    )
    chunk_size: int = setting(16 * 1024**2, "Frames larger than this many bytes travel in chunks.", min=128 * 1024)
    heartbeat: int | None = setting(None, "AMQP heartbeat in seconds (broker default if unset).", min=0)
    connect_timeout: float = setting(30.0, "Seconds to keep trying to reach the broker at start before giving up.", min=0.1)
    tls_ca: Path | None = setting(None, "CA file to verify the broker (amqps://).")
    tls_cert: Path | None = setting(None, "Client certificate for the broker (amqps://).")
    tls_key: Path | None = setting(None, "Client key for the broker (amqps://).")
    queue_type: str = setting(
        "classic", "Type of the durable queues: quorum replicates them across a cluster's nodes (they survive losing a minority); "
        "transient queues stay classic. Every party of a session must use the same.", choices=("classic", "quorum"),
    )

    def amqp_broker(self, who: str) -> AmqpBroker:
        """The RabbitMQ these settings name, parsed once: settings that cannot work (not AMQP,
        plain and TLS addresses mixed, TLS files for plain AMQP or missing) are refused here,
        before anything connects or trains. `who` needs the broker, and the refusal says so."""
        files = (self.tls_ca, self.tls_cert, self.tls_key)
        tls = TLSOptions(*(str(path) if path else None for path in files)) if any(path is not None for path in files) else None
        broker = AmqpBroker.parse(self.broker, tls, who=who)
        for path in files:
            if path is not None and not Path(path).is_file():
                raise ValueError(f"TLS file {path} does not exist")
        return broker


def connect(broker: AmqpBroker, connection: Connection, name: str, **extra: Any) -> Transport:
    """A RabbitMQ transport to `broker` (parsed from `connection`, whose other settings it takes:
    chunk size, heartbeat, timeouts, queue type) for party `name` (`extra`: RabbitTransport
    keywords such as prefetch). Imported here: pika stays out of the settings' imports."""
    from splitfed.transport.rabbitmq import RabbitTransport

    heartbeat = {"heartbeat": connection.heartbeat} if connection.heartbeat is not None else {}
    return RabbitTransport(
        broker, name=name, chunk_size=connection.chunk_size, connect_timeout=connection.connect_timeout, queue_type=connection.queue_type,
        **heartbeat, **extra,
    )
