"""Tasks: a user's own model and data through every scenario, the same settings from Python, and
every way a task can be wrong refused in one line (exit code 2) before any party starts."""

import json
import logging
import textwrap

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from typer.testing import CliRunner

import splitfed
from splitfed.cli import app
from splitfed.errors import TaskError
from splitfed.learning.context import Context, party_data_dir
from splitfed.learning.settings import ModelSettings
from splitfed.learning.tasks import Task, fingerprint, fingerprint_difference

MLP = """
from torch import nn

def model(context):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
"""


def write_parties(folder, parties, per_party=120, drop_class_of=None):
    """Each party its own disjoint slice of scikit-learn's digits, as train.npz and test.npz."""
    digits = load_digits()
    x, y = digits.images.astype(np.uint8).reshape(-1, 1, 8, 8), digits.target.astype(np.int64)
    for number, party in enumerate(parties):
        part = slice(number * per_party, (number + 1) * per_party)
        px, py = x[part], y[part]
        if party == drop_class_of:
            keep = py != 9
            px, py = px[keep], py[keep]
        cut = int(len(py) * 0.75)
        (folder / party).mkdir(parents=True)
        np.savez(folder / party / "train.npz", x=px[:cut], y=py[:cut])
        np.savez(folder / party / "test.npz", x=px[cut:], y=py[cut:])
    return folder


def cli(*args):
    """The command in this process; the log handler it installs on the runner's stream goes with it."""
    handlers = list(logging.getLogger().handlers)
    try:
        return CliRunner().invoke(app, [str(arg) for arg in args])
    finally:
        logging.getLogger().handlers[:] = handlers


def one_error_line(result):
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    return errors[0]


@pytest.fixture
def parties(tmp_path):
    return write_parties(tmp_path / "data", ["fedavg-server", "worker-0", "worker-1"])


def fedavg_args(tmp_path, task, parties, *more):
    return ["run", "fedavg", "--task", task, "--dataset", "npz", "--data-dir", f"{parties}/{{party}}", "--workers", "2", "--rounds", "2", *more]


def test_a_task_file_trains_on_each_partys_own_data_and_python_gives_what_the_cli_writes(tmp_path, parties):
    task = tmp_path / "task.py"
    task.write_text(MLP)
    out = tmp_path / "cli.json"
    result = cli(*fedavg_args(tmp_path, task, parties, "--out", out))
    assert result.exit_code == 0, result.stderr[-2000:]
    from_cli = json.loads(out.read_text())
    from_python = splitfed.run("fedavg", task=str(task), dataset="npz", data_dir=f"{parties}/{{party}}", workers=2, rounds=2)
    for key in ("accuracy", "loss"):
        assert from_python[key] == from_cli[key]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in from_python["history"]] == \
        [{k: v for k, v in r.items() if k != "seconds"} for r in from_cli["history"]]
    assert from_cli["config"]["task"] == str(task) and from_cli["config"]["data_dir"] == f"{parties}/{{party}}"


def test_python_refuses_what_the_declarations_refuse():
    with pytest.raises(ValueError, match="takes no setting 'worker'"):
        splitfed.run("fedavg", worker=3)
    with pytest.raises(ValueError, match="not a whole number"):
        splitfed.run("fedavg", workers="3")
    with pytest.raises(ValueError, match="--rounds 0: must be at least 1"):
        splitfed.run("fedavg", rounds=0)
    with pytest.raises(ValueError, match="unknown scenario"):
        splitfed.run("fedsgd")


BAD_TASKS = {  # name -> (task text, what the one error line says after the file name)
    "syntax error": ("def model(context)\n    return None\n", ":1: syntax error"),
    "no function": ("CLASSES = 3\n", "defines none of model(context), data(context, train), loss(context)"),
    "import raises": ("import no_such_module_anywhere\n", "importing it raised ModuleNotFoundError"),
    "model raises": ("def model(context):\n    return 1 / 0\n", "model() raised ZeroDivisionError: division by zero"),
    "model not a module": ("def model(context):\n    return 'cnn'\n", "model(context) returned str, not a torch.nn.Module"),
    "data of the wrong types": (MLP + "\ndef data(context, train):\n    return 'pixels'\n", "data(context, train=True) returned str"),
    "float labels": (MLP + "\nimport torch\ndef data(context, train):\n    return torch.zeros(4, 64), torch.zeros(4)\n", "labels are class indices"),
    "data raises": (MLP + "\ndef data(context, train):\n    raise OSError('disk gone')\n", "data() raised OSError: disk gone"),
    "model does not take the data": (
        "from torch import nn\ndef model(context):\n    return nn.Sequential(nn.Flatten(), nn.Linear(30, 10))\n", "does not take the data's inputs (2, 1, 8, 8)"),
    "wrong number of outputs": (
        "from torch import nn\ndef model(context):\n    return nn.Sequential(nn.Flatten(), nn.Linear(64, 3))\n", "it must give (2, 10): one logit per class"),
}


