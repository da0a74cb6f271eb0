"""The alert rules (helm/splitfed/files/alerts/splitfed.rules.yaml, which the chart's
PrometheusRule embeds) checked by Prometheus' own promtool: `promtool check rules` and
`promtool test rules` with the unit tests in splitfed.rules.test.yaml, where every alert has a
case that fires and one that must not; and the chart's rendered PrometheusRule through
`promtool check rules` too."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import CHART, render

RULES = CHART / "files" / "alerts" / "splitfed.rules.yaml"
UNIT_TESTS = Path(__file__).resolve().parent / "splitfed.rules.test.yaml"
# The alerts the chart promises: a party down, a round or epoch stalled, rejections spiking, unsafe mode on,
# a worker missing rounds, secure sums that keep failing to unmask, the broker's queue growing without consumers.
ALERTS = {"SplitfedPartyDown", "SplitfedRoundStalled", "SplitfedEpochStalled", "SplitfedRejectionsSpiking",
          "SplitfedUnsafeMode", "SplitfedWorkerMissingRounds", "SplitfedSecAggAttemptsFailing", "SplitfedQueueGrowingWithoutConsumers"}


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:  # a missing tool is a broken set-up, never a skip
        pytest.fail("promtool is not installed: run `ci/setup.sh test` (it installs Debian's prometheus package)")
    return path


def run(promtool: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([promtool, *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def test_promtool_check_rules(promtool, tmp_path):
    result = run(promtool, "check", "rules", str(RULES), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


def test_promtool_unit_tests(promtool, tmp_path):
    result = run(promtool, "test", "rules", str(UNIT_TESTS), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_alerts_of_the_issue_and_nothing_else():
    assert {rule["alert"] for rule in rules()} == ALERTS
    assert all("alert" in rule for rule in rules()), "recording rules belong elsewhere"


def test_the_rules_use_metrics_splitfed_exports():
    from prometheus_client.metrics import MetricWrapperBase

    from splitfed.observability import metrics

    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
    exported = {metric._name + suffix for metric in vars(metrics).values() if isinstance(metric, MetricWrapperBase)
                for suffix in suffixes[metric._type]}
    used = {name for rule in rules() for name in re.findall(r"\bsplitfed_[a-z_]+", rule["expr"])}
    assert used and used <= exported, f"not exported by splitfed: {sorted(used - exported)}"


@pytest.mark.parametrize("rule", rules(), ids=lambda rule: rule["alert"])
def test_every_alert_says_how_bad_and_what(rule):
    assert rule["labels"]["severity"] in ("critical", "warning", "info")
    assert rule.get("for"), "an alert without `for` fires on a single evaluation"
    assert {"summary", "description"} <= set(rule["annotations"])
    assert "{{ $labels." in rule["annotations"]["summary"]


def test_the_unit_tests_use_this_rules_file():
    tests = yaml.safe_load(UNIT_TESTS.read_text())
    assert [(UNIT_TESTS.parent / path).resolve() for path in tests["rule_files"]] == [RULES.resolve()]


@pytest.mark.parametrize("alert", sorted(ALERTS))
def test_every_alert_has_a_firing_and_a_silent_case(alert):
    cases = [case for test in yaml.safe_load(UNIT_TESTS.read_text())["tests"]
             for case in test.get("alert_rule_test", []) if case["alertname"] == alert]
    assert any(case.get("exp_alerts") for case in cases), f"no case where {alert} fires"
    assert any(not case.get("exp_alerts") for case in cases), f"no case where {alert} must stay silent"


def test_the_chart_renders_rules_promtool_accepts(promtool, helm, tmp_path):
    (rule,) = [o for o in render(helm, "--set", "metrics.prometheusRule.enabled=true") if o["kind"] == "PrometheusRule"]
    rendered = tmp_path / "rendered.rules.yaml"
    rendered.write_text(yaml.safe_dump(rule["spec"]))
    result = run(promtool, "check", "rules", str(rendered), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert rule["spec"] == yaml.safe_load(RULES.read_text())
