"""splitfed.sizing for tasks and a party's own data: a model probed with torch gives the layers the
shape walk gives, an estimate from a task's model and its own data follows from their sizes, and
what cannot be read or probed is reported as not sized, in one line, never as a trace."""

import json
import logging
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import yaml
from torch import nn
from typer.testing import CliRunner

from splitfed import sizing
from splitfed.cli import app
from splitfed.learning import models
from splitfed.learning.settings import DATASETS, MODELS
from splitfed.sizing import task_sizes

from tests.unit.test_sizing import VALUES, merge

MIB = 1024 * 1024
FEATURES, HIDDEN, CLASSES = 30, 64, 3
TRAIN, TEST = 500, 120
MLP_TASK = f"""
from torch import nn

def model(context):
    return nn.Sequential(nn.Linear({FEATURES}, {HIDDEN}), nn.ReLU(), nn.Linear({HIDDEN}, {CLASSES}))
"""


def write_task(folder, text, name="task.py"):
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


def write_npz(folder, train=TRAIN, test=TEST):
    """train.npz and test.npz of float32 features (N, 30), labels 0..2."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for part, count in (("train", train), ("test", test)):
        np.savez(folder / f"{part}.npz", x=rng.normal(size=(count, FEATURES)).astype(np.float32), y=np.arange(count) % CLASSES)
    return folder


def write_csv(folder, train=TRAIN, test=TEST):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for part, count in (("train", train), ("test", test)):
        rows = [",".join([*(f"f{column}" for column in range(FEATURES)), "label"])]
        rows += [",".join([*(f"{value:.4f}" for value in rng.normal(size=FEATURES)), str(row % CLASSES)]) for row in range(count)]
        (folder / f"{part}.csv").write_text("\n".join(rows) + "\n")
    return folder


def cli(*args):
    """`splitfed size` in this process (torch is imported here already); the log handler it
    installs on the runner's stream goes with it."""
    handlers = list(logging.getLogger().handlers)
    try:
        return CliRunner().invoke(app, ["size", *(str(arg) for arg in args)])
    finally:
        logging.getLogger().handlers[:] = handlers


def part(estimate, name, phase="training"):
    return sum(p.mib for found in estimate.phases if found.name == phase for p in found.parts if p.name.startswith(name))


# -- the model probed with torch ------------------------------------------------------------------


@pytest.mark.parametrize("model", sorted(sizing.PLANS))
@pytest.mark.parametrize("dataset", sorted(DATASETS))
def test_probed_layers_are_the_walks(model, dataset):
    """Two ways to the same sizes: the walk's arithmetic and a probe through the torch model."""
    meta = DATASETS[dataset]
    probed, notes = task_sizes.layers_of(models.build(model, meta, seed=1), meta.shape, model)
    walked = sizing.model_layers(model, meta)
    assert [(layer.params, layer.out, layer.floats, layer.int64s) for layer in probed] == \
           [(layer.params, layer.out, layer.floats, layer.int64s) for layer in walked]
    assert notes == ()


@pytest.mark.parametrize("model", MODELS)
def test_every_built_in_model_is_sized(model):
    """A built-in model the walk has no plan for is probed with torch: a new model in
    learning.models needs nothing in sizing to be sized (a plan keeps it torch-free)."""
    found = sizing.estimate_from("fedavg-worker", {"model": model})
    params = sum(p.numel() for p in models.build(model, DATASETS["fashion-mnist"], seed=1).parameters())
    assert part(found, "parameters") == pytest.approx(params * 4 / MIB)


