"""A served FedAvg worker whose task builds another model than the server's, over the real broker:
the server refuses its join, the worker exits with code 5 and one line naming both fingerprints,
never trains, and the run goes on with a worker that builds the server's model."""

import numpy as np
from sklearn.datasets import load_digits
from typer.testing import CliRunner

from splitfed.cli import app
from splitfed.learning.settings import FederatedSettings
from splitfed.observability.metrics import rejected_count
from splitfed.roles.declaration import Identity
from splitfed.roles.fedavg import SERVER, ServerDeployment, WorkerDeployment
from splitfed.roles.fedavg.server import FedAvgServer
from splitfed.roles.fedavg.worker import FedAvgWorker
from splitfed.scenarios.launch import RoleThread
from splitfed.transport.rabbitmq import RabbitTransport

TASK = """
from torch import nn

classes = [str(digit) for digit in range(10)]

def model(context):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, {hidden}), nn.ReLU(), nn.Linear({hidden}, 10))
"""


def test_a_served_worker_that_builds_another_model_exits_5_and_never_trains(broker_url, session, tmp_path):
    digits = load_digits()
    (tmp_path / "data" / "worker-0").mkdir(parents=True)
    x, y = digits.images[:120].astype(np.uint8).reshape(-1, 1, 8, 8), digits.target[:120].astype(np.int64)
    np.savez(tmp_path / "data" / "worker-0" / "train.npz", x=x[:90], y=y[:90])
    np.savez(tmp_path / "data" / "worker-0" / "test.npz", x=x[90:], y=y[90:])
    for name, hidden in (("task.py", 16), ("wider.py", 32)):
        (tmp_path / name).write_text(TASK.format(hidden=hidden))
    settings = FederatedSettings(task=str(tmp_path / "task.py"), dataset="npz", data_dir=f"{tmp_path}/data/{{party}}", workers=1, rounds=1, evaluate="parties")
    transports = [RabbitTransport(broker_url, name=f"{party}-{session}") for party in ("server", "worker-0")]
    try:
        run_with_a_refused_worker(broker_url, session, tmp_path, settings, *transports)
    finally:
        for transport in transports:
            transport.close()


def run_with_a_refused_worker(broker_url, session, tmp_path, settings, server_transport, worker_transport):
    server = FedAvgServer(settings, ServerDeployment(session=session, timeout=60), server_transport, Identity())
    running = RoleThread(SERVER, server.run)
    running.start()

    result = CliRunner().invoke(app, [
        "serve", "fedavg-worker", "--session", session, "--worker-id", "worker-0", "--index", "0", "--workers", "1", "--task", str(tmp_path / "wider.py"),
        "--dataset", "npz", "--data-dir", f"{tmp_path}/data/{{party}}", "--broker", broker_url, "--timeout", "30",
    ])
    assert result.exit_code == 5, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "the server refused worker worker-0: fingerprint" in errors[0], result.stderr[-2000:]
    assert f"against {server.fingerprint['model']} (4 tensors, 1210 values)" in errors[0] and "(4 tensors, 2410 values)" in errors[0]
    assert "round 1 trained" not in result.stderr
    assert rejected_count(SERVER, session, "fingerprint") == 1

    good = FedAvgWorker(settings, WorkerDeployment(session=session, timeout=60, worker_id="worker-0", index=0), worker_transport)
    assert good.run()["rounds"] == 1
    assert running.outcome(60)["contributors"] == {"1": ["worker-0"]}
