"""Shared fixtures. Broker tests use the real RabbitMQ that `make test` starts (ci/broker.sh)."""

from __future__ import annotations

import os
import uuid

import pika
import pytest
import torch
from safetensors.torch import load_file

BROKER = os.environ.get("SPLITFED_TEST_BROKER", "amqp://guest:guest@127.0.0.1:5672/")


@pytest.fixture(scope="session")
def broker_url() -> str:
    try:
        pika.BlockingConnection(pika.URLParameters(BROKER)).close()
    except Exception as exc:  # a missing broker is a broken set-up, never a skip
        pytest.fail(f"RabbitMQ at {BROKER} does not answer ({exc!r}); run ci/broker.sh")
    return BROKER


@pytest.fixture
def session() -> str:
    return "test-" + uuid.uuid4().hex[:10]


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


torch.set_num_threads(min(2, os.cpu_count() or 1))