@pytest.mark.parametrize("case", sorted(BAD_TASKS))
def test_a_bad_task_gets_one_line_naming_the_file_before_any_party_starts(tmp_path, parties, case):
    text, says = BAD_TASKS[case]
    task = tmp_path / "task.py"
    task.write_text(text)
    result = cli(*fedavg_args(tmp_path, task, parties))
    assert result.exit_code == 2
    line = one_error_line(result)
    assert says in line and ("task.py" in line or "model()" in line), line
    assert "round 1" not in result.stderr and "UNSAFE" not in result.stderr  # refused before any role was built


def test_a_served_role_with_a_bad_task_exits_with_the_same_line_and_never_joins(tmp_path, parties):
    task = tmp_path / "task.py"
    task.write_text(BAD_TASKS["model raises"][0])
    result = cli("serve", "fedavg-worker", "--session", "s", "--worker-id", "worker-0", "--index", "0", "--workers", "2", "--task", task,
                 "--dataset", "npz", "--data-dir", f"{parties}/{{party}}", "--broker", "amqp://guest:guest@127.0.0.1:1/")  # nothing listens there
    assert result.exit_code == 2
    assert "model() raised ZeroDivisionError" in one_error_line(result)


def test_a_missing_task_file_and_a_bad_module_name(tmp_path):
    assert "--task nothere.py: no such file" in one_error_line(cli("run", "centralized", "--task", "nothere.py"))
    assert "no module named 'no_such_package'" in one_error_line(cli("run", "centralized", "--task", "no_such_package.task"))
    assert "give a file PATH.py or a module" in one_error_line(cli("run", "centralized", "--task", "not a/module"))


def test_own_data_refuses_a_partition_and_parties_must_agree_on_their_classes(tmp_path):
    task = tmp_path / "task.py"
    task.write_text(MLP)
    data = write_parties(tmp_path / "data", ["fedavg-server", "worker-0", "worker-1"], drop_class_of="worker-1")
    refused = cli(*fedavg_args(tmp_path, task, data, "--partition", "iid"))
    assert refused.exit_code == 2 and "--partition iid: each party reads its own data here (--dataset npz)" in one_error_line(refused)
    differ = cli(*fedavg_args(tmp_path, task, data))
    line = one_error_line(differ)
    assert differ.exit_code == 2 and "worker-1's classes [0, 1, 2, 3, 4, 5, 6, 7, 8] differ from fedavg-server's [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]" in line
    agreed = cli(*fedavg_args(tmp_path, task, data, "--classes", ",".join(str(c) for c in range(10))))
    assert agreed.exit_code == 0, agreed.stderr[-2000:]


def test_a_missing_party_folder_is_named(tmp_path, parties):
    task = tmp_path / "task.py"
    task.write_text(MLP)
    result = cli(*fedavg_args(tmp_path, task, parties).__add__(["--workers", "3"]))
    assert result.exit_code == 2 and "worker-2" in one_error_line(result)


def test_data_dir_placeholders():
    assert str(party_data_dir("data/{party}/{index}", "worker-3", 3)) == "data/worker-3/3"
    assert party_data_dir(None, "worker-3", 3) is None
    with pytest.raises(ValueError, match=r"unknown placeholder \{name\}"):
        party_data_dir("data/{name}", "worker-3", 3)