def test_a_task_building_the_cnn_sizes_as_the_built_in_cnn(tmp_path):
    """The torch path end to end (a task, Task.model, the probe, learning.cutting's cut) against
    the torch-free one, for a whole-model role and both halves of a split."""
    task = write_task(tmp_path, """
        from splitfed.learning import models
        from splitfed.learning.settings import DATASETS

        def model(context):
            return models.build("cnn", DATASETS["fashion-mnist"], context.seed)
        """)
    for role, given in (("fedavg-worker", {}), ("split-client", {"cut_layer": "3"}), ("split-server", {"mode": "u-shaped"})):
        built_in = sizing.estimate_from(role, given)
        from_task = sizing.estimate_from(role, {**given, "task": str(task)})
        assert from_task.as_dict()["phases"] == built_in.as_dict()["phases"], role
        assert from_task.settings["task"] == str(task)


def test_a_model_that_is_not_a_sequential_is_one_layer_and_split_as_its_children(tmp_path):
    """Its activations are its modules' outputs, seen from inside; a split role takes the
    children in order (Task.sequential), and refuses a forward that is more than that."""
    task = write_task(tmp_path, f"""
        from torch import nn

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.features = nn.Sequential(nn.Linear({FEATURES}, {HIDDEN}), nn.ReLU())
                self.head = nn.Linear({HIDDEN}, {CLASSES})

            def forward(self, x):
                return self.head(self.features(x))

        class Residual(Net):
            def forward(self, x):
                hidden = self.features(x)
                return self.head(hidden + hidden)

        def model(context):
            return Residual() if context.seed == 2 else Net()
        """)
    own = {"task": str(task), "dataset": "npz", "data_dir": write_npz(tmp_path / "data")}
    sized = task_sizes.size_task("fedavg-worker", sizing.settings_class("fedavg-worker")(**own))
    (layer,) = sized.layers
    assert layer.params == FEATURES * HIDDEN + HIDDEN + HIDDEN * CLASSES + CLASSES
    assert (layer.out, layer.floats, layer.int64s) == ((CLASSES,), HIDDEN + HIDDEN + CLASSES, 0)
    assert sized.notes and "F.relu" in sized.notes[0]
    client = task_sizes.size_task("split-client", sizing.settings_class("split-client")(**own))
    assert [layer.out for layer in client.layers] == [(HIDDEN,), (CLASSES,)] and client.cut == (1, 2)
    residual = sizing.settings_class("split-server")(**own, seed=2)
    with pytest.raises(sizing.CannotSplit, match="model"):
        sizing.estimate("split-server", residual)
    assert sizing.estimate("fedavg-worker", sizing.settings_class("fedavg-worker")(**own, seed=2)).mib > 0


# -- a task on a party's own data -----------------------------------------------------------------


