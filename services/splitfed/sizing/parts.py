"""What an estimate is: a role's phases, each a sum of parts with their own bounds, its peak, and
the request and limit it suggests for the chart (pure arithmetic, no I/O)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from splitfed.roles.registry import ROLES
from splitfed.sizing.measured import LIMIT_MARGIN, ROUND_TO_MIB, UNCERTAINTY


@dataclass(frozen=True)
class Part:
    """One term of a phase's sum, in MiB, with its own bounds."""

    name: str
    kind: str  # a key of UNCERTAINTY: which column of the table it falls in
    mib: float
    low: float
    high: float


@dataclass(frozen=True)
class Phase:
    name: str
    parts: tuple[Part, ...]

    @property
    def mib(self) -> float:
        return sum(part.mib for part in self.parts)

    @property
    def low(self) -> float:
        return sum(part.low for part in self.parts)

    @property
    def high(self) -> float:
        return sum(part.high for part in self.parts)


@dataclass(frozen=True)
class Estimate:
    """A role's estimated peak RSS, its bounds and breakdown, and the resources it suggests."""

    role: str
    settings: dict[str, Any]  # what it was estimated for: model, dataset, batch sizes, optimizer...
    torch_build: str | None  # None: the role imports no torch (relay)
    phases: tuple[Phase, ...]
    gpu: tuple[float, float, float] | None = None  # low, estimate, high (MiB of device memory); None without --gpu
    notes: tuple[str, ...] = field(default=())

    @property
    def peak(self) -> Phase:
        return max(self.phases, key=lambda phase: phase.mib)

    @property
    def mib(self) -> float:
        return self.peak.mib

    @property
    def low_mib(self) -> float:
        return max(phase.low for phase in self.phases)

    @property
    def high_mib(self) -> float:
        return max(phase.high for phase in self.phases)

    @property
    def request_mib(self) -> int:
        return rounded_up(self.mib)

    @property
    def limit_mib(self) -> int:
        """1.25 x the estimate (the chart's margin), never below the estimate's high bound."""
        return rounded_up(max(self.mib * LIMIT_MARGIN, self.high_mib))

    @property
    def request(self) -> str:
        return f"{self.request_mib}Mi"

    @property
    def limit(self) -> str:
        return f"{self.limit_mib}Mi"

    def columns(self) -> dict[str, float]:
        """The peak phase's parts summed by kind (the table's columns), in MiB."""
        found = dict.fromkeys(UNCERTAINTY, 0.0)
        for part in self.peak.parts:
            found[part.kind] += part.mib
        return found

    def resources(self) -> dict[str, Any]:
        """This role's entry in values.yaml."""
        entry: dict[str, Any] = {"resources": {"requests": {"memory": self.request}, "limits": {"memory": self.limit}}}
        if self.gpu is not None:
            entry["gpu"] = {"enabled": True}
        return entry

    def as_dict(self) -> dict[str, Any]:
        return {
            "role": self.role, "values_key": ROLES[self.role].values_key, "settings": self.settings, "torch_build": self.torch_build,
            "peak_phase": self.peak.name, "mib": round(self.mib, 1), "low_mib": round(self.low_mib, 1), "high_mib": round(self.high_mib, 1),
            "request": self.request, "limit": self.limit, "columns": {k: round(v, 1) for k, v in self.columns().items()},
            "phases": [{"name": phase.name, "mib": round(phase.mib, 1), "low_mib": round(phase.low, 1), "high_mib": round(phase.high, 1),
                        "parts": {part.name: round(part.mib, 2) for part in phase.parts}} for phase in self.phases],
            "gpu": None if self.gpu is None else {
                "count": 1, "low_mib": round(self.gpu[0], 1), "mib": round(self.gpu[1], 1), "high_mib": round(self.gpu[2], 1),
            },
            "notes": list(self.notes),
        }


def rounded_up(mib: float) -> int:
    return math.ceil(mib / ROUND_TO_MIB) * ROUND_TO_MIB
