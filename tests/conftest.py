"""Shared fixtures. Broker tests use the real RabbitMQ that `make test` starts (ci/broker.sh)."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pika
import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.shared_broker import BROKER, delete_queues_of



@pytest.fixture(scope="session")
def broker_url() -> str:
    try:
        pika.BlockingConnection(pika.URLParameters(BROKER)).close()
    except Exception as exc:  # a missing broker is a broken set-up, never a skip
        pytest.fail(f"RabbitMQ at {BROKER} does not answer ({exc!r}); run ci/broker.sh")
    return BROKER


@pytest.fixture
def session(request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh session name. With the shared broker, the queues of the session are deleted after
    the test, whether it passed or not."""
    name = "test-" + uuid.uuid4().hex[:10]
    yield name
    if "broker_url" in request.fixturenames:
        delete_queues_of(BROKER, name)


# -- the Helm chart ---------------------------------------------------------------------------

HANG_GUARD = 300  # seconds: only a run that is stuck takes this long, however loaded the machine
REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "helm" / "splitfed"
HELM = REPO / ".tools" / "bin" / "helm"
RELEASE = "ci"


@pytest.fixture(scope="session")
def helm() -> Path:
    """helm 3.19, installed by the install part of ci/chart.sh if it is not there yet."""
    HELM.parent.mkdir(parents=True, exist_ok=True)
    with (HELM.parent / ".install.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # pytest-xdist workers: one installs, the others wait for it
        if not HELM.exists():
            env = {**os.environ, "VENV": sys.prefix}
            subprocess.run(["bash", str(REPO / "ci" / "chart.sh"), "install"], cwd=REPO, env=env, check=True)
    assert HELM.exists(), "ci/chart.sh install did not produce .tools/bin/helm"
    return HELM


def helm_template(helm: Path, *args: str, release: str = RELEASE) -> subprocess.CompletedProcess:
    return subprocess.run([str(helm), "template", release, str(CHART), "--kube-version", "1.30.0", *args],
                          capture_output=True, text=True)


def render(helm: Path, *args: str, release: str = RELEASE) -> list[dict]:
    result = helm_template(helm, *args, release=release)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def max_param_diff(path_a, path_b) -> float:
    a, b = load_file(str(path_a)), load_file(str(path_b))
    assert sorted(a) == sorted(b), "the two models hold different layers"
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="session")
def digits_baseline(tmp_path_factory):
    """Centralized training on digits, one epoch: the result every split mode must reproduce."""
    from splitfed.learning.settings import TrainSettings
    from splitfed.scenarios import centralized, launch

    path = tmp_path_factory.mktemp("baseline") / "centralized.safetensors"
    result = launch.run(centralized.SCENARIO, TrainSettings(dataset="digits", epochs=1, batch_size=32), centralized.CentralizedRun(save_model=path))
    return result, path


# Two torch threads at most; under pytest-xdist the workers share the cores, each taking its share.
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))))
