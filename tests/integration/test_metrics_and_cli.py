"""A running role's Prometheus endpoint, and the CLI's contract (exit codes, stderr, JSON)."""

import json
import subprocess
import sys
import time
import urllib.request

from splitfed.roles.endpoint import queue_name
from splitfed.transport.rabbitmq import RabbitTransport
from tests.ports import free_port


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def metric_value(text: str, name: str, **labels) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_running_split_server_serves_metrics_and_counts_rejections(broker_url, session):
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "splitfed", "serve", "split-server", "--dataset", "digits", "--timeout", "60"],
        env={**__import__("os").environ, "SPLITFED_SESSION": session, "SPLITFED_BROKER": broker_url, "SPLITFED_METRICS_PORT": str(port),
             "SPLITFED_METRICS_ADDRESS": "127.0.0.1"},
        stderr=subprocess.PIPE, text=True,
    )
    try:
        with RabbitTransport(broker_url, name="prober") as prober:
            prober.declare(queue_name(session, "split-server"))
            prober.publish(queue_name(session, "split-server"), b"not a frame")
            deadline, value = time.monotonic() + 120, None  # a hang guard: a loaded machine can take a minute to import torch
            while value is None and time.monotonic() < deadline and server.poll() is None:
                try:
                    text = scrape(port)
                    value = metric_value(text, "splitfed_messages_rejected_total", role="split-server", session=session, reason="malformed")
                except OSError:
                    pass  # not listening yet: torch is still importing
                time.sleep(0.2)
        assert value == 1.0, f"no malformed rejection counted; server said:\n{server.stderr.read() if server.poll() is not None else ''}"
        for family in ("splitfed_messages_total", "splitfed_bytes_total", "splitfed_round_trip_seconds", "splitfed_epoch", "splitfed_train_loss", "splitfed_test_accuracy"):
            assert f"# TYPE {family}" in text
    finally:
        server.kill()
        server.wait()


def test_run_split_scrapes_client_metrics_after_training(tmp_path):
    from prometheus_client import REGISTRY

    from splitfed.learning.settings import SplitSettings
    from splitfed.scenarios import launch, split

    launch.run(split.SCENARIO, SplitSettings(dataset="digits", limit=256, batch_size=32), split.SplitRun(session="metrics-memory", via="direct"))
    sent = REGISTRY.get_sample_value("splitfed_messages_total", {"role": "split-client", "session": "metrics-memory", "kind": "activations", "direction": "sent"})
    trips = REGISTRY.get_sample_value("splitfed_round_trip_seconds_count", {"role": "split-client", "session": "metrics-memory", "client": "split-client"})
    accuracy = REGISTRY.get_sample_value("splitfed_test_accuracy", {"role": "split-client", "session": "metrics-memory"})
    assert sent == 8 + 1 and trips == sent  # 8 training batches + 1 evaluation batch, one round trip each
    assert 0.0 < accuracy <= 1.0


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "splitfed", *args], capture_output=True, text=True, timeout=timeout)


def test_cli_centralized_writes_the_results_file(tmp_path):
    out = tmp_path / "c.json"
    completed = run_cli("run", "centralized", "--dataset", "digits", "--epochs", "2", "--out", str(out))
    assert completed.returncode == 0, completed.stderr
    result = json.loads(out.read_text())
    assert [r["step"] for r in result["history"]] == [1, 2] and result["accuracy"] == result["history"][-1]["accuracy"]
    assert "epoch 2" in completed.stderr  # plain progress lines when not on a terminal


def test_cli_errors_go_to_stderr_with_non_zero_exit(tmp_path):
    missing = run_cli("run", "centralized", "--dataset", "mnist", "--data-dir", str(tmp_path))
    assert missing.returncode == 2 and "IDX files not found" in missing.stderr
    bad_cut = run_cli("run", "split", "--dataset", "digits", "--cut-layer", "42")
    assert bad_cut.returncode == 2 and "cut layer 42" in bad_cut.stderr
    no_broker = run_cli("serve", "relay", "--session", "x", "--broker", "memory")
    assert no_broker.returncode == 2 and "needs --broker amqp" in no_broker.stderr
    unreachable = run_cli("serve", "relay", "--session", "x", "--broker", "amqp://guest:guest@127.0.0.1:1/", "--connect-timeout", "2", timeout=120)
    assert unreachable.returncode == 4 and "cannot connect" in unreachable.stderr


def test_cli_version_and_broker_warnings(broker_url, session, tmp_path):
    from splitfed import __version__
    from splitfed.roles.split.common import session_queues
    from splitfed.security import keys
    from splitfed.transport.rabbitmq import RabbitTransport

    version = run_cli("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"splitfed {__version__}"
    key_list = keys.generate(tmp_path / "keys", ["split-client", "split-server"])
    try:
        signed_plain = run_cli("serve", "relay", "--session", session, "--broker", broker_url, "--key-list", str(key_list), "--timeout", "0.5")
    finally:
        with RabbitTransport(broker_url, name="cleanup") as transport:  # the relay declared its session's queues
            for queue in session_queues(session):
                transport.delete(queue)
    assert signed_plain.returncode == 3 and "no valid" in signed_plain.stderr  # nobody came: a timeout, exit 3
    assert "signed but not encrypted" in signed_plain.stderr and "guest:guest" not in signed_plain.stderr
    tls_on_plain = run_cli("serve", "relay", "--session", session, "--broker", broker_url, "--tls-ca", str(key_list))
    assert tls_on_plain.returncode == 2 and "need an amqps:// broker URL" in tls_on_plain.stderr
    missing_folder = run_cli("run", "centralized", "--dataset", "digits", "--out", str(tmp_path / "missing" / "r.json"))
    assert missing_folder.returncode == 2 and "does not exist" in missing_folder.stderr and "epoch" not in missing_folder.stderr
