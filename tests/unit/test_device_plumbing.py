"""Every scenario on an accelerator, without a GPU: the simulated one (tests/simulated_device.py)
refuses what a GPU refuses, so a model part, batch, label, control variate or averaging weight left
on the CPU, or a wire tensor taken from the device without a copy, fails these runs; and it
computes with the CPU's kernels, so the runs that are deterministic must equal the CPU's exactly."""

import contextlib
import threading
from collections.abc import Iterator

import pytest
import torch

import splitfed
from splitfed.learning import device
from tests.simulated_device import SimulatedTensor, simulated_accelerator

SMALL = {"dataset": "digits", "limit": 320, "test_limit": 100, "batch_size": 32}


def figures(result: dict) -> list[dict]:
    """A run's history without its timings: what the same computation must repeat exactly."""
    return [{key: value for key, value in record.items() if key != "seconds"} for record in result["history"]]


@contextlib.contextmanager
def on_the_accelerator(monkeypatch: pytest.MonkeyPatch) -> Iterator[set[str]]:
    """Every role's device resolved to the simulated accelerator; yields the names of the threads
    that put tensors on it (each role of a run has a thread of its own, named after it)."""
    made_on: set[str] = set()
    simulated_tensor = SimulatedTensor.__new__

    def counted(cls: type, inner: torch.Tensor) -> SimulatedTensor:
        made_on.add(threading.current_thread().name)
        return simulated_tensor(cls, inner)

    with monkeypatch.context() as patched, simulated_accelerator() as simulated:
        patched.setattr(device, "resolve", lambda name: simulated)
        patched.setattr(SimulatedTensor, "__new__", staticmethod(counted))
        yield made_on


@pytest.mark.parametrize(
    ("scenario", "settings"),
    [
        ("centralized", {}),
        ("split", {"mode": "vanilla"}),
        ("split", {"mode": "u-shaped"}),
        ("splitnn", {"clients": 2, "schedule": "splitfed-v1", "evaluate": "both"}),
        ("splitnn", {"clients": 2, "schedule": "round-robin"}),
        ("fedavg", {"workers": 2, "rounds": 2, "partition": "iid", "evaluate": "both"}),
        ("fedavg", {"workers": 2, "rounds": 2, "partition": "classes:0-4,5-9", "strategy": "scaffold", "calibration": "ccvr", "calibration_samples": 50, "calibration_epochs": 1}),
        ("fedavg", {"workers": 2, "rounds": 1, "partition": "classes:0-4,5-9", "strategy": "fedlc"}),
        ("fedavg", {"workers": 2, "rounds": 1, "partition": "classes:0-4,5-9", "strategy": "fedrs"}),
        ("fedavg", {"workers": 2, "rounds": 1, "partition": "iid", "strategy": "fedadam", "rule": "krum", "byzantine": 0}),
    ],
)
def test_a_run_on_the_accelerator_is_the_cpu_run(scenario, settings, monkeypatch):
    with on_the_accelerator(monkeypatch) as made_on:
        on_device = splitfed.run(scenario, **SMALL, **settings)
    assert made_on >= roles_of(scenario, settings), f"roles that put nothing on the accelerator: {roles_of(scenario, settings) - made_on}"
    on_cpu = splitfed.run(scenario, **SMALL, **settings, device="cpu")
    assert figures(on_device) == figures(on_cpu)
    assert on_device["accuracy"] == on_cpu["accuracy"]


@pytest.mark.parametrize(("scenario", "settings"), [("p2p", {"peers": 2, "epochs": 1}), ("smpl", {"peers": 2, "hyperepochs": 1, "hyperedge_size": 2})])
def test_peers_train_and_average_on_the_accelerator(scenario, settings, monkeypatch):
    """Peers run asynchronously (what arrives in time differs from run to run): on the accelerator
    they must finish, every peer having computed there."""
    with on_the_accelerator(monkeypatch) as made_on:
        result = splitfed.run(scenario, **SMALL, **settings)
    assert 0.0 <= result["accuracy"] <= 1.0
    assert made_on >= roles_of(scenario, settings)


def roles_of(scenario: str, settings: dict) -> set[str]:
    """The threads of the roles that compute, as the scenario names them."""
    if scenario == "centralized":
        return {threading.main_thread().name}
    if scenario == "split":
        return {"split-client", "split-server"}
    if scenario == "splitnn":
        return {"split-server", *(f"split-client-{index}" for index in range(settings["clients"]))}
    if scenario == "fedavg":
        return {"fedavg-server", *(f"worker-{index}" for index in range(settings["workers"]))}
    return {f"{scenario}-peer-{index}" for index in range(settings["peers"])}
