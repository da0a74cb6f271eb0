"""Deployment settings: who a role is, what it may trust, how long it waits, where it writes.
Learning settings (the model, the data, the optimiser) live in `learning.settings` and the
broker connection in `transport.connection`; a role's declaration combines them, and every
field is one CLI flag and one SPLITFED_* variable."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from splitfed.config import NAME, setting

LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(kw_only=True)
class Service:
    """What every long-lived role has: its session, patience, trust, logs and metrics."""

    session: str = setting(help="Session id: names the queues, so runs never see each other's messages.", pattern=NAME)
    timeout: float = setting(300.0, "Seconds to wait for a peer before giving up.", min=0.1)
    key_list: Path | None = setting(None, "Key-list file of trusted parties (none: unsafe mode, anyone's messages are accepted).")
    metrics_port: int = setting(0, "Serve Prometheus metrics on this port (0: off).", min=0, max=65535)
    metrics_address: str = setting("0.0.0.0", "Address the metrics endpoint listens on: all interfaces by default (a pod is scraped from outside); 127.0.0.1 keeps it local.")
    log_level: str = setting("info", "Logging level.", choices=LOG_LEVELS)
    out: Path | None = setting(None, "Write this role's result as JSON here at the end.")


@dataclass(kw_only=True)
class SigningService(Service):
    """A role that signs what it sends but trains nothing (no torch: the split-fed)."""

    private_key: Path | None = setting(None, "This party's private key (PEM) to sign what it sends.")


@dataclass(kw_only=True)
class Reporting:
    """A role that can lead a run: `splitfed run` and `launch` read its progress from its stdout."""

    progress_events: bool = setting(False, "Print progress (batches, epochs, rounds) and, last, the result as JSON lines on stdout.")


@dataclass(kw_only=True)
class Party(SigningService, Reporting):
    """A role that trains, signs what it sends and reports progress."""
    torch_threads: int | None = setting(None, "Torch threads in this process (default: torch's choice).", min=1)


@dataclass(kw_only=True)
class SplitRouting:
    via: str = setting("relay", "Through the relay service, or straight between the halves' queues.", choices=("relay", "direct"))


@dataclass(kw_only=True)
class RoundPolicy:
    min_workers: int | None = setting(None, "Close a round with this many updates once --round-timeout passes (default: all).", min=1)
    round_timeout: float = setting(120.0, "Seconds a round waits for every worker before closing with --min-workers.", min=0.1)
