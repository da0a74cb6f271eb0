"""Every metric follows the one scheme (observability/metrics.py), is exported by a role that
declares it, and the README's metrics table is the generated one."""

from pathlib import Path

import pytest

from splitfed import docs
from splitfed.observability import metrics
from splitfed.roles.registry import ROLES

README = Path(__file__).resolve().parents[2] / "README.md"
DECLARED = docs.declared_metrics()


def test_there_are_metrics_to_check():
    assert len(DECLARED) >= 15


@pytest.mark.parametrize("metric", DECLARED, ids=docs.exposed_name)
def test_metric_follows_the_scheme(metric):
    name = docs.exposed_name(metric)
    assert name.startswith("splitfed_")
    assert metric._type != "counter" or name.endswith("_total")
    assert metric._type == "counter" or not name.endswith("_total"), "only counters end in _total"
    if metric._type == "histogram":
        assert name.endswith(("_seconds", "_bytes")), "a histogram measures a duration or a size: say which in its unit suffix"
    if "seconds" in name or "duration" in name:
        assert name.removesuffix("_total").endswith("_seconds")
    if "bytes" in name:
        assert name.removesuffix("_total").endswith("_bytes")
    assert metric._labelnames[:2] == ("role", "session")
    unbounded = set(metric._labelnames[2:]) - set(metrics.BOUNDED_LABELS)
    assert not unbounded, f"labels {unbounded} are not among the bounded ones"
    assert metric._documentation


@pytest.mark.parametrize("metric", DECLARED, ids=docs.exposed_name)
def test_metric_is_exported_by_a_role(metric):
    assert any(metric in spec.metrics for spec in ROLES.values()), "declared but no role lists it"


def test_roles_list_only_declared_metrics():
    for spec in ROLES.values():
        assert set(spec.metrics) <= set(DECLARED), spec.name
        assert set(metrics.WIRE) <= set(spec.metrics), f"{spec.name} talks over the transport but misses a wire metric"


def test_readme_holds_the_generated_metrics_table():
    text = README.read_text()
    start, end = text.index(docs.METRICS_BEGIN), text.index(docs.METRICS_END) + len(docs.METRICS_END)
    assert text[start:end] == docs.metrics_table(), "README metrics are stale: run ci/update_readme_options.sh"


def test_the_scheme_test_can_fail():
    from prometheus_client import CollectorRegistry, Counter

    wrong = Counter("splitfed_wrongly_labelled", "labels in the wrong order", ["session", "role"], registry=CollectorRegistry())
    with pytest.raises(AssertionError):
        test_metric_follows_the_scheme(wrong)
