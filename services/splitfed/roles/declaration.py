"""A role declared once: its name, its settings (learning and deployment), how to build it and
which metrics it exports. `splitfed serve ROLE`, the SPLITFED_* variables, the launcher and the
README's option table are all derived from these declarations (`registry` collects them)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from prometheus_client.metrics import MetricWrapperBase

from splitfed import config
from splitfed.security.keys import KeyList, Signer, load_private
from splitfed.transport import Connection, Transport


@dataclass(frozen=True)
class Progress:
    """A progress event from a role: a training batch, or a closed epoch or round (`record`:
    step, accuracy, loss, train_loss, seconds), or, last, the role's result (`record`: the
    result). Travels as a JSON line from `serve` to `run`, or in a pod's log to `launch`."""

    event: str  # "batch" | "epoch" | "round" | "calibration" | "result"
    done: int = 0
    total: int = 0
    loss: float = 0.0
    record: dict | None = None


ProgressSink = Callable[[Progress], None]


class Runnable(Protocol):
    def run(self) -> dict: ...


@dataclass(frozen=True)
class Identity:
    """Who a party is (`signer`: its private key) and whom it trusts (None: unsafe mode)."""

    signer: Signer | None = None
    trusted: KeyList | None = None

    @classmethod
    def load(cls, party: str, key_list: Path | None, private_key: Path | None = None) -> Identity:
        return cls(load_private(private_key, party) if private_key else None, KeyList.load(key_list) if key_list else None)


# (learning settings or None, deployment settings, transport, identity, progress sink) -> role
Builder = Callable[[Any, Any, Transport, Identity, "ProgressSink | None"], Runnable]


@dataclass(frozen=True)
class RoleSpec:
    name: str  # `splitfed serve NAME`, the image's entrypoint
    summary: str
    learning: type | None  # a learning.settings dataclass, or None for roles that do not train
    deployment: type  # a roles.deployment dataclass
    build: Builder
    metrics: tuple[MetricWrapperBase, ...]
    party: Callable[[Any, Any], str] = lambda learning, deployment: ""  # (learning, deployment) -> the party name it signs as (default: the role name)
    prefetch: Callable[[Any], int] | None = None  # deliveries it may hold unacked, from its learning settings

    def party_name(self, learning: Any, deployment: Any) -> str:
        return self.party(learning, deployment) or self.name

    def settings_classes(self) -> tuple[type, ...]:
        return tuple(cls for cls in (self.learning, self.deployment, Connection) if cls is not None)

    def options(self) -> list[config.Option]:
        return config.options(*self.settings_classes())

    def env_names(self) -> set[str]:
        return {option.env for option in self.options()}