def test_size_a_task_on_its_own_npz_data_from_the_command_line(tmp_path):
    """`splitfed size fedavg-worker --task`: each part recomputed here from the MLP and the files."""
    task, data = write_task(tmp_path, MLP_TASK), write_npz(tmp_path / "data")
    completed = subprocess.run([sys.executable, "-m", "splitfed", "size", "fedavg-worker", "--task", str(task), "--dataset", "npz",
                                "--data-dir", str(data), "--out", "-"], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    document = json.loads(completed.stdout)
    assert document["not_sized"] == {} and [e["role"] for e in document["estimates"]] == ["fedavg-worker"]
    found = document["estimates"][0]
    assert found["settings"]["own_data"] == {"source": "npz features", "train_samples": TRAIN, "test_samples": None}
    parts = {phase["name"]: phase["parts"] for phase in found["phases"]}
    params = FEATURES * HIDDEN + HIDDEN + HIDDEN * CLASSES + CLASSES
    # parameters, gradients and Adam's two moments, float32
    assert found["columns"]["model"] == pytest.approx(round(4 * params * 4 / MIB, 1))
    assert parts["training"]["parameters"] == pytest.approx(params * 4 / MIB, abs=0.01)
    assert parts["training"]["optimizer state (adam)"] == pytest.approx(2 * params * 4 / MIB, abs=0.01)
    # all of its own training set, float32 features and int64 labels; read at the measured bytes per value
    assert parts["training"]["data (its own, npz features)"] == pytest.approx((TRAIN * FEATURES * 4 + TRAIN * 8) / MIB, abs=0.01)
    assert parts["loading data"]["data being read (npz features)"] == pytest.approx(
        sizing.OWN_DATA_READ_BYTES["npz features"] * TRAIN * FEATURES / MIB, abs=0.01)
    # a batch of 64 through Linear, ReLU, Linear: kept for backward (3x, measured), and the input batch
    outputs = 64 * 4 * (HIDDEN + HIDDEN + CLASSES)
    assert parts["training"]["activations"] == pytest.approx((sizing.TRAIN_ACTIVATION_FACTOR * outputs + 64 * 4 * FEATURES) / MIB, abs=0.01)
    assert found["request"] == f"{math.ceil(found['mib'] / 32) * 32}Mi"


def test_own_csv_data_with_a_limit_is_kept_whole(tmp_path):
    """--limit takes the first samples as a view: the party still holds all it read."""
    task, data = write_task(tmp_path, MLP_TASK), write_csv(tmp_path / "data")
    settings = {"task": str(task), "dataset": "csv", "data_dir": data, "limit": 100, "batch_size": 256}
    found = sizing.estimate_from("p2p-peer", settings)
    assert found.settings["own_data"] == {"source": "csv", "train_samples": 100, "test_samples": TEST}
    assert part(found, "data (its own, csv)") == pytest.approx(((TRAIN + TEST) * (FEATURES * 4 + 8)) / MIB)
    assert part(found, "data being read (csv)", "loading data") == pytest.approx(sizing.OWN_DATA_READ_BYTES["csv"] * (TRAIN + TEST) * FEATURES / MIB)
    # the batch is what the limit leaves: 100, not 256
    assert part(found, "activations") == pytest.approx(sizing.both_phases(
        sizing.TRAIN_ACTIVATION_FACTOR * 100 * 4 * (HIDDEN + HIDDEN + CLASSES) + 100 * 4 * FEATURES,
        TEST * 4 * (HIDDEN + HIDDEN + CLASSES) + TEST * 4 * FEATURES) / MIB)


def test_each_party_is_sized_from_its_own_folder(tmp_path):
    """{party} in --data-dir: a role is sized from its first party's folder (worker-0), the
    fedavg-server from its own; a role that reads none takes the data's shape only."""
    task = write_task(tmp_path, MLP_TASK)
    write_npz(tmp_path / "worker-0", train=300)
    write_npz(tmp_path / "fedavg-server", test=40)
    given = {"task": str(task), "dataset": "npz", "data_dir": str(tmp_path / "{party}")}
    assert sizing.estimate_from("fedavg-worker", given).settings["own_data"]["train_samples"] == 300
    assert sizing.estimate_from("fedavg-server", given).settings["own_data"] == {"source": "npz features", "train_samples": None, "test_samples": 40}


# -- not sized ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("task_text", "given", "says"), [
    (MLP_TASK, {"dataset": "npz", "data_dir": "missing"}, "data folder missing does not exist"),
    (MLP_TASK, {"dataset": "npz"}, "worker-0 has no --data-dir"),
    (MLP_TASK, {"dataset": "npz", "data_dir": "empty"}, "the train part is missing"),
    (MLP_TASK + "\ndef data(context, train):\n    raise OSError('the share is offline')\n", {}, "data() raised OSError: the share is offline"),
    ("from torch import nn\ndef model(context):\n    return nn.Sequential(nn.Linear(7, 3))\n", {"dataset": "npz", "data_dir": "data"},
     "layer 0 (Linear) cannot be probed with one sample of shape (30,)"),
    ("def model(context):\n    raise ValueError('no weights')\n", {}, "model() raised ValueError: no weights"),
])
def test_what_cannot_be_read_or_probed_is_not_sized(tmp_path, monkeypatch, task_text, given, says):
    monkeypatch.chdir(tmp_path)
    write_npz(tmp_path / "data")
    (tmp_path / "empty").mkdir()
    task = write_task(tmp_path, task_text)
    with pytest.raises(sizing.NotSized) as raised:
        sizing.estimate_from("fedavg-worker", {"task": str(task), **given})
    assert says in str(raised.value) and "\n" not in str(raised.value)
    assert not isinstance(raised.value, ValueError)  # not bad input: the CLI reports it and sizes the other roles


