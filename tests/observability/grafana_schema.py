"""Validate a Grafana dashboard (its JSON model, as a dict) against Grafana's published dashboard schema.

The schema is ci/schemas/grafana-dashboard.schema.json, derived offline from the npm package
@grafana/schema by ci/grafana_schema.sh (its `$comment` names the versions and what it loosens).
Nothing here needs node or the network.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import jsonschema
from jsonschema.exceptions import ValidationError

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "ci" / "schemas" / "grafana-dashboard.schema.json"

_LONGEST_MESSAGE = 300


@functools.cache
def _validator() -> jsonschema.protocols.Validator:
    schema = json.loads(SCHEMA_PATH.read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def _describe(error: ValidationError) -> str:
    message = error.message
    if len(message) > _LONGEST_MESSAGE:  # the message quotes the offending value, which may be a whole panel
        keep = _LONGEST_MESSAGE // 2
        message = f"{message[:keep]} ... {message[-keep:]}"
    return f"{error.json_path}: {message}"


def problems(dashboard: dict) -> list[str]:
    """Human-readable schema violations in `dashboard`, each starting with the JSON path at fault
    (e.g. "$.panels[0].gridPos.h: 'tall' is not of type 'number'"); empty when the dashboard is valid."""
    errors = sorted(_validator().iter_errors(dashboard), key=lambda e: (e.json_path, e.message))
    return [_describe(e) for e in errors]
