"""Split learning over the real broker, every role its own OS process, equals centralized."""

import json
import subprocess
import sys

import pytest

from splitfed.learning.settings import SplitSettings
from splitfed.scenarios import launch, split
from splitfed.scenarios.split import SplitRun
from tests.conftest import max_param_diff


@pytest.mark.parametrize(("mode", "via"), [("vanilla", "relay"), ("vanilla", "direct"), ("u-shaped", "relay"), ("u-shaped", "direct")])
def test_split_processes_over_rabbitmq_equal_centralized(broker_url, session, digits_baseline, tmp_path, mode, via):
    baseline, baseline_model = digits_baseline
    settings = SplitSettings(dataset="digits", epochs=1, batch_size=32, mode=mode)
    result = launch.run(split.SCENARIO, settings, SplitRun(broker=broker_url, session=session, via=via, timeout=120, save_model=tmp_path / "model.safetensors"))
    assert result["config"]["launch"] == "processes"
    assert max_param_diff(baseline_model, tmp_path / "model.safetensors") <= 1e-5
    assert result["accuracy"] == baseline["accuracy"]
    assert result["traffic"]["messages"] >= 2 * 45  # one exchange per batch at least


def test_signed_split_processes_equal_centralized(broker_url, session, digits_baseline, tmp_path):
    from splitfed.security import keys

    _, baseline_model = digits_baseline
    key_list = keys.generate(tmp_path / "keys", ["split-client", "split-server"])
    settings = SplitSettings(dataset="digits", epochs=1, batch_size=32)
    run = SplitRun(broker=broker_url, session=session, via="relay", timeout=120, save_model=tmp_path / "model.safetensors", key_list=key_list)
    result = launch.run(split.SCENARIO, settings, run)
    assert result["config"]["authenticated"] is True
    assert max_param_diff(baseline_model, tmp_path / "model.safetensors") <= 1e-5


def test_cli_run_split_over_rabbitmq_writes_results(broker_url, tmp_path):
    out = tmp_path / "results.json"
    completed = subprocess.run(
        [sys.executable, "-m", "splitfed", "run", "split", "--dataset", "digits", "--limit", "320", "--broker", broker_url,
         "--via", "relay", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    result = json.loads(out.read_text())
    assert result["scenario"] == "split" and len(result["history"]) == 1
    assert set(result) >= {"accuracy", "loss", "wall_seconds", "history", "traffic", "config"}
    assert "guest:guest" not in out.read_text()  # credentials are not written into results
