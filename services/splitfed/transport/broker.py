"""Where a party's broker is: a `--broker` value parsed once into a value that the launcher, the
role services and the transport pass down. Either RabbitMQ (the addresses of one broker or of a
cluster's nodes, with their TLS options) or the in-memory queues of one process. Torch-free and
pika-free: the settings, the launcher and the transports all import it.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from urllib.parse import quote

log = logging.getLogger(__name__)

MEMORY = "memory"  # the --broker value that keeps every role in one process, with no broker
SCHEMES = ("amqp://", "amqps://")


class NotAmqp(ValueError):
    """A broker value that is not a list of amqp:// or amqps:// URLs."""


@dataclass(frozen=True)
class TLSOptions:
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    server_hostname: str | None = None

    def context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.ca_file)
        if self.cert_file:
            context.load_cert_chain(self.cert_file, self.key_file)
        return context


@dataclass(frozen=True)
class InMemory:
    """Every role in this process, through one shared MemoryBroker: no RabbitMQ."""

    def __str__(self) -> str:
        return MEMORY


@dataclass(frozen=True)
class AmqpBroker:
    """RabbitMQ: one address, or the nodes of one cluster (tried in turn at start and on every
    reconnect), all amqp:// or all amqps://. `tls`: the files for amqps:// (None: the system's
    CAs, no client certificate)."""

    urls: tuple[str, ...]
    tls: TLSOptions | None = None

    @classmethod
    def parse(cls, text: str, tls: TLSOptions | None = None, *, who: str) -> AmqpBroker:
        """The broker named by a `--broker` value (one URL, or several separated by commas),
        checked; `who` needs it, and the refusal says so."""
        urls = tuple(url.strip() for url in text.split(","))
        if not all(url.startswith(SCHEMES) for url in urls):
            raise NotAmqp(f"{who} needs --broker amqp://... or amqps://..., or a comma-separated list of them (got {_redact_all(urls)!r})")
        if len({url.split("://")[0] for url in urls}) > 1:
            # One plain address among TLS ones would send the credentials in the clear on failover.
            raise ValueError(f"--broker mixes amqp:// and amqps:// addresses ({_redact_all(urls)}); use amqps:// for all or none")
        if tls is not None and not urls[0].startswith("amqps://"):
            raise ValueError("--tls-ca/--tls-cert/--tls-key need an amqps:// broker URL; with amqp:// they would be ignored")
        return cls(urls, tls)

    @property
    def encrypted(self) -> bool:
        return self.urls[0].startswith("amqps://")  # all of them or none: `parse` refuses a mix

    def __str__(self) -> str:
        """The addresses without credentials, for logs, results and errors."""
        return _redact_all(self.urls)


Broker = AmqpBroker | InMemory


def with_credentials(url: str, username: str, password: str) -> str:
    """`url` with `username` and `password` as its credentials (percent-encoded, as pika decodes
    them), in place of any it names."""
    scheme, separator, rest = url.partition("://")
    if not separator:
        return url  # not a URL at all: AmqpBroker.parse refuses it, and says what it needs
    authority, slash, path = rest.partition("/")
    host = authority.rsplit("@", 1)[-1]
    return f"{scheme}://{quote(username, safe='')}:{quote(password, safe='')}@{host}{slash}{path}"


def _redact_all(urls: tuple[str, ...]) -> str:
    return ",".join(_redact(url) for url in urls)


def _redact(url: str) -> str:
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"


def warn_if_unencrypted(broker: Broker, signed: bool) -> None:
    """Signatures stop forgery, not eavesdropping: say so when signed traffic goes over plain AMQP."""
    if signed and isinstance(broker, AmqpBroker) and not broker.encrypted:
        log.warning("messages are signed but not encrypted: %s is plain AMQP (use amqps:// with --tls-ca)", broker)
