"""How a role reaches its broker: the settings (one CLI flag and one SPLITFED_* variable each)
and the one function that turns them into a transport."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from splitfed.config import setting
from splitfed.transport.base import Transport

log = logging.getLogger(__name__)

DEFAULT_BROKER = "amqp://guest:guest@127.0.0.1:5672/"


def broker_urls(broker: str) -> list[str]:
    """The addresses in a `--broker` value: one URL, or several separated by commas (the nodes
    of one cluster, tried in turn)."""
    return [url.strip() for url in broker.split(",")]


def is_amqp(broker: str) -> bool:
    return all(url.startswith(("amqp://", "amqps://")) for url in broker_urls(broker))


def redact(broker: str) -> str:
    """A broker URL (or list of them) without credentials, for logs, results and errors."""
    return ",".join(_redact_one(url) for url in broker_urls(broker))


def _redact_one(url: str) -> str:
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"


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

    def tls_given(self) -> bool:
        return any(path is not None for path in (self.tls_ca, self.tls_cert, self.tls_key))

    def check(self, name: str) -> None:
        """Refuse settings that cannot work, before anything connects or trains."""
        urls = broker_urls(self.broker)
        if not is_amqp(self.broker):
            raise ValueError(f"{name} needs --broker amqp://... or amqps://..., or a comma-separated list of them (got {redact(self.broker)!r})")
        if len({url.split("://")[0] for url in urls}) > 1:
            # One plain address among TLS ones would send the credentials in the clear on failover.
            raise ValueError(f"--broker mixes amqp:// and amqps:// addresses ({redact(self.broker)}); use amqps:// for all or none")
        if self.tls_given() and not urls[0].startswith("amqps://"):
            raise ValueError("--tls-ca/--tls-cert/--tls-key need an amqps:// broker URL; with amqp:// they would be ignored")
        for path in (self.tls_ca, self.tls_cert, self.tls_key):
            if path is not None and not Path(path).is_file():
                raise ValueError(f"TLS file {path} does not exist")


def connect(connection: Connection, name: str, **extra: Any) -> Transport:
    """A RabbitMQ transport for `connection` (`extra`: RabbitTransport keywords such as prefetch)."""
    from splitfed.transport.rabbitmq import RabbitTransport, TLSOptions

    connection.check(name)
    tls = TLSOptions(*(str(path) if path else None for path in (connection.tls_ca, connection.tls_cert, connection.tls_key))) if connection.tls_given() else None
    heartbeat = {"heartbeat": connection.heartbeat} if connection.heartbeat is not None else {}
    return RabbitTransport(
        connection.broker, name=name, tls=tls, chunk_size=connection.chunk_size, connect_timeout=connection.connect_timeout, queue_type=connection.queue_type,
        **heartbeat, **extra,
    )


def warn_if_unencrypted(broker: str, signed: bool) -> None:
    """Signatures stop forgery, not eavesdropping: say so when signed traffic goes over plain AMQP."""
    if signed and any(url.startswith("amqp://") for url in broker_urls(broker)):
        log.warning("messages are signed but not encrypted: %s is plain AMQP (use amqps:// with --tls-ca)", redact(broker))
