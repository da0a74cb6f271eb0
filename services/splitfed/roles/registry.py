"""Every role of every family, by name: what `splitfed serve`, the launcher, the chart and the
docs enumerate. Adding a family is one package under roles/ and one entry here."""

from __future__ import annotations

from splitfed.roles import fedavg, p2p, split
from splitfed.roles.declaration import RoleSpec

ROLES: dict[str, RoleSpec] = {spec.name: spec for spec in (*split.ROLES, *fedavg.ROLES, *p2p.ROLES)}
