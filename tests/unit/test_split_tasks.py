"""Split learning on each client's own data (npz files of scikit-learn's digits, one folder per
client) with a task that defines only model(): the split-server holds no data and takes the input
shape and the classes from the clients' hellos, refuses a client whose model or classes differ,
and with --evaluate parties adds up what each client scores on its own test data."""

from __future__ import annotations

import dataclasses
import textwrap
import uuid

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F

from splitfed.learning import clients
from splitfed.learning.settings import SplitNNSettings, SplitSettings
from splitfed.learning.tasks import Task, fingerprint
from splitfed.protocol import Message, ProtocolError
from splitfed.roles.endpoint import Endpoint
from splitfed.roles.split import SplitParty
from splitfed.roles.split.common import CLIENT, HANDSHAKE, HELLO, SERVER, client_inbox, shared
from splitfed.roles.split.server import SplitServer
from splitfed.scenarios import launch, split, splitnn
from splitfed.scenarios.launch import ScenarioError, run_threads, transport_factory
from splitfed.transport import MemoryBroker, MemoryTransport
from tests.unit.test_tasks import write_parties

CLIENTS = ["split-client-0", "split-client-1"]
# A model that is not an nn.Sequential: the server needs one sample's shape to see it as one.
TASK = textwrap.dedent("""
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.relu = nn.ReLU()
            self.flat = nn.Flatten()
            self.fc = nn.Linear(4 * 8 * 8, 10)

        def forward(self, x):
            return self.fc(self.flat(self.relu(self.conv(x))))

    def model(context):
        return Net()
""")


def by_hand() -> nn.Sequential:
    """The task's model as plain torch layers, indexed as the parties' layer files are."""
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))


@pytest.fixture
def own_data(tmp_path):
    """(the task file, the data folders of split-client-0 and -1, and of split-client alone); none for the server."""
    task = tmp_path / "task.py"
    task.write_text(TASK)
    return task, write_parties(tmp_path / "data", [*CLIENTS, "split-client"])


def settings_of(own_data, **changes) -> SplitNNSettings:
    task, data = own_data
    return SplitNNSettings(**{"task": str(task), "dataset": "npz", "data_dir": data / "{party}", "clients": 2, "epochs": 1, "batch_size": 32, **changes})


def run_plan(plan, settings, tmp_path, run=None, change=lambda launches: launches) -> dict:
    """A scenario's `plan` on threads over memory (a session of its own), every party writing its
    layers where it may; `change` alters the launches first."""
    run = (run or splitnn.SplitNNRun(timeout=60)).resolved()
    launches = [item.with_deployment(save=tmp_path / f"{item.name}.safetensors") if hasattr(item.deployment, "save") else item
                for item in change(plan(settings, run, tmp_path))]
    return run_threads(launches, transport_factory(run), None, 120)


def test_a_server_without_data_takes_shape_and_classes_from_the_hellos_and_evaluates_both_ways(own_data, tmp_path):
    settings = settings_of(own_data, schedule="splitfed-v2", evaluate="both")
    assert not (own_data[1] / SERVER).exists()
    result = launch.run(splitnn.SCENARIO, settings, splitnn.SplitNNRun())
    [epoch] = result["history"]
    assert epoch["included"] == CLIENTS and epoch["evaluators"] == CLIENTS
    assert epoch["evaluated_samples"] == 30  # the server's figure: each client half of its 30 test samples
    parties = epoch["parties"]
    assert set(parties["clients"]) == set(CLIENTS) and [parties["clients"][name]["samples"] for name in CLIENTS] == [30, 30]
    assert parties["samples"] == 60 and parties["missing"] == []
    assert parties["accuracy"] == sum(figure["correct"] for figure in parties["clients"].values()) / 60
    assert result["parties"] == parties and result["evaluate"] == "both"


def test_evaluate_parties_adds_up_what_each_client_scores_on_its_own_test_data(own_data, tmp_path):
    """splitfed-v1: at the end every client holds the fed's average of the client layers, the
    server the average of its own copies; that model, scored here with plain torch on each
    client's test data, gives the counts the run reports, client by client and in total."""
    settings = settings_of(own_data, schedule="splitfed-v1", evaluate="parties")
    result = run_plan(splitnn.plan, settings, tmp_path)
    server_layers = load_file(str(tmp_path / f"{SERVER}.safetensors"))
    task = Task(settings)
    total_correct, total_loss = 0, 0.0
    for index, name in enumerate(CLIENTS):
        model = by_hand()
        model.load_state_dict({**load_file(str(tmp_path / f"{name}.safetensors")), **server_layers})
        test = task.data(clients.client_context(settings, index), train=False)
        with torch.no_grad():
            logits = model.eval()(test.images[0 : len(test)])  # (30, 10)
        correct, loss = int((logits.argmax(1) == test.labels).sum()), float(F.cross_entropy(logits, test.labels, reduction="sum"))
        figure = result["parties"]["clients"][name]
        assert figure["correct"] == correct and figure["samples"] == len(test) == 30
        assert figure["loss"] == pytest.approx(loss / 30, abs=1e-5)
        total_correct, total_loss = total_correct + correct, total_loss + loss
    assert result["accuracy"] == result["parties"]["accuracy"] == total_correct / 60  # parties alone: the run's figure is theirs
    assert result["loss"] == pytest.approx(total_loss / 60, abs=1e-5)
    assert result["history"][0]["evaluators"] == []


