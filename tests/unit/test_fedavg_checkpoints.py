"""A FedAvg checkpoint belongs to one run: resuming another run from it is an error, the server
touches no file it did not write, and a full disk stops the run with the last complete
checkpoint intact (and resumable)."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from splitfed.learning import federated
from splitfed.learning.settings import FederatedSettings
from splitfed.roles.fedavg import CheckpointError, ServerDeployment
from splitfed.roles.fedavg.checkpoints import Superseded
from splitfed.roles.fedavg.server import FedAvgServer
from splitfed.scenarios import fedavg, launch
from splitfed.scenarios.fedavg import FedAvgRun
from splitfed.scenarios.launch import ScenarioError
from splitfed.transport import MemoryBroker, MemoryTransport

SETTINGS = FederatedSettings(dataset="digits", model="tiny", rounds=3, partition="iid", lr=0.05)


def test_a_checkpoint_resumes_only_its_own_run(tmp_path):
    launch.run(fedavg.SCENARIO, SETTINGS, FedAvgRun(session="ckpt-own", checkpoint_dir=tmp_path))
    assert json.loads((tmp_path / "state.json").read_text())["run"]["session"] == "ckpt-own"
    others = {
        "lr": (FederatedSettings(**{**vars(SETTINGS), "lr": 0.01}), "ckpt-own"),
        "session": (SETTINGS, "ckpt-other"),
        "model": (FederatedSettings(**{**vars(SETTINGS), "model": "cnn"}), "ckpt-own"),
    }
    for differing, (settings, session) in others.items():
        with pytest.raises(CheckpointError, match=rf"belongs to another run \({differing} "):
            launch.run(fedavg.SCENARIO, settings, FedAvgRun(session=session, checkpoint_dir=tmp_path, timeout=20))
    # More rounds are a continuation of the same run, not another one.
    longer = FederatedSettings(**{**vars(SETTINGS), "rounds": 4})
    result = launch.run(fedavg.SCENARIO, longer, FedAvgRun(session="ckpt-own", checkpoint_dir=tmp_path))
    assert [r["step"] for r in result["history"]] == [1, 2, 3, 4]


def test_the_server_leaves_other_files_alone(tmp_path):
    mine = {"notes.txt": b"the operator's notes", "model-round-99.safetensors": b"someone else's model", "state.json.bak": b"{}"}
    for name, content in mine.items():
        (tmp_path / name).write_bytes(content)
    launch.run(fedavg.SCENARIO, SETTINGS, FedAvgRun(session="ckpt-others", checkpoint_dir=tmp_path))
    assert all((tmp_path / name).read_bytes() == content for name, content in mine.items())
    written = sorted(path.name for path in tmp_path.iterdir() if path.name not in mine)
    assert written == ["model-round-4.safetensors", "model.safetensors", "state.json"]


def test_a_full_disk_stops_the_run_and_keeps_the_last_checkpoint(tmp_path):
    """The write of round 3's model meets a full disk: its temporary file is a link to /dev/full,
    where every write fails with ENOSPC, as on a full file system (no root needed)."""
    os.symlink("/dev/full", tmp_path / "model-round-3.safetensors.tmp")
    with pytest.raises(ScenarioError, match="cannot write the checkpoint .*No space left on device.*the last complete checkpoint is intact"):
        launch.run(fedavg.SCENARIO, SETTINGS, FedAvgRun(session="ckpt-full", checkpoint_dir=tmp_path, timeout=20))
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["round"] == 2 and state["contributors"].keys() == {"1"}  # round 2 was being written when the disk filled
    assert load_file(str(tmp_path / "model-round-2.safetensors"))  # the model that state names
    assert not (tmp_path / "model-round-3.safetensors.tmp").exists() and not (tmp_path / "model-round-3.safetensors").exists()
    # Space again: the run resumes from the last complete checkpoint and ends as if nothing happened.
    launch.run(fedavg.SCENARIO, SETTINGS, FedAvgRun(session="ckpt-full", checkpoint_dir=tmp_path))
    reference, _ = federated.reference_run(SETTINGS)
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert max((reference.state_dict()[k] - saved[k]).abs().max().item() for k in saved) <= 1e-5


def test_a_server_replaced_by_another_stops_before_writing(tmp_path):
    """Fencing: each takeover raises the epoch in the shared checkpoint; a server that finds a
    newer epoch there than its own (it was cut off while another took over) writes nothing more."""
    settings = FederatedSettings(dataset="digits", model="tiny", rounds=2, partition="iid")
    server = FedAvgServer(settings, ServerDeployment(session="ckpt-fence", checkpoint_dir=tmp_path, timeout=5), MemoryTransport(MemoryBroker()))
    server.take_over()
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["epoch"] == 1
    (tmp_path / "state.json").write_text(json.dumps({**state, "epoch": 2}))  # what a successor writes when it takes over
    with pytest.raises(Superseded, match="another fedavg-server took over session ckpt-fence \\(epoch 2, this one 1\\)"):
        server.checkpoint(with_model=True)
    assert json.loads((tmp_path / "state.json").read_text())["epoch"] == 2  # the successor's checkpoint is untouched


class Crash(BaseException):
    """The server's process dying mid-write: nothing after it runs, nothing catches it."""


def test_a_crash_at_any_step_of_a_write_leaves_a_checkpoint_that_resumes(tmp_path, monkeypatch):
    """Round 2's write is cut short after each of its file operations in turn (every replace of a
    file and every deletion). Whatever step the crash lands on, what is on disk is a complete
    checkpoint: the state it holds names a model that is there and loads."""
    from splitfed.roles.fedavg import checkpoints

    model = {"weight": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    strategy = {"momentum": torch.ones(3)}
    steps_of_a_write = None
    for crash_after in range(1, 10):
        folder = tmp_path / f"crash-{crash_after}"
        store = checkpoints.CheckpointStore(folder, {"session": "crash"})
        store.write(checkpoints.ServerState(run={"session": "crash"}, round=1), model, strategy, with_model=True)
        steps = []

        def step(name, operation, *args, **kwargs):
            steps.append(name)
            if len(steps) == crash_after:
                raise Crash(name)
            return operation(*args, **kwargs)

        real_atomic, real_unlink = checkpoints._atomic, Path.unlink
        monkeypatch.setattr(checkpoints, "_atomic", lambda path, content: step(f"replace {path.name}", real_atomic, path, content))
        monkeypatch.setattr(Path, "unlink", lambda path, missing_ok=False: step(f"unlink {path.name}", real_unlink, path, missing_ok=missing_ok))
        try:
            store.write(checkpoints.ServerState(run={"session": "crash"}, round=2), {"weight": model["weight"] + 1}, strategy, with_model=True)
        except Crash:
            pass
        else:
            steps_of_a_write = steps_of_a_write or len(steps)
        finally:
            monkeypatch.undo()
        state = checkpoints.CheckpointStore(folder, {"session": "crash"}).saved()
        loaded = checkpoints.CheckpointStore(folder, {"session": "crash"}).model(state)  # raises if the model it names is gone
        assert torch.equal(loaded["weight"], model["weight"] + state.round - 1), (crash_after, steps)
        if steps_of_a_write:
            break
    assert steps_of_a_write is not None and steps_of_a_write > 3  # every step of a whole write was crashed on
