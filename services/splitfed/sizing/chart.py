"""The chart's side of sizing: Kubernetes memory quantities, a limit checked against an estimate,
and the learning settings the chart's (merged) values give each role, as the templates merge them
(templates/_role.tpl: the family's shared settings, then the role's own)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from splitfed import config
from splitfed.learning.settings import LOCAL_FORMATS
from splitfed.roles.p2p.common import TRACKER
from splitfed.roles.registry import FAMILIES, ROLES
from splitfed.sizing.parts import Estimate
from splitfed.sizing.estimators import ROLE_NAMES, estimate, settings_class, sizes_model
from splitfed.sizing.measured import MIB
from splitfed.sizing.shapes import NotSized

TASK_SOURCES = ("file", "configMap", "module")  # the chart's task values: each gives the roles a task
PER_PARTY_SOURCES = ("hostPath", "existingClaim", "volumeClaimTemplate")  # data.perParty: each party a folder of its own


def values_key(role: str) -> str:
    """The role's section in the chart's values (split-client: splitClient)."""
    return ROLES[role].values_key


_QUANTITY = re.compile(r"(?P<number>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|m|k|M|G|T|P|E|[eE][+-]?[0-9]+)?")
_SUFFIXES = {
    "": Decimal(1), "m": Decimal("0.001"),
    "k": Decimal(10) ** 3, "M": Decimal(10) ** 6, "G": Decimal(10) ** 9, "T": Decimal(10) ** 12, "P": Decimal(10) ** 15, "E": Decimal(10) ** 18,
    "Ki": Decimal(2) ** 10, "Mi": Decimal(2) ** 20, "Gi": Decimal(2) ** 30, "Ti": Decimal(2) ** 40, "Pi": Decimal(2) ** 50, "Ei": Decimal(2) ** 60,
}


def parse_quantity(quantity: str | int | float) -> int:
    """Bytes in a Kubernetes memory quantity ("640Mi", "1Gi", "600M", "1e9", "129974848"), rounded
    up to a whole byte as Kubernetes does; ValueError for anything else."""
    if isinstance(quantity, bool) or not isinstance(quantity, (str, int, float)):
        raise ValueError(f"memory quantity {quantity!r}: not a Kubernetes quantity")
    text = str(quantity).strip() if not isinstance(quantity, float) else repr(quantity)
    match = _QUANTITY.fullmatch(text)
    if not match:
        raise ValueError(f"memory quantity {str(quantity)[:40]!r}: not a Kubernetes quantity (such as 512Mi, 1Gi, 600M or a number of bytes)")
    suffix = match["suffix"] or ""
    try:
        scale = _SUFFIXES[suffix] if suffix in _SUFFIXES else Decimal(10) ** int(suffix[1:])
        value = Decimal(match["number"]) * scale
    except (ArithmeticError, ValueError):
        raise ValueError(f"memory quantity {str(quantity)[:40]!r}: out of range") from None
    return int(value.to_integral_value(rounding="ROUND_CEILING"))


def check_fits(estimate: Estimate, limit: str | int | None) -> str | None:
    """A warning when the memory `limit` (a Kubernetes quantity; None: no limit) is below the
    estimated peak of `estimate`; None when it fits."""
    if limit is None:
        return None
    limit_bytes = parse_quantity(limit)
    if limit_bytes >= estimate.mib * MIB:
        return None
    s = estimate.settings
    what = f"{s['model']} on {s['dataset']}, batch {s['batch_size']}, eval batch {s['eval_batch_size']}, {s['optimizer']}"
    return (f"{estimate.role}: memory limit {limit} ({limit_bytes / MIB:.0f} MiB) is below its estimated peak of {estimate.mib:.0f} MiB "
            f"({what}; {estimate.torch_build or 'no'} torch): it would be OOM-killed; set {values_key(estimate.role)}.resources.limits.memory "
            f"to {estimate.limit} (splitfed size --role {estimate.role})")


def family_of(values: Mapping[str, Any], role: str) -> str:
    """The family whose shared settings the chart gives `role` (templates/_role.tpl): its own; for a
    role of several families (the p2p-tracker), the first whose other roles the release enables (the
    tracker: smpl with smplPeer.enabled only, else p2p), else its first."""
    families = ROLES[role].families
    enabled = [family for family in families
               if any((values.get(values_key(other)) or {}).get("enabled") for other in FAMILIES[family] if other != role)]
    return (enabled or families)[0]


def role_settings(values: Mapping[str, Any], role: str) -> dict[str, Any]:
    """The learning settings (by field name, checked) the chart gives `role`: data.dataset, the
    family's shared settings, then the role's own, which win; a family's counts are the replicas of
    the role they count (workers: fedavgWorker.replicas, clients: splitClient.replicas, peers:
    p2pPeer.replicas or smplPeer.replicas)."""
    family = family_of(values, role)
    merged = dict((values.get(family) or {}).get("settings") or {})
    merged.update(((values.get(values_key(role)) or {}).get("settings")) or {})
    dataset = (values.get("data") or {}).get("dataset")
    if dataset is not None:
        merged["dataset"] = dataset
    for counted in FAMILIES[family]:
        spec = ROLES[counted]
        replicas = (values.get(spec.values_key) or {}).get("replicas")
        # The tracker is sized from SMPL's settings, whose hyperedges it draws; with p2p peers it
        # draws none, and their count (one peer is a p2p run) would be checked against a hyperedge's size.
        if spec.counts and replicas and not (role == TRACKER and family == "p2p"):
            merged[spec.counts] = replicas
    found = {}
    for option in config.options(settings_class(role)):
        value = merged.get(option.flag[2:])
        if value is not None:
            found[option.name] = option.parse(option.text(value))
    return found


def read_in_pods(values: Mapping[str, Any]) -> str | None:
    """Why the chart's model or data cannot be sized here, if they cannot: a task (its code and
    the data it reads are the pods'), or data of each party's own (in the pods' volumes)."""
    task = values.get("task") or {}
    if given := [name for name in TASK_SOURCES if task.get(name)]:
        return f"the task (task.{given[0]}) builds the model and reads the data in the pods"
    data = values.get("data") or {}
    if data.get("dataset") in LOCAL_FORMATS:
        return f"each party reads its own {data['dataset']} files in its pod"
    per_party = data.get("perParty") or {}
    if given := [name for name in PER_PARTY_SOURCES if per_party.get(name)]:
        return f"each party reads its own folder in its pod (data.perParty.{given[0]})"
    return None


def check_values(values: Mapping[str, Any], torch_build: str | None = None) -> list[str]:
    """Warnings, one per enabled role of the chart's (merged) `values` whose memory limit is below
    its estimated peak, or that cannot be sized here (a task's, or each party's own data: its limit
    is then not checked). A role with gpu.enabled is sized with the CUDA build its image carries."""
    warnings = []
    in_pods = read_in_pods(values)
    for role in ROLE_NAMES:
        section = values.get(values_key(role)) or {}
        if not section.get("enabled") or section.get("replicas", 1) == 0:
            continue
        if in_pods and sizes_model(role):
            warnings.append(f"{role}: memory limit not checked: not sized ({in_pods}); `splitfed size {role}` sizes it where its task and data can be read")
            continue
        gpu = bool((section.get("gpu") or {}).get("enabled"))
        try:
            found = estimate(role, config.build(settings_class(role), role_settings(values, role)), torch_build=torch_build or ("cuda" if gpu else None))
        except NotSized as exc:
            warnings.append(f"{role}: memory limit not checked: not sized ({exc})")
            continue
        limit = ((section.get("resources") or {}).get("limits") or {}).get("memory")
        if warning := check_fits(found, limit):
            warnings.append(warning)
    return warnings
