"""FedAvg in one process equals the plain loop that does the same training and averaging."""

import pytest
import torch
from prometheus_client import REGISTRY
from safetensors.torch import load_file

from splitfed.learning import federated
from splitfed.learning.settings import FederatedSettings
from splitfed.scenarios import fedavg, launch
from splitfed.scenarios.fedavg import FedAvgRun


def final_diff(model, checkpoint_dir) -> float:
    saved = load_file(str(checkpoint_dir / "model.safetensors"))
    return max((model.state_dict()[k] - saved[k]).abs().max().item() for k in saved)


@pytest.mark.parametrize(("strategy", "workers", "local"), [
    ("fedavg", 3, {}), ("fedprox", 3, {}), ("median", 4, {}), ("trimmed-mean", 5, {}), ("krum", 5, {}),
    ("fedavgm", 3, {"local_steps": 10, "lr_decay": 0.8}), ("fedadam", 3, {"rule": "trimmed-mean", "trim": 0.34}),
    ("fedyogi", 3, {"local_steps": 10}), ("fedadagrad", 3, {}), ("scaffold", 3, {"local_steps": 10, "optimizer": "sgd", "lr": 0.05}),
])
def test_fedavg_in_memory_equals_the_plain_loop(tmp_path, strategy, workers, local):
    settings = FederatedSettings(dataset="digits", rounds=2, workers=workers, partition="iid", strategy=strategy, **local)
    reference, history = federated.reference_run(settings)
    result = launch.run(fedavg.SCENARIO, settings, FedAvgRun(session=f"mem-{strategy}", checkpoint_dir=tmp_path))
    assert final_diff(reference, tmp_path) <= 1e-5
    assert [r["accuracy"] for r in result["history"]] == pytest.approx([r.accuracy for r in history], abs=1e-3)
    assert result["contributors"] == {str(r): [f"worker-{i}" for i in range(workers)] for r in (1, 2)}


def test_reference_partition_keeps_classes_apart_and_reports_rounds(tmp_path):
    settings = FederatedSettings(dataset="digits", rounds=3)
    result = launch.run(fedavg.SCENARIO, settings, FedAvgRun(session="mem-classes", checkpoint_dir=tmp_path))
    assert [r["step"] for r in result["history"]] == [1, 2, 3]
    assert all(r["workers"] == ["worker-0", "worker-1", "worker-2"] for r in result["history"])
    labels = {"role": "fedavg-server", "session": "mem-classes"}
    assert REGISTRY.get_sample_value("splitfed_unsafe_mode", labels) == 1.0
    assert REGISTRY.get_sample_value("splitfed_updates_total", {**labels, "outcome": "accepted"}) == 9
    assert REGISTRY.get_sample_value("splitfed_round_duration_seconds_count", labels) == 3
    assert REGISTRY.get_sample_value("splitfed_active_workers", labels) == 3
    assert REGISTRY.get_sample_value("splitfed_round", labels) == 3
    assert REGISTRY.get_sample_value("splitfed_round_bytes", labels) > 0
    assert REGISTRY.get_sample_value("splitfed_test_accuracy", labels) == result["accuracy"]


def test_signed_run_in_memory_is_not_unsafe(tmp_path):
    from splitfed.security import keys

    key_list = keys.generate(tmp_path / "keys", ["fedavg-server", "worker-0", "worker-1", "worker-2"])
    settings = FederatedSettings(dataset="digits", rounds=1, partition="iid")
    result = launch.run(fedavg.SCENARIO, settings, FedAvgRun(session="mem-signed", key_list=key_list))
    assert result["config"]["authenticated"] is True
    assert REGISTRY.get_sample_value("splitfed_unsafe_mode", {"role": "fedavg-server", "session": "mem-signed"}) == 0.0
    assert torch.isfinite(torch.tensor(result["loss"]))
