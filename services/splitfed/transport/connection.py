"""How a role reaches its broker: the settings (one CLI flag and one SPLITFED_* variable each)
and the one function that turns them into a transport.

The password need not be a setting's value: `--broker-file` names a file holding the whole
--broker value, `--broker-credentials` a folder holding the user name and password (both as a
Kubernetes Secret mounts them). Read from there, it stays out of the environment, which shows in
/proc/PID/environ, crash reports and a rendered chart.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from splitfed.config import setting
from splitfed.transport.base import Transport
from splitfed.transport.broker import AmqpBroker, TLSOptions, with_credentials

DEFAULT_BROKER = "amqp://guest:guest@127.0.0.1:5672/"


@dataclass(kw_only=True)
class Connection:
    """How a role reaches RabbitMQ."""

    broker: str = setting(
        DEFAULT_BROKER, "RabbitMQ URL: amqp://user:pass@host:port/vhost, or amqps://... for TLS; several, comma-separated, for a cluster's nodes "
        "(tried in turn at start and on every reconnect).", metavar="URL",
    )
    broker_file: Path | None = setting(
        None, "File holding the --broker value, read at start instead of it: a mounted Secret keeps the password out of the environment.", metavar="PATH",
    )
    broker_credentials: Path | None = setting(
        None, "Folder holding the broker's user name and password as files `username` and `password` (a mounted Secret): they go into every "
        "--broker URL, in place of any there.", metavar="DIR",
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
        broker = AmqpBroker.parse(self.broker_urls(), tls, who=who)
        for path in files:
            if path is not None and not Path(path).is_file():
                raise ValueError(f"TLS file {path} does not exist")
        return broker

    def broker_urls(self) -> str:
        """The --broker value: as given, or read from --broker-file; with --broker-credentials put
        into each URL. A file that cannot be read, or is empty, is refused naming its path."""
        urls = self.broker
        if self.broker_file is not None:
            if urls != DEFAULT_BROKER:
                raise ValueError("give --broker or --broker-file, not both")
            urls = _secret(self.broker_file, "--broker-file")
        if self.broker_credentials is not None:
            username = _secret(self.broker_credentials / "username", "--broker-credentials")
            password = _secret(self.broker_credentials / "password", "--broker-credentials")
            urls = ",".join(with_credentials(url.strip(), username, password) for url in urls.split(","))
        return urls


def passed_as_file(connection: Connection, folder: Path) -> Connection:
    """`connection` for the processes this one starts: its --broker value, credentials and all,
    in a file of `folder` that only this user can read, which their environment names instead."""
    path = folder / "broker"
    path.touch(mode=0o600)
    path.write_text(connection.broker_urls())
    return dataclasses.replace(connection, broker=DEFAULT_BROKER, broker_file=path, broker_credentials=None)


SECRET_MAX_BYTES = 64 * 1024  # far above any list of URLs; a wrong path (a data file, a device) is refused, not read whole


def _secret(path: Path, option: str) -> str:
    """A credential file's text without its surrounding whitespace (a Secret's value often ends in a newline)."""
    try:
        with open(path, "rb") as file:
            raw = file.read(SECRET_MAX_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"{option}: cannot read {path}: {exc.strerror}") from None
    if len(raw) > SECRET_MAX_BYTES:
        raise ValueError(f"{option}: {path} is larger than {SECRET_MAX_BYTES} bytes: not a credential file")
    try:
        text = raw.decode().strip()
    except UnicodeDecodeError:
        raise ValueError(f"{option}: {path} is not UTF-8 text") from None
    if not text:
        raise ValueError(f"{option}: {path} is empty")
    return text


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