def test_a_client_with_other_classes_is_refused_and_stops_with_the_servers_line(own_data, tmp_path):
    """The built-in cnn on local data: the server cannot build it before a hello says the shape.
    It knows the classes (--classes): split-client-1, given them in another order, is refused
    whichever client says hello first, and stops with the line naming both class lists."""
    task, data = own_data
    settings = SplitNNSettings(model="cnn", dataset="npz", data_dir=data / "{party}", clients=2, epochs=1, batch_size=32, classes="0,1,2,3,4,5,6,7,8,9")
    other_order = dataclasses.replace(settings, classes="9,8,7,6,5,4,3,2,1,0")

    def second_client_with_other_order(launches):
        return [dataclasses.replace(item, learning=other_order) if item.name == CLIENTS[1] else item for item in launches]

    with pytest.raises(ScenarioError) as refused:
        run_plan(splitnn.plan, settings, tmp_path, change=second_client_with_other_order)
    assert str(refused.value) == (
        "split-client-1 failed: the split-server refused split-client-1: split-client-1's model and classes are not the server's: "
        "classes [9, 8, 7, 6, 5, 4, 3, 2, 1, 0] against [0, 1, 2, 3, 4, 5, 6, 7, 8, 9] (split-client-1's against the server's)"
    )


def test_the_first_accepted_hello_fixes_the_shape_and_later_ones_are_held_to_it(own_data):
    """Driven by hand: a hello of the wrong shape before any is accepted leaves the server
    without a model; the first good one builds it; a later one of another shape is refused with
    the run's; hellos with no fingerprint or a shape that is not one are malformed."""
    settings = settings_of(own_data, schedule="splitfed-v2")
    broker = MemoryBroker()
    server = SplitServer(settings, SplitParty(session="s"), MemoryTransport(broker))
    assert server.body is None and server.input_shape is None
    task = Task(settings)
    context = clients.client_context(settings, 0)
    stated = fingerprint(task.sequential(context), task.classes(context))
    inboxes = {index: Endpoint(MemoryTransport(broker), session="s", role=CLIENT, name=CLIENTS[index], inbox=client_inbox("s", index, 2), timeout=5,
                               handshake=HANDSHAKE) for index in (0, 1)}

    def hello(index: int, shape: object, **changes) -> dict:
        meta = {"nonce": uuid.uuid4().hex, **shared(settings), "fingerprint": stated, "input_shape": shape, **changes}
        message = Message(HELLO, "s", CLIENTS[index], meta=meta)
        server.check(message)
        server.take(message)
        answer, _ = inboxes[index].receive((HELLO,), (SERVER,), wait=5)
        return answer.meta

    assert hello(1, [1, 8, 9])["problem"].startswith("the split-server cannot build the model for split-client-1's input shape (1, 8, 9)")
    assert server.body is None
    assert hello(0, [1, 8, 8])["ok"] is True and server.input_shape == (1, 8, 8) and server.in_shape == (256,)
    assert hello(1, [1, 8, 9])["problem"] == "split-client-1's samples are of shape (1, 8, 9), the run's of (1, 8, 8)"
    assert not server.clients[CLIENTS[1]].greeted
    for shape in ([0, 8, 8], [1] * 6, [1, 8, 2**20], "1,8,8", [True, 8, 8], [1.0, 8, 8]):
        with pytest.raises(ProtocolError, match="one sample's input shape"):
            hello(1, shape)
    for wrong in (None, {**stated, "model": "not hex"}, {**stated, "classes": "0123456789"}, {k: v for k, v in stated.items() if k != "tensors"}):
        with pytest.raises(ProtocolError, match="fingerprint"):
            hello(1, [1, 8, 8], fingerprint=wrong)


def test_one_client_on_its_own_data_through_the_relay(own_data, tmp_path):
    """The relay forwards the hello as it is: the server learns the shape from it. (The client
    leads this scenario: the result is its own, scored on its 30 test samples.)"""
    task, data = own_data
    settings = SplitSettings(task=str(task), dataset="npz", data_dir=data / "{party}", epochs=1, batch_size=32)
    result = run_plan(split.plan, settings, tmp_path, run=split.SplitRun(timeout=60, via="relay"))
    [epoch] = result["history"]
    assert result["client"] == "split-client" and result["samples"] == 90 and epoch["accuracy"] * 30 == pytest.approx(round(epoch["accuracy"] * 30))


def test_evaluate_parties_is_refused_with_round_robin():
    with pytest.raises(ValueError, match="round-robin clients hold their own layers until their turn"):
        SplitServer(SplitNNSettings(dataset="digits", clients=2, schedule="round-robin", evaluate="parties"), SplitParty(session="s"),
                    MemoryTransport(MemoryBroker()))
