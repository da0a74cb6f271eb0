"""Who asks a task for its model or its data: torch-free, so that the role declarations can say
how each party fills it in without importing torch."""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path

PLACEHOLDERS = ("party", "index")
PARTY_COUNTS = ("workers", "clients", "peers")  # the learning setting that counts a family's data owners


@dataclass(frozen=True)
class Context:
    """What a task's `model(context)` and `data(context, train)` are told."""

    role: str  # fedavg-worker, split-client, p2p-peer, fedavg-server, centralized, ...
    party: str  # this party's name, as in the key list: worker-0, split-client-1, fedavg-server
    index: int  # its index among the parties that hold training data (0 for a server)
    parties: int  # how many parties hold training data
    data_dir: Path | None  # this party's data folder, {party} and {index} filled in
    seed: int
    device: str = "cpu"


def party_data_dir(data_dir: Path | None, party: str, index: int) -> Path | None:
    """`data_dir` with {party} and {index} filled in; ValueError for any other placeholder."""
    if data_dir is None:
        return None
    text = str(data_dir)
    fields = {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}
    if unknown := fields - set(PLACEHOLDERS):
        raise ValueError(f"--data-dir {text!r}: unknown placeholder {{{sorted(unknown)[0]}}}; use {{party}} or {{index}}")
    return Path(text.format(party=party, index=index))


def has_placeholders(data_dir: Path | None) -> bool:
    return data_dir is not None and any(f"{{{name}}}" in str(data_dir) for name in PLACEHOLDERS)


def context_of(settings: object, role: str, party: str, index: int = 0) -> Context:
    """The context of `party` (a `role`) under learning `settings` (a learning.settings class)."""
    parties = next((getattr(settings, name) for name in PARTY_COUNTS if hasattr(settings, name)), 1)
    return Context(role, party, index, parties, party_data_dir(settings.data_dir, party, index), settings.seed)
