"""Several split clients against one server, over the in-memory transport: every schedule with
one client is centralized training; round-robin and splitfed-v1 equal their one-process
reference; splitfed-v2 leaves every client with the same layers; bad settings are refused."""

from __future__ import annotations

import dataclasses

import pytest
from safetensors.torch import load_file

from splitfed.learning import clients as reference
from splitfed.learning.settings import SCHEDULES, SplitNNSettings, TrainSettings
from splitfed.roles.split.common import SERVER, merged_state
from splitfed.scenarios import centralized, launch, splitnn
from splitfed.scenarios.launch import run_threads, transport_factory

SMALL = dict(dataset="digits", batch_size=32, limit=600, test_limit=300, epochs=2)


def run_saving_layers(settings: SplitNNSettings, tmp_path) -> tuple[dict, dict[str, dict], dict]:
    """A threads run over memory in which every party writes its layers: (result, clients' layers by name, server layers)."""
    run = splitnn.SplitNNRun(timeout=60).resolved()
    launches = [item.with_deployment(save=tmp_path / f"{item.name}.safetensors") if hasattr(item.deployment, "save") else item
                for item in splitnn.plan(settings, run, tmp_path)]
    result = run_threads(launches, transport_factory(run), None, 120)
    layers = {item.name: load_file(str(tmp_path / f"{item.name}.safetensors")) for item in launches if hasattr(item.deployment, "save")}
    return result, {name: state for name, state in layers.items() if name != SERVER}, layers[SERVER]


def max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_one_client_is_centralized_training(schedule):
    settings = SplitNNSettings(**SMALL, clients=1, schedule=schedule)
    alone = launch.run(splitnn.SCENARIO, settings, splitnn.SplitNNRun())
    whole = launch.run(centralized.SCENARIO, TrainSettings(**SMALL), centralized.CentralizedRun())
    assert [e["included"] for e in alone["history"]] == [["split-client"]] * 2
    for ours, theirs in zip(alone["history"], whole["history"], strict=True):
        assert ours["accuracy"] == theirs["accuracy"]
        assert abs(ours["loss"] - theirs["loss"]) <= 1e-5


@pytest.mark.parametrize("schedule", ["round-robin", "splitfed-v1"])
@pytest.mark.parametrize("mode", ["vanilla", "u-shaped"])
def test_several_clients_equal_the_reference(schedule, mode, tmp_path):
    settings = SplitNNSettings(**SMALL, clients=3, schedule=schedule, mode=mode, partition="dirichlet:0.5")
    result, client_layers, server_layers = run_saving_layers(settings, tmp_path)
    parts, bodies = reference.reference_run(settings)
    for index, part in enumerate(parts):
        expected = merged_state([(part.head.state_dict(), 0)] + ([(part.tail.state_dict(), part.tail_start)] if part.tail is not None else []))
        assert max_diff(client_layers[f"split-client-{index}"], expected) <= 1e-5, index
    assert max_diff(server_layers, merged_state([(bodies[0].state_dict(), parts[0].cut_layer)])) <= 1e-5
    if schedule == "splitfed-v1":  # averaged: every client ends with the same layers
        assert max_diff(client_layers["split-client-0"], client_layers["split-client-2"]) == 0
    assert [e["included"] for e in result["history"]] == [["split-client-0", "split-client-1", "split-client-2"]] * 2
    assert all(e["accuracy"] is not None for e in result["history"])


def test_splitfed_v2_clients_share_their_layers_after_each_epoch(tmp_path):
    settings = SplitNNSettings(**SMALL, clients=3, schedule="splitfed-v2")
    result, client_layers, _ = run_saving_layers(settings, tmp_path)
    first = client_layers["split-client-0"]
    assert all(max_diff(first, other) == 0 for other in client_layers.values())
    initial = reference.reference_run(dataclasses.replace(settings, epochs=1, schedule="splitfed-v1", limit=32))[0][0]
    assert max_diff(first, merged_state([(initial.head.state_dict(), 0)])) > 1e-3  # and they trained
    assert result["history"][-1]["accuracy"] > 0.3  # chance is 0.1


def test_the_fed_weights_by_samples():
    from splitfed.learning.averaging import weighted_average
    import numpy as np

    states = [{"w": np.full(3, 1.0, np.float32), "n": np.array(4)}, {"w": np.full(3, 4.0, np.float32), "n": np.array(7)}]
    average = weighted_average(states, [2, 1])
    assert np.allclose(average["w"], 2.0) and average["w"].dtype == np.float32 and int(average["n"]) == 7
    with pytest.raises(ValueError):
        weighted_average(states, [0, 0])


@pytest.mark.parametrize("changes, problem", [
    ({"clients": 3, "min_clients": 4}, "--min-clients 4 is more than the 3 clients"),
    ({"clients": 2, "partition": "classes:0-4,5-9,0"}, "3 groups of classes for 2 workers"),
    ({"clients": 2, "partition": "nonsense"}, "use iid"),
])
def test_bad_settings_are_refused(changes, problem):
    with pytest.raises(ValueError, match=problem):
        SplitNNSettings(**{**SMALL, **changes})


def test_a_client_index_outside_the_run_is_refused():
    from splitfed.roles.split import SplitClientParty
    from splitfed.roles.split.client import SplitClient
    from splitfed.transport import MemoryBroker, MemoryTransport

    with pytest.raises(ValueError, match="--client-index 3 is not one of the 3 clients"):
        SplitClient(SplitNNSettings(**SMALL, clients=3), SplitClientParty(session="s", client_index=3), MemoryTransport(MemoryBroker()))
