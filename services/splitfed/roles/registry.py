"""Every role of every family, by name: what `splitfed serve`, the launcher, the chart, sizing and
the docs enumerate. Adding a family is one package under roles/ and one entry here."""

from __future__ import annotations

from splitfed.roles import fedavg, p2p, split
from splitfed.roles.declaration import RoleSpec

ROLES: dict[str, RoleSpec] = {spec.name: spec for spec in (*split.ROLES, *fedavg.ROLES, *p2p.ROLES)}

# family -> its roles, in declaration order (the p2p-tracker is in two: p2p and smpl)
FAMILIES: dict[str, tuple[str, ...]] = {
    family: tuple(name for name, spec in ROLES.items() if family in spec.families)
    for family in dict.fromkeys(family for spec in ROLES.values() for family in spec.families)
}
