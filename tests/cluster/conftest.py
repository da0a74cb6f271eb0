"""Fixtures for the cluster commands. No API server, kind or Docker can run here: the kubernetes
client (and, in the dry-run test, helm) talk to FakeCoreV1Api, which answers with recorded API
responses; helm itself is the real one where its behaviour is under test (test_helm_dry_run) and
a recording stand-in elsewhere (it only writes down the arguments it was called with)."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from splitfed.cluster import kube, watch
from tests.cluster.recorded_api import FakeCoreV1Api

RECORDING_HELM = '''
import json, os, pathlib, sys
args = sys.argv[1:]
entry = {"argv": args}
if "-f" in args:
    entry["values"] = json.loads(pathlib.Path(args[args.index("-f") + 1]).read_text())
with open(os.environ["RECORDING_HELM_LOG"], "a") as log:
    log.write(json.dumps(entry) + "\\n")
failure = os.environ.get("RECORDING_HELM_FAILS")
if failure:
    print(failure, file=sys.stderr)
    sys.exit(1)
print(f"Release \\"{args[2] if args[0] == 'upgrade' else args[1]}\\" recorded by the stand-in helm")
'''


@pytest.fixture
def api(tmp_path, monkeypatch) -> Iterator[FakeCoreV1Api]:
    """The recorded-responses stand-in, with KUBECONFIG pointing at it (context namespace ns1).
    The watch asks each poll for pods the cluster refused to make; unless a test says otherwise,
    there are none."""
    fake = FakeCoreV1Api().add("GET", "/version", "version.json").add("GET", "/version/", "version.json")
    fake.add("GET", "/api/v1/namespaces/ns1/events", "events-none.json", fieldSelector="reason=FailedCreate").start()
    monkeypatch.setenv("KUBECONFIG", str(fake.kubeconfig(tmp_path)))
    yield fake
    fake.stop()


@pytest.fixture
def recording_helm(tmp_path, monkeypatch) -> Callable[[], list[dict]]:
    """SPLITFED_HELM set to a stand-in that records its arguments (and the -f values file)."""
    script = tmp_path / "recording-helm"
    script.write_text(f"#!{sys.executable}\n{RECORDING_HELM}")
    script.chmod(0o755)
    log = tmp_path / "helm-calls.jsonl"
    monkeypatch.setenv("SPLITFED_HELM", str(script))
    monkeypatch.setenv("RECORDING_HELM_LOG", str(log))
    return lambda: [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


@pytest.fixture
def no_wait(monkeypatch) -> None:
    """The watch polls without pausing: the recorded responses change from one request to the next."""
    monkeypatch.setattr(watch, "_sleep", lambda seconds: None)


@pytest.fixture(autouse=True)
def backoff(monkeypatch) -> list[float]:
    """The pauses kube.request would make between tries, recorded rather than waited."""
    pauses: list[float] = []
    monkeypatch.setattr(kube, "_sleep", pauses.append)
    return pauses


@pytest.fixture(autouse=True)
def keep_logging() -> Iterator[None]:
    """Commands configure logging onto the test runner's stderr; put the root logger back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def invoke(*args: str):
    from splitfed.cli import app

    return CliRunner().invoke(app, [str(arg) for arg in args])


def recorded_json(name: str) -> dict:
    return json.loads((Path(__file__).parent / "recorded" / name).read_text())
