"""FedAvg with a task and each party's own data. The parties compare fingerprints when they meet:
a worker that builds another model or class list is refused and never trains, and a worker leaves
a server that builds another. With --evaluate parties (or both) every live worker scores each
round's global model on its own test data and the server adds up their counts: the same as the
plain loop, bit for bit, and as the counts worked out here with plain torch, with a server that
holds no data at all; scores whose counts cannot be true are refused and counted."""

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F

from splitfed.errors import Refused, TaskError
from splitfed.learning import federated
from splitfed.learning.settings import FederatedSettings
from splitfed.observability.metrics import rejected_count
from splitfed.protocol import Message, ProtocolError, decode, encode
from splitfed.roles.endpoint import Endpoint, frame_digest
from splitfed.roles.fedavg import ServerDeployment, WorkerDeployment, admission
from splitfed.roles.fedavg.checkpoints import ServerState
from splitfed.roles.fedavg.common import JOIN, REFUSED, SERVER, WELCOME, server_queue, worker_queue
from splitfed.roles.fedavg.server import FedAvgServer
from splitfed.roles.fedavg.worker import FedAvgWorker
from splitfed.scenarios import fedavg, launch
from splitfed.scenarios.fedavg import FedAvgRun
from splitfed.scenarios.launch import RoleThread, ScenarioError
from splitfed.transport import MemoryBroker, MemoryTransport

WORKERS = ["worker-0", "worker-1", "worker-2"]
CLASSES = [str(digit) for digit in range(10)]
TASK = """
from torch import nn

classes = [str(digit) for digit in range(10)]

def model(context):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, {hidden}), nn.ReLU(), nn.Linear({hidden}, 10))
"""


def write_parties(folder, parties, first=0, per_party=120):
    """Each party its own slice of scikit-learn's digits (the `first`-th slice on): 90 training
    samples in train.npz, 30 test samples in test.npz."""
    digits = load_digits()
    x, y = digits.images.astype(np.uint8).reshape(-1, 1, 8, 8), digits.target.astype(np.int64)
    cut = per_party * 3 // 4
    for number, party in enumerate(parties, first):
        px, py = x[number * per_party : (number + 1) * per_party], y[number * per_party : (number + 1) * per_party]
        (folder / party).mkdir(parents=True)
        np.savez(folder / party / "train.npz", x=px[:cut], y=py[:cut])
        np.savez(folder / party / "test.npz", x=px[cut:], y=py[cut:])
    return folder


@pytest.fixture
def task(tmp_path):
    path = tmp_path / "task.py"
    path.write_text(TASK.format(hidden=16))
    return path


@pytest.fixture
def data(tmp_path):
    return write_parties(tmp_path / "data", WORKERS)  # and no folder for the server


def settings_of(task, data, **changes) -> FederatedSettings:
    return FederatedSettings(**{"task": str(task), "dataset": "npz", "data_dir": f"{data}/{{party}}", "workers": 3, "rounds": 2, "lr": 0.01, **changes})


def worker(settings, broker, index, session):
    return FedAvgWorker(settings, WorkerDeployment(session=session, timeout=60, worker_id=f"worker-{index}", index=index), MemoryTransport(broker))