def test_a_task_file_that_is_not_there_is_not_sized(tmp_path):
    with pytest.raises(sizing.NotSized, match="no such file"):
        sizing.estimate_from("split-client", {"task": str(tmp_path / "nowhere.py")})


def test_the_command_reports_not_sized_roles_and_sizes_the_others(tmp_path):
    """Every role: the ones whose data cannot be read are a row, a line with the reason, a
    `not_sized` entry and a comment in the values; the tracker, which needs no data, is sized;
    exit 0. The one role asked for, not sized: one error line, exit 2, as for a model that
    cannot be split."""
    task = write_task(tmp_path, MLP_TASK)
    data = f"{tmp_path}/{{party}}"
    result = cli("--task", task, "--dataset", "npz", "--data-dir", data, "--out", tmp_path / "size.json")
    assert result.exit_code == 0, result.stderr
    document = json.loads((tmp_path / "size.json").read_text())
    assert [e["role"] for e in document["estimates"]] == ["p2p-tracker"]
    assert document["not_sized"]["fedavg-worker"] == f"data folder {tmp_path}/worker-0 does not exist"
    assert set(document["not_sized"]) == set(sizing.ROLE_NAMES) - {"p2p-tracker"}
    assert f"fedavg-worker not sized: data folder {tmp_path}/worker-0" in " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr
    snippet = cli("--task", task, "--dataset", "npz", "--data-dir", data)
    values = yaml.safe_load(snippet.stdout)
    assert list(values) == ["p2pTracker"] and "# fedavgWorker: not sized (data folder" in snippet.stdout
    one = cli("fedavg-worker", "--task", task, "--dataset", "npz", "--data-dir", data)
    assert one.exit_code == 2 and one.stdout == ""
    assert one.stderr.strip().splitlines() == [f"error: fedavg-worker: not sized: data folder {tmp_path}/worker-0 does not exist"]
    clash = cli("fedavg-worker", "--role", "fedavg-server")
    assert clash.exit_code == 2 and "give one" in clash.stderr


def test_an_unknown_model_is_refused_as_a_run_refuses_it():
    """Not 'not sized': a --model that is neither built in nor torchvision's is bad input."""
    result = cli("--model", "resnet")
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == ["error: --model 'resnet': choose cnn, tiny or a torchvision classification model (splitfed models lists them)"]


# -- the chart's values ---------------------------------------------------------------------------


@pytest.mark.parametrize(("changes", "says"), [
    ({"task": {"file": "def model(context): ..."}}, "the task (task.file)"),
    ({"task": {"module": "my.task"}}, "the task (task.module)"),
    ({"data": {"dataset": "csv"}}, "its own csv files"),
    ({"data": {"perParty": {"hostPath": "/srv/data/{party}"}}}, "data.perParty.hostPath"),
])
def test_the_charts_task_or_own_data_leave_the_limits_unchecked(changes, says):
    """The launcher cannot read what the pods read: each role that needs the model says its limit
    is not checked, and why; the tracker is still checked."""
    values = merge(VALUES, {**changes, "p2pTracker": {"enabled": True, "resources": {"limits": {"memory": "16Mi"}}}})
    warnings = sizing.check_values(values)
    unchecked = [w for w in warnings if "not checked" in w]
    assert [w.split(":")[0] for w in unchecked] == ["fedavg-server", "fedavg-worker"]
    assert all(says in w for w in unchecked)
    assert any(w.startswith("p2p-tracker: memory limit 16Mi") for w in warnings)
