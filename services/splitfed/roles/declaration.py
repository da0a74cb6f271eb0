"""A role declared once: its name, its settings (learning and deployment), how to build it, which
metrics it exports and how it is deployed (families, torch, data, replicas, chart values key,
image). `splitfed serve ROLE`, the SPLITFED_* variables, the launcher, the README's option table,
`splitfed size`, the chart (its schema and files/roles.json) and the images' targets are all
derived from these declarations (`registry` collects them)."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass
from pathlib import Path
from typing import Any, Protocol

from prometheus_client.metrics import MetricWrapperBase

from splitfed import config
from splitfed.learning.context import Context, context_of
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


class Replicas(enum.Enum):
    """How many pods of a role one chart release runs."""

    ONE = "one"  # at most one per session
    ANY = "any"  # any number, none included (the fedavg-server: one active and standbys; the workers)
    AT_LEAST_ONE = "at-least-one"  # one per client or peer of the run, which has at least one


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
    index: Callable[[Any, Any], int] = lambda learning, deployment: 0  # (learning, deployment) -> its index among the data owners (a task's context.index)
    _: KW_ONLY
    # How it is deployed. The defaults describe a role outside the chart and the images (a test's).
    families: tuple[str, ...] = ()  # the families whose sessions it serves; the first is the one it takes by default
    torch: bool = False  # imports torch: it runs from the torch image, and only such a role can be given a GPU
    reads_data: bool = False  # loads the data set's files (a role may name the data set and read none: the split-fed)
    needs_data: Callable[[Any], bool] = lambda learning: True  # (learning) -> whether this run of a reads_data role reads any
    replicas: Replicas = Replicas.ONE
    counts: str | None = None  # the run setting its replica count is (split-client: clients), None for none
    job: bool = False  # it may end with its run, so the chart can make it a Job
    values_key: str | None = None  # its section in the chart's values
    image: str | None = None  # its target in images/Containerfile

    @property
    def names_data(self) -> bool:
        """It is told the data set's name (has the --dataset option)."""
        return any(option.name == "dataset" for option in self.options())

    @property
    def signs(self) -> bool:
        """It has a private key of its own to sign what it sends."""
        return any(option.name == "private_key" for option in self.options())

    def party_name(self, learning: Any, deployment: Any) -> str:
        return self.party(learning, deployment) or self.name

    def context(self, learning: Any, deployment: Any) -> Context:
        """What this party's task is told of it (learning.tasks)."""
        return context_of(learning, self.name, self.party_name(learning, deployment), self.index(learning, deployment))

    def settings_classes(self) -> tuple[type, ...]:
        return tuple(cls for cls in (self.learning, self.deployment, Connection) if cls is not None)

    def options(self) -> list[config.Option]:
        return config.options(*self.settings_classes())

    def env_names(self) -> set[str]:
        return {option.env for option in self.options()}