def test_the_context_tells_the_task_who_asks(tmp_path):
    task = tmp_path / "task.py"
    task.write_text(MLP + textwrap.dedent("""
        import torch
        seen = []
        def data(context, train):
            seen.append((context.role, context.party, context.index, context.parties, str(context.data_dir), train))
            generator = torch.Generator().manual_seed(context.index)
            return torch.randn(8, 64, generator=generator), torch.arange(8) % 10
    """))
    settings = ModelSettings(task=str(task), data_dir="root/{party}", seed=5)
    loaded = Task(settings)
    context = Context("fedavg-worker", "worker-1", 1, 2, party_data_dir(settings.data_dir, "worker-1", 1), 5)
    samples = loaded.data(context, train=True)
    assert loaded.module.seen == [("fedavg-worker", "worker-1", 1, 2, "root/worker-1", True)]
    assert torch.equal(samples.images, torch.randn(8, 64, generator=torch.Generator().manual_seed(1)))
    assert loaded.own_data and loaded.classes(context) == tuple(str(c) for c in range(8))  # labels 0..7 seen: 8 classes


def test_fingerprints_name_what_differs():
    one = torch.nn.Sequential(torch.nn.Linear(4, 3))
    other = torch.nn.Sequential(torch.nn.Linear(4, 2))
    mine = fingerprint(one, ("a", "b", "c"))
    assert fingerprint_difference(mine, fingerprint(torch.nn.Sequential(torch.nn.Linear(4, 3)), ("a", "b", "c"))) is None
    difference = fingerprint_difference(mine, fingerprint(other, ("a", "b")))
    assert "2 tensors, 10 values) against" in difference and "classes [a, b] against [a, b, c]" in difference
    assert "no fingerprint" in fingerprint_difference(mine, None)
    assert set(mine) == {"model", "tensors", "parameters", "classes"}  # no weights, no data


def test_a_task_error_is_a_task_error(tmp_path):
    task = tmp_path / "task.py"
    task.write_text("def data(context, train):\n    return [(1, 2)]\n")
    loaded = Task(ModelSettings(task=str(task)))
    with pytest.raises(TaskError, match="item 0's input is int, not a tensor"):
        loaded.data(Context("centralized", "centralized", 0, 1, None, 1), train=True)


def test_a_task_loss_is_what_every_party_trains_and_scores_with(tmp_path):
    """With SGD, twice cross-entropy at learning rate lr is cross-entropy at 2 lr: the same steps,
    and every loss reported twice as large."""
    task = tmp_path / "task.py"
    task.write_text("from torch.nn import functional as F\n\ndef loss(context):\n    return lambda logits, labels: 2 * F.cross_entropy(logits, labels)\n")
    common = dict(dataset="digits", model="tiny", limit=400, test_limit=200, epochs=2, optimizer="sgd")
    doubled = splitfed.run("centralized", task=str(task), lr=0.005, **common)
    plain = splitfed.run("centralized", lr=0.01, **common)
    for mine, theirs in zip(doubled["history"], plain["history"]):
        assert mine["accuracy"] == theirs["accuracy"]
        assert mine["loss"] == pytest.approx(2 * theirs["loss"], rel=1e-5)
        assert mine["train_loss"] == pytest.approx(2 * theirs["train_loss"], rel=1e-5)


@pytest.mark.parametrize("text, says", [
    ("def loss(context):\n    return 3\n", "loss(context) returned int; return a function"),
    ("def loss(context):\n    return lambda logits, labels: 0.5\n", "it must give the batch's loss as a finite scalar tensor"),
])
def test_a_bad_loss_is_refused_before_any_party_starts(tmp_path, parties, text, says):
    task = tmp_path / "task.py"
    task.write_text(MLP + "\n" + text)
    result = cli(*fedavg_args(tmp_path, task, parties))
    assert result.exit_code == 2 and says in one_error_line(result)


def test_a_task_file_edited_since_it_was_loaded_is_loaded_afresh(tmp_path):
    """As in a notebook: run, edit the task, run again (the roles of one run share one load)."""
    task = tmp_path / "task.py"
    task.write_text(MLP + "\nclasses = list('abcdefghij')\n")
    first, again = Task(ModelSettings(task=str(task))), Task(ModelSettings(task=str(task)))
    assert first.module is again.module and first.named_classes() == tuple("abcdefghij")
    task.write_text(MLP + "\nclasses = [str(digit) for digit in range(10)]\n")
    assert Task(ModelSettings(task=str(task))).named_classes() == tuple(str(digit) for digit in range(10))
