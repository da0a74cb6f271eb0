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


def is_amqp(broker: str) -> bool:
    return broker.startswith(("amqp://", "amqps://"))


def redact(url: str) -> str:
    """A broker URL without its credentials, for logs, results and errors."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"


@dataclass(kw_only=True)
class Connection:
    """How a role reaches RabbitMQ."""

    broker: str = setting(DEFAULT_BROKER, "RabbitMQ URL: amqp://user:pass@host:port/vhost, or amqps://... for TLS.", metavar="URL")
    chunk_size: int = setting(16 * 1024**2, "Frames larger than this many bytes travel in chunks.", min=128 * 1024)
    heartbeat: int | None = setting(None, "AMQP heartbeat in seconds (broker default if unset).", min=0)
    connect_timeout: float = setting(30.0, "Seconds to keep trying to reach the broker at start before giving up.", min=0.1)
    tls_ca: Path | None = setting(None, "CA file to verify the broker (amqps://).")
    tls_cert: Path | None = setting(None, "Client certificate for the broker (amqps://).")
    tls_key: Path | None = setting(None, "Client key for the broker (amqps://).")



    def tls_given(self) -> bool:
        return any(path is not None for path in (self.tls_ca, self.tls_cert, self.tls_key))

    def check(self, name: str) -> None:
        """Refuse settings that cannot work, before anything connects or trains."""
        if not is_amqp(self.broker):
            raise ValueError(f"{name} needs --broker amqp://... or amqps://... (got {redact(self.broker)!r})")
        if self.tls_given() and not self.broker.startswith("amqps://"):
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
        connection.broker, name=name, tls=tls, chunk_size=connection.chunk_size, connect_timeout=connection.connect_timeout, **heartbeat, **extra,
    )


def warn_if_unencrypted(broker: str, signed: bool) -> None:
    """Signatures stop forgery, not eavesdropping: say so when signed traffic goes over plain AMQP."""
    if signed and broker.startswith("amqp://"):
        log.warning("messages are signed but not encrypted: %s is plain AMQP (use amqps:// with --tls-ca)", redact(broker))