def plain_torch_counts(state: dict, data) -> tuple[int, float, int]:
    """The model with `state` scored on every worker's test.npz, normalised by the mean and
    standard deviation of its train.npz, with nothing of splitfed's: (correct, loss sum, samples)."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    model.load_state_dict(state)
    correct, loss_sum, samples = 0, 0.0, 0
    with torch.no_grad():
        for name in WORKERS:
            train, test = np.load(data / name / "train.npz"), np.load(data / name / "test.npz")
            mean, std = train["x"].mean(dtype=np.float64), train["x"].std(dtype=np.float64)
            inputs = (torch.from_numpy(test["x"]).float() - torch.tensor(mean, dtype=torch.float32)) / torch.tensor(std, dtype=torch.float32)
            labels = torch.from_numpy(test["y"])
            logits = model(inputs)
            correct += int((logits.argmax(1) == labels).sum())
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
            samples += len(labels)
    return correct, loss_sum, samples


@pytest.mark.parametrize(("evaluate", "more"), [
    ("parties", {}), ("both", {"clients_per_round": 2}), ("parties", {"calibration": "ccvr", "calibration_samples": 50, "calibration_epochs": 2}),
])
def test_the_parties_scores_equal_the_plain_loop_and_plain_torch(tmp_path, task, data, evaluate, more):
    if evaluate == "both":
        write_parties(data, ["fedavg-server"], first=len(WORKERS))  # the server scores on its own data too
    settings = settings_of(task, data, evaluate=evaluate, **more)
    calibrated = []
    _, history = federated.reference_run(settings, on_calibrated=calibrated.append)
    result = launch.run(fedavg.SCENARIO, settings, FedAvgRun(session=f"scores-{evaluate}-{len(more)}", checkpoint_dir=tmp_path / "checkpoint"))
    assert len(result["history"]) == settings.rounds
    for record, expected in zip(result["history"], history):
        figures = federated.parties_figures(expected.parties)
        assert {key: record[key] for key in figures} == figures  # every worker's figures and the total, bit for bit
        assert (record["accuracy"], record["loss"]) == (expected.accuracy, expected.loss)
        assert sorted(record["parties"]) == WORKERS  # sampled for the round or not, every live worker scored its model
        assert len(record["workers"]) == settings.round_sample_size(3)
    if calibrated:  # the calibrated model is scored the same way, and is the model the run leaves
        figures = federated.parties_figures(calibrated[0].parties)
        assert {key: result["calibration"][key] for key in figures} == figures
        assert (result["calibration"]["accuracy"], result["calibration"]["loss"]) == (calibrated[0].accuracy, calibrated[0].loss)
    correct, loss_sum, samples = plain_torch_counts(load_file(str(tmp_path / "checkpoint" / "model.safetensors")), data)  # the model the run leaves
    assert (result["parties_accuracy"], result["parties_loss"], result["parties_samples"]) == (correct / samples, loss_sum / samples, samples)
    assert result["parties"] == (result.get("calibration") or result["history"][-1])["parties"]
    if evaluate == "parties":  # with both, accuracy and loss are the server's own, as the plain loop's are
        assert (result["accuracy"], result["loss"]) == (result["parties_accuracy"], result["parties_loss"])


def test_a_server_that_scores_nothing_reads_no_data_and_needs_a_class_list(tmp_path, task):
    settings = FederatedSettings(task=str(task), dataset="npz", data_dir=None, evaluate="parties")
    server = FedAvgServer(settings, ServerDeployment(session="no-data", timeout=5), MemoryTransport(MemoryBroker()))
    assert server.test_data is None and server.task.loaded == {}  # built its model, read nothing
    assert server.fingerprint["classes"] == CLASSES
    unnamed = tmp_path / "unnamed.py"
    unnamed.write_text(TASK.format(hidden=16).replace("classes = ", "names = "))
    with pytest.raises(TaskError, match=r"fedavg-server reads no data with --evaluate parties.*name it \(--classes, or classes in .*unnamed.py\)"):
        FedAvgServer(FederatedSettings(task=str(unnamed), dataset="npz", evaluate="parties"), ServerDeployment(session="no-classes", timeout=5),
                     MemoryTransport(MemoryBroker()))


def test_a_worker_that_builds_another_model_or_class_list_is_refused_and_never_trains(tmp_path, task, data):
    session = "fingerprints"
    settings = settings_of(task, data, workers=2, rounds=1, evaluate="parties")
    broker = MemoryBroker()
    server = FedAvgServer(settings, ServerDeployment(session=session, timeout=60), MemoryTransport(broker))
    running = RoleThread(SERVER, server.run)
    running.start()
    other_model = tmp_path / "wider.py"
    other_model.write_text(TASK.format(hidden=32))
    letters = ",".join("abcdefghij")
    for wrong, says in ((settings_of(other_model, data, workers=2), f"against {server.fingerprint['model']}"),
                        (settings_of(task, data, workers=2, classes=letters), "classes [a, b, c, d, e, f, g, h, i, j] against [0, 1, 2, 3")):
        refused = worker(wrong, broker, 1, session)
        with pytest.raises(Refused, match="the server refused worker worker-1: fingerprint") as raised:
            refused.run()
        assert says in str(raised.value)
        if "model" in says:
            assert f"model {refused.fingerprint['model']} (4 tensors, 2410 values) against {server.fingerprint['model']} (4 tensors, 1210 values)" in str(raised.value)
        assert refused.rounds == 0 and refused.last_round == 0
    assert rejected_count(SERVER, session, "fingerprint") == 2
    # The run goes on with workers that build what the server builds.
    workers = [RoleThread(f"worker-{index}", worker(settings, broker, index, session).run) for index in range(2)]
    for thread in workers:
        thread.start()
    result = running.outcome(60)
    assert result["contributors"] == {"1": ["worker-0", "worker-1"]} and all(thread.outcome(60)["rounds"] == 1 for thread in workers)


def test_a_worker_leaves_a_server_that_builds_another_model(task, data):
    """The server's side of the check is the same code: the other side is a server stand-in here,
    which welcomes the worker with a fingerprint of another class list."""
    session, broker = "leaves", MemoryBroker()
    server = Endpoint(MemoryTransport(broker), session=session, role=SERVER, inbox=server_queue(session), ordered=False, durable=True, handshake=(JOIN, REFUSED))
    leaving = worker(settings_of(task, data), broker, 0, session)
    running = RoleThread("worker-0", leaving.run)
    running.start()
    join, delivery = server.receive((JOIN,), None)
    server.bind("run-1")
    other = {**join.meta["fingerprint"], "classes": [f"class {digit}" for digit in range(10)]}
    server.send_message(worker_queue(session, "worker-0"), Message(WELCOME, "", "", round=1, meta={"ref": frame_digest(delivery.body), "fingerprint": other}),
                        to="worker-0")
    running.join(30)
    assert isinstance(running.error, Refused)
    assert "worker worker-0 does not train for this server, which builds another model or class list: classes [class 0, class 1, " in str(running.error)
    assert "against [0, 1, 2, 3, 4, 5, 6, 7, 8, 9] (the server's against this worker's)" in str(running.error)
    assert leaving.rounds == 0 and leaving.endpoint.run is None  # it never bound itself to the run


def test_fingerprints_must_fit_a_join():
    state = ServerState()
    fingerprint = {"model": "0123456789abcdef", "tensors": 4, "parameters": 1210, "classes": CLASSES}

    def join(theirs):
        return Message(JOIN, "s", "worker-0", meta={"nonce": os.urandom(16).hex(), "samples": 90, "fingerprint": theirs})

    admission.check_join(state, join(dict(fingerprint)), 3, True, fingerprint)
    for theirs, says in (({**fingerprint, "classes": [f"class {index}" for index in range(5000)]}, "5000 classes take"),
                         ({**fingerprint, "classes": ["x" * 500]}, "a class of 500 characters"),
                         ({**fingerprint, "classes": "0123456789"}, "not a list of names"),
                         ({**fingerprint, "tensors": -1}, "tensors is -1"),
                         ({**fingerprint, "model": ["not", "a", "hash"]}, "not a short hash")):
        with pytest.raises(ProtocolError, match=says) as raised:
            admission.check_join(state, join(theirs), 3, True, fingerprint)
        assert raised.value.reason == "value"
    for theirs in (None, {"model": "0123456789abcdef"}):
        with pytest.raises(ProtocolError, match="sent no fingerprint") as raised:
            admission.check_join(state, join(theirs), 3, True, fingerprint)
        assert raised.value.reason == "fingerprint"


def test_a_party_whose_class_list_cannot_travel_stops_before_the_run(task, data):
    settings = settings_of(task, data, classes=",".join(f"class {index}" for index in range(5000)), evaluate="parties")
    with pytest.raises(TaskError, match="worker-0 cannot join: its fingerprint's 5000 classes take"):
        worker(settings, MemoryBroker(), 0, "too-many")
    with pytest.raises(TaskError, match="fedavg-server cannot admit workers: its fingerprint's 5000 classes take"):
        FedAvgServer(settings, ServerDeployment(session="too-many", timeout=5), MemoryTransport(MemoryBroker()))


class BadScores(MemoryTransport):
    """worker-0's connection, and someone in unsafe mode who, before each of its scores, sends the
    server copies whose counts cannot be true (and, once the server knows its test size, one over
    another number of samples)."""

    def publish(self, queue, body, *, persistent=False, must_exist=False):
        message = decode(body)
        if message.kind == "evaluated":
            meta = message.meta
            bad = [{**meta, "correct": meta["samples"] + 1}, {**meta, "correct": -1}, {**meta, "correct": 3.0}, {**meta, "correct": True},
                   {**meta, "correct": None}, {**meta, "samples": 0}, {**meta, "samples": "30"}, {**meta, "loss_sum": -1.0}, {**meta, "loss_sum": "1.5"}]
            if message.round > 1:
                bad.append({**meta, "samples": meta["samples"] + 1})
            for forged in bad:
                super().publish(queue, encode(Message(message.kind, message.session, message.sender, message.seq, message.round, forged)))
            super().publish(queue, encode(Message(message.kind, message.session, message.sender, message.seq, message.round + 5, meta)))
        super().publish(queue, body, persistent=persistent, must_exist=must_exist)


def test_scores_that_cannot_be_true_are_refused_and_counted(tmp_path, task, data):
    settings = settings_of(task, data, evaluate="parties")
    shared = MemoryBroker()
    result = launch.run(fedavg.SCENARIO, settings, FedAvgRun(session="bad-scores"),
                        connect_as=lambda role: (BadScores if role == "worker-0" else MemoryTransport)(shared))
    _, history = federated.reference_run(settings)
    for record, expected in zip(result["history"], history, strict=True):  # none of them counted
        figures = federated.parties_figures(expected.parties)
        assert {key: record[key] for key in figures} == figures
    assert rejected_count(SERVER, "bad-scores", "value") == 9 + 10
    assert rejected_count(SERVER, "bad-scores", "out-of-order") == 2


class SilentScores(MemoryTransport):
    """A worker whose scores never reach the server (its updates do)."""

    def publish(self, queue, body, *, persistent=False, must_exist=False):
        if decode(body).kind != "evaluated":
            super().publish(queue, body, persistent=persistent, must_exist=must_exist)


def test_a_worker_that_does_not_score_in_time_is_left_out_and_the_log_says_so(task, data, caplog):
    settings = settings_of(task, data, evaluate="parties")
    shared = MemoryBroker()
    # worker-2's scores are waited out each round; the others', late by seconds on a loaded machine, still count.
    result = launch.run(fedavg.SCENARIO, settings, FedAvgRun(session="silent-scores", round_timeout=5.0),
                        connect_as=lambda role: (SilentScores if role == "worker-2" else MemoryTransport)(shared))
    _, history = federated.reference_run(settings)
    for record, expected in zip(result["history"], history, strict=True):
        scored = {worker: score for worker, score in expected.parties.items() if worker != "worker-2"}
        figures = federated.parties_figures(scored)
        assert {key: record[key] for key in figures} == figures and record["workers"] == WORKERS  # it trained all along
    for model_round in (1, 2):
        assert f"worker-2 did not score round {model_round}'s model in time: left out of the parties' figures" in caplog.text


def test_a_restarted_server_resumes_the_scores_it_was_gathering(tmp_path, task, data):
    """The disk fills as round 2's checkpoint is written, while round 1's scores were being
    gathered with round 2's updates: the run resumes from round 1's checkpoint and ends as the
    plain loop does."""
    settings = settings_of(task, data, rounds=3, evaluate="parties")
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    os.symlink("/dev/full", checkpoint / "model-round-3.safetensors.tmp")
    with pytest.raises(ScenarioError, match="No space left on device"):
        launch.run(fedavg.SCENARIO, settings, FedAvgRun(session="scores-resume", checkpoint_dir=checkpoint, timeout=20))
    state = json.loads((checkpoint / "state.json").read_text())
    assert state["round"] == 2 and state["history"] == [] and state["unscored"]["step"] == 1 and state["scorers"] == WORKERS
    result = launch.run(fedavg.SCENARIO, settings, FedAvgRun(session="scores-resume", checkpoint_dir=checkpoint))
    _, history = federated.reference_run(settings)
    assert [record["step"] for record in result["history"]] == [1, 2, 3]
    for record, expected in zip(result["history"], history):
        figures = federated.parties_figures(expected.parties)
        assert {key: record[key] for key in figures} == figures
