"""The Grafana dashboard schema check (tests/observability/grafana_schema.py) passes a valid dashboard
and names the field at fault in an invalid one. The schema comes from ci/grafana_schema.sh."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable

import pytest

from tests.observability.grafana_schema import SCHEMA_PATH, problems

PROMETHEUS = {"type": "prometheus", "uid": "${datasource}"}


def _dashboard() -> dict:
    """A small dashboard as Grafana 11-13 saves one: a timeseries panel over Prometheus, a datasource
    variable and a query variable, the built-in annotation."""
    return {
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "target": {"limit": 100, "matchAny": False, "tags": [], "type": "dashboard"},
                    "type": "dashboard",
                }
            ]
        },
        "editable": True,
        "graphTooltip": 1,
        "id": None,
        "links": [],
        "panels": [
            {
                "datasource": PROMETHEUS,
                "description": "Rounds completed per minute, by job.",
                "fieldConfig": {
                    "defaults": {
                        "color": {"mode": "palette-classic"},
                        "custom": {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10},
                        "thresholds": {
                            "mode": "absolute",
                            "steps": [{"color": "green", "value": None}, {"color": "red", "value": 80}],
                        },
                        "unit": "short",
                    },
                    "overrides": [],
                },
                "gridPos": {"h": 8, "w": 12, "x": 0, "y": 0},
                "id": 1,
                "options": {
                    "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                    "tooltip": {"mode": "multi", "sort": "none"},
                },
                "targets": [
                    {
                        "datasource": PROMETHEUS,
                        "expr": 'sum by (job) (rate(splitfed_rounds_total{job=~"$job"}[$__rate_interval])) * 60',
                        "legendFormat": "{{job}}",
                        "refId": "A",
                    }
                ],
                "title": "Rounds per minute",
                "type": "timeseries",
            }
        ],
        "refresh": "30s",
        "schemaVersion": 39,
        "tags": ["splitfed"],
        "templating": {
            "list": [
                {
                    "current": {"text": "Prometheus", "value": "prometheus"},
                    "hide": 0,
                    "includeAll": False,
                    "label": "Data source",
                    "multi": False,
                    "name": "datasource",
                    "options": [],
                    "query": "prometheus",
                    "refresh": 1,
                    "regex": "",
                    "type": "datasource",
                },
                {
                    "datasource": PROMETHEUS,
                    "definition": "label_values(splitfed_rounds_total, job)",
                    "hide": 0,
                    "includeAll": True,
                    "label": "Job",
                    "multi": True,
                    "name": "job",
                    "options": [],
                    "query": {
                        "query": "label_values(splitfed_rounds_total, job)",
                        "refId": "PrometheusVariableQueryEditor-VariableQuery",
                    },
                    "refresh": 2,
                    "regex": "",
                    "sort": 1,
                    "type": "query",
                },
            ]
        },
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "timezone": "browser",
        "title": "splitfed test dashboard",
        "uid": "splitfed-test",
        "version": 1,
    }


def test_the_schema_says_where_it_comes_from():
    schema = json.loads(SCHEMA_PATH.read_text())
    assert "@grafana/schema@" in schema["$comment"]
    assert schema["required"] == ["schemaVersion"]


def test_a_valid_dashboard_passes():
    assert problems(_dashboard()) == []


def test_rows_and_library_panels_pass():
    dashboard = _dashboard()
    timeseries = copy.deepcopy(dashboard["panels"][0])
    timeseries["gridPos"] = {"h": 8, "w": 12, "x": 0, "y": 10}
    library = {"gridPos": {"h": 8, "w": 12, "x": 12, "y": 0}, "id": 5,
               "libraryPanel": {"name": "Broker queues", "uid": "splitfed-queues"}}
    dashboard["panels"] += [
        {"collapsed": False, "gridPos": {"h": 1, "w": 24, "x": 0, "y": 8}, "id": 2, "panels": [],
         "title": "Open row", "type": "row"},
        {"collapsed": True, "gridPos": {"h": 1, "w": 24, "x": 0, "y": 9}, "id": 3,
         "panels": [timeseries | {"id": 4}, library | {"id": 6}], "title": "Collapsed row", "type": "row"},
        library,
    ]
    assert problems(dashboard) == []


_DROP = object()


def _set(path: str, value=_DROP) -> Callable[[dict], None]:
    """A change to the dashboard: set the field at `path` (dots; numbers index lists) to `value`,
    or remove it."""
    *parents, last = [int(key) if key.isdigit() else key for key in path.split(".")]

    def change(dashboard: dict) -> None:
        for key in parents:
            dashboard = dashboard[key]
        if value is _DROP:
            del dashboard[last]
        else:
            dashboard[last] = value

    return change


def _drop(path: str) -> Callable[[dict], None]:
    return _set(path)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        pytest.param(_set("panels", "x"), "$.panels: 'x' is not of type 'array'", id="panels-not-a-list"),
        pytest.param(_set("panels.0.gridPos.h", "tall"), "$.panels[0].gridPos.h: 'tall' is not of type 'number'",
                     id="gridPos-h-not-a-number"),
        pytest.param(_drop("schemaVersion"), "$: 'schemaVersion' is a required property", id="no-schemaVersion"),
        pytest.param(_drop("panels.0.type"), "$.panels[0]: 'type' is a required property", id="panel-without-type"),
        pytest.param(_set("templating.list.1.type", "dropdown"), "$.templating.list[1].type: 'dropdown' is not one of",
                     id="unknown-variable-type"),
        pytest.param(_set("templating.list.0.refresh", "yes"), "$.templating.list[0].refresh: 'yes' is not",
                     id="bad-variable-refresh"),
        pytest.param(_set("time", {"from": "now-1h"}), "$.time: 'to' is a required property", id="time-without-to"),
        pytest.param(_set("panels.0.fieldConfig.defaults.thresholds.mode", "relative"),
                     "$.panels[0].fieldConfig.defaults.thresholds.mode: 'relative' is not one of",
                     id="bad-thresholds-mode"),
        # What the types leave open stays open: query targets are the data source plugin's business,
        # and fields the types do not list are allowed.
        pytest.param(_set("panels.0.targets.0.refId", 1), None, id="targets-unchecked"),
        pytest.param(_set("panels.0.pluginVersionX", "typo"), None, id="extra-fields-allowed"),
    ],
)
def test_a_broken_dashboard_fails_naming_the_field(change, expected):
    dashboard = _dashboard()
    change(dashboard)
    found = problems(dashboard)
    if expected is None:
        assert found == []
    else:
        assert found and all(problem.startswith(expected) for problem in found), found


def test_a_broken_row_names_the_row_and_the_panel_inside():
    dashboard = _dashboard()
    inner = copy.deepcopy(dashboard["panels"][0])
    inner["gridPos"]["w"] = "wide"
    dashboard["panels"].append({"collapsed": True, "id": 2, "panels": [inner], "title": "Row", "type": "row"})
    dashboard["panels"].append({"id": 3, "panels": [], "type": "row"})  # a row must say if it is collapsed
    assert problems(dashboard) == [
        "$.panels[1].panels[0].gridPos.w: 'wide' is not of type 'number'",
        "$.panels[2]: 'collapsed' is a required property",
    ]
