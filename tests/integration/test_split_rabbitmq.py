"""Split learning over the real broker, every role its own OS process, equals centralized."""

import json
import subprocess
import sys

import pytest

from splitfed.learning.settings import SplitNNSettings, SplitSettings
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


def test_defended_split_processes_over_rabbitmq_equal_their_reference(broker_url, session, tmp_path):
    """NoPeek, activation noise and label DP with the model's prior (one more exchange a batch,
    through the relay) as separate processes: the model equals the one-process reference's, and
    the client's own count of the true labels it sent reaches the results."""
    import dataclasses

    from safetensors.torch import load_file

    from splitfed.learning import clients
    from tests.unit.test_splitnn import max_diff, reference_states

    settings = SplitSettings(dataset="digits", epochs=1, batch_size=32, limit=600, nopeek_weight=0.2, activation_clip=5.0, activation_noise=0.3, label_dp=1.0,
                             label_dp_prior="model")
    result = launch.run(split.SCENARIO, settings, SplitRun(broker=broker_url, session=session, via="relay", timeout=120, save_model=tmp_path / "model.safetensors"))
    parts, bodies = clients.reference_run(SplitNNSettings(**dataclasses.asdict(settings)))
    client, server = reference_states(parts[0], bodies[0])
    assert max_diff(load_file(str(tmp_path / "model.safetensors")), {**client, **server}) <= 1e-5
    assert result["label_dp"]["released"] == 600 and 0 < result["label_dp"]["true"] < 600


def test_signed_split_processes_equal_centralized(broker_url, session, digits_baseline, tmp_path):
    """Signed split processes equal centralized training, and every receiver really checks
    signatures: forged hellos wait in the relay's, the server's and the client's queues before
    the run starts, unsigned or signed with a stranger's key. Accepted, any of them would end the
    run (a client hello with another learning rate, a server hello saying the settings differ)."""
    from splitfed.protocol import Message, encode, encode_body, signed_bytes
    from splitfed.roles.endpoint import queue_name
    from splitfed.roles.split.common import shared
    from splitfed.security import keys
    from splitfed.transport.rabbitmq import RabbitTransport

    _, baseline_model = digits_baseline
    key_list = keys.generate(tmp_path / "keys", ["split-client", "split-server"])
    settings = SplitNNSettings(dataset="digits", epochs=1, batch_size=32)
    forged_hellos = {  # queue -> a hello as one of the halves would send it first
        queue_name(session, "relay"): Message("hello", session, "split-client", seq=1, meta={**shared(settings), "lr": 0.5}),
        queue_name(session, "split-server"): Message("hello", session, "split-client", seq=1, meta={**shared(settings), "lr": 0.5}),
        queue_name(session, "split-client"): Message("hello", session, "split-server", seq=1, meta={"ok": False, "problem": "forged"}),
    }
    with RabbitTransport(broker_url, name=f"forger-{session}") as forger:
        for queue, hello in forged_hellos.items():
            forger.declare(queue)
            forger.publish(queue, encode(hello))  # unsigned
            stranger = keys.Signer(hello.sender, keys.Ed25519PrivateKey.generate())
            hello.sig = stranger.sign(signed_bytes(hello, encode_body({})))
            forger.publish(queue, encode(hello))  # signed, by the wrong key
        run = SplitRun(broker=broker_url, session=session, via="relay", timeout=120, save_model=tmp_path / "model.safetensors", key_list=key_list)
        result = launch.run(split.SCENARIO, settings, run)
    assert result["config"]["launch"] == "processes" and result["history"][-1]["accuracy"] > 0.5
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
