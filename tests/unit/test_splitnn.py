"""Several split clients against one server, over the in-memory transport: every schedule with
one client is centralized training; round-robin and splitfed-v1 (also averaging several times an
epoch) equal their one-process reference; splitfed-v2 leaves every client with the same layers;
bad settings are refused."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from splitfed.learning import clients as reference, data, train
from splitfed.learning.settings import SCHEDULES, SplitNNSettings, TrainSettings, split_client_name
from splitfed.roles.split.common import SERVER, merged_state
from splitfed.scenarios import centralized, launch, splitnn
from splitfed.protocol import decode
from splitfed.scenarios.launch import ScenarioError, run_threads, transport_factory
from splitfed.transport import MemoryBroker, MemoryTransport

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


def reference_states(part, body) -> tuple[dict, dict]:
    """A reference run's client layers (the head, and the tail in u-shaped mode) and server layers,
    under the whole model's layer indices, as the parties save them."""
    client = merged_state([(part.head.state_dict(), 0)] + ([(part.tail.state_dict(), part.tail_start)] if part.tail is not None else []))
    return client, merged_state([(body.state_dict(), part.cut_layer)])


def assert_equals_reference(settings: SplitNNSettings, client_layers: dict[str, dict], server_layers: dict) -> tuple[list, list]:
    """Every client's layers and the server's equal those of the one-process reference run, to
    1e-5; the reference's (parts, bodies)."""
    parts, bodies = reference.reference_run(settings)
    for index, part in enumerate(parts):
        name = split_client_name(index, settings.clients)
        assert max_diff(client_layers[name], reference_states(part, bodies[0])[0]) <= 1e-5, name
    assert max_diff(server_layers, reference_states(parts[0], bodies[0])[1]) <= 1e-5
    return parts, bodies


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_one_client_is_centralized_training(schedule):
    settings = SplitNNSettings(**SMALL, clients=1, schedule=schedule)
    alone = launch.run(splitnn.SCENARIO, settings, splitnn.SplitNNRun())
    whole = launch.run(centralized.SCENARIO, TrainSettings(**SMALL), centralized.CentralizedRun())
    assert [e["included"] for e in alone["history"]] == [["split-client"]] * 2
    for ours, theirs in zip(alone["history"], whole["history"], strict=True):
        assert ours["accuracy"] == theirs["accuracy"]
        assert abs(ours["loss"] - theirs["loss"]) <= 1e-5


@pytest.mark.parametrize("schedule, syncs, fed_lr", [("round-robin", 1, 1.0), ("splitfed-v1", 1, 1.0), ("splitfed-v1", 3, 2.5)])
@pytest.mark.parametrize("mode", ["vanilla", "u-shaped"])
def test_several_clients_equal_the_reference(schedule, syncs, fed_lr, mode, tmp_path):
    settings = SplitNNSettings(**SMALL, clients=3, schedule=schedule, mode=mode, partition="dirichlet:0.5", syncs_per_epoch=syncs, fed_lr=fed_lr)
    result, client_layers, server_layers = run_saving_layers(settings, tmp_path)
    parts, bodies = assert_equals_reference(settings, client_layers, server_layers)
    if schedule == "splitfed-v1":  # averaged: every client ends with the same layers
        assert max_diff(client_layers["split-client-0"], client_layers["split-client-2"]) == 0
    assert [e["included"] for e in result["history"]] == [["split-client-0", "split-client-1", "split-client-2"]] * 2
    assert all(e["accuracy"] is not None and e["evaluated_samples"] == SMALL["test_limit"] for e in result["history"])
    # Round-robin: the last holder scores the whole test set. splitfed-v1: the clients, who hold
    # the same layers, score a third each, and the parts add up to the whole model's score.
    expected_evaluators = [["split-client-2"]] if schedule == "round-robin" else [["split-client-0", "split-client-1", "split-client-2"]]
    assert [e["evaluators"] for e in result["history"]] == expected_evaluators * 2
    whole = train.evaluate(lambda images: reference_logits(parts[-1], bodies[-1], images), data.load("digits", train=False, limit=SMALL["test_limit"]))
    assert result["accuracy"] == whole.accuracy and abs(result["loss"] - whole.loss) <= 1e-5


def reference_logits(part, body, images):
    """The reference run's whole model: the client's head, the server's layers and (u-shaped) the client's tail."""
    for layers in (part.head, body, part.tail):
        if layers is not None:
            layers.eval()
            images = layers(images)
    return images


@pytest.mark.parametrize("syncs, fed_lr", [(1, 1.0), (4, 2.0)])
def test_splitfed_v2_clients_share_their_layers_after_each_epoch(syncs, fed_lr, tmp_path):
    settings = SplitNNSettings(**SMALL, clients=3, schedule="splitfed-v2", syncs_per_epoch=syncs, fed_lr=fed_lr)
    result, client_layers, _ = run_saving_layers(settings, tmp_path)
    assert [sum(e["samples"].values()) for e in result["history"]] == [600, 600]  # every period's samples count towards its epoch
    first = client_layers["split-client-0"]
    assert all(max_diff(first, other) == 0 for other in client_layers.values())
    initial = reference.reference_run(dataclasses.replace(settings, epochs=1, schedule="splitfed-v1", limit=32, syncs_per_epoch=1, fed_lr=1.0))[0][0]
    assert max_diff(first, merged_state([(initial.head.state_dict(), 0)])) > 1e-3  # and they trained
    assert result["history"][-1]["accuracy"] > 0.3  # chance is 0.1


def test_splitfed_v2_u_shaped_clients_take_the_shared_layers_a_batch_at_a_time(tmp_path):
    """u-shaped, a batch reaches the shared server half as two messages (outputs, then gradients);
    the server holds the other clients' batches in between. Before, the second client's gradients
    met layers that had stepped since its forward pass, and the server failed."""
    settings = SplitNNSettings(**SMALL, clients=3, schedule="splitfed-v2", mode="u-shaped")
    result, client_layers, _ = run_saving_layers(settings, tmp_path)
    batches = 2 * -(-200 // 32)  # each client's 200 samples in batches of 32, for 2 epochs
    assert [state["batches"] for state in result["clients"].values()] == [batches] * 3 and result["batches"] == 3 * batches
    first = client_layers["split-client-0"]
    assert all(max_diff(first, other) == 0 for other in client_layers.values())
    assert result["history"][-1]["accuracy"] > 0.3  # chance is 0.1


def test_an_epoch_is_cut_into_even_periods_in_order():
    batches = [torch.tensor([i]) for i in range(10)]
    runs = reference.periods(batches, 3)
    assert [len(run) for run in runs] == [3, 3, 4] and [int(b) for run in runs for b in run] == list(range(10))
    assert reference.periods(batches, 1) == [batches]
    with pytest.raises(ValueError, match="--syncs-per-epoch 11 is more than the 10 batches"):
        reference.periods(batches, 11)


def test_a_fed_step_moves_weights_from_the_start_and_leaves_statistics_averaged():
    from splitfed.learning.averaging import step_towards
    import numpy as np

    start = {"w": np.full(2, 1.0, np.float32), "running_var": np.full(2, 1.0, np.float32)}
    average = {"w": np.full(2, 2.0, np.float32), "running_var": np.full(2, 0.5, np.float32)}
    stepped = step_towards(start, average, 2.5)
    assert np.allclose(stepped["w"], 3.5) and stepped["w"].dtype == np.float32
    assert np.allclose(stepped["running_var"], 0.5)  # 1 + 2.5 * (0.5 - 1) would be negative
    assert step_towards(start, average, 1.0) is average


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
    ({"clients": 2, "schedule": "round-robin", "syncs_per_epoch": 2}, "--syncs-per-epoch and --fed-lr are for splitfed-v1 and v2"),
    ({"clients": 2, "schedule": "round-robin", "fed_lr": 2.0}, "--syncs-per-epoch and --fed-lr are for splitfed-v1 and v2"),
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


def test_more_periods_than_a_share_has_batches_is_refused():
    from splitfed.roles.split import SplitClientParty
    from splitfed.roles.split.client import SplitClient
    from splitfed.transport import MemoryBroker, MemoryTransport

    settings = SplitNNSettings(**{**SMALL, "limit": 120}, clients=2, syncs_per_epoch=3)  # 60 samples each: 2 batches of 32
    with pytest.raises(ValueError, match="--syncs-per-epoch 3 is more than the 2 batches of split-client-1's share"):
        SplitClient(settings, SplitClientParty(session="s", client_index=1), MemoryTransport(MemoryBroker()))


def test_period_numbers_from_the_wire_are_checked():
    """What a late client is told, what the fed is sent and what the server is told of periods:
    anything but a period of this run is refused as malformed or out of turn."""
    from splitfed.protocol import Message, ProtocolError
    from splitfed.roles.split import SplitClientParty, SplitParty
    from splitfed.roles.split.client import SplitClient
    from splitfed.roles.split.fed import period_of
    from splitfed.roles.split.server import SplitServer
    from splitfed.transport import MemoryBroker, MemoryTransport

    settings = SplitNNSettings(**SMALL, clients=2, syncs_per_epoch=3)
    client = SplitClient(settings, SplitClientParty(session="s", client_index=0), MemoryTransport(MemoryBroker()))
    client.check_resume([2, 1], (1, 3))
    for resume in ([1, 3], [1, 2], [2, 4], [2, 0], [4, 1], [2], "2,1", [2.0, 1], None):
        with pytest.raises(ProtocolError, match="no \\(epoch, period\\) of this run"):
            client.check_resume(resume, (1, 3))

    assert period_of(Message("head", "s", "split-client-0", meta={"epoch": 2, "period": 3})) == (2, 3)
    for meta in ({"epoch": 1}, {"epoch": 1, "period": 0}, {"epoch": "1", "period": 1}, {"epoch": 0, "period": 1}):
        with pytest.raises(ProtocolError, match="positive integer epoch and period"):
            period_of(Message("head", "s", "split-client-0", meta=meta))

    server = SplitServer(settings, SplitParty(session="s"), MemoryTransport(MemoryBroker()))
    server.clients["split-client-0"].greeted = True
    for meta, problem in (({"epoch": 1, "period": 2}, "while epoch 1 period 1 is open"), ({"epoch": 1, "period": 4}, "a period in 1..3")):
        with pytest.raises(ProtocolError, match=problem):
            server.check(Message("trained", "s", "split-client-0", meta={**meta, "train_loss": 0.5}))


class LostEvaluations(MemoryTransport):
    """A client's connection on which its `evaluated` reports never reach the server."""

    def publish(self, queue, body, *, persistent=False, must_exist=False):
        if decode(body).kind != "evaluated":
            super().publish(queue, body, persistent=persistent, must_exist=must_exist)


def test_an_epoch_is_scored_on_the_parts_that_came():
    """splitfed-v2 shares each evaluation out among the 3 clients; split-client-1's part of the
    first one never comes, and the server, which takes a client's messages in order, hears
    nothing from it after the gap. Given up after --client-timeout, it leaves the first epoch
    scored on the other two parts, the second closes without it (--min-clients 2) and is scored
    whole by the two left; the run ends (split-client-1 is told it was left out)."""
    # Only split-client-1's silence is waited out; the live clients, starved for seconds on a loaded machine, are not given up.
    settings = SplitNNSettings(**SMALL, clients=3, schedule="splitfed-v2", client_timeout=10.0, min_clients=2)
    broker = MemoryBroker()
    history = []
    with pytest.raises(ScenarioError, match="split-client-1 failed: .* without split-client-1's share"):
        launch.run(splitnn.SCENARIO, settings, splitnn.SplitNNRun(),
                   on_progress=lambda event: history.append(event.record) if event.event == "epoch" and "evaluators" in event.record else None,
                   connect_as=lambda party: (LostEvaluations if party == "split-client-1" else MemoryTransport)(broker))
    first, second = history
    assert first["evaluators"] == ["split-client-0", "split-client-1", "split-client-2"] and first["evaluated_samples"] == 200  # two thirds of 300
    assert second["evaluators"] == ["split-client-0", "split-client-2"] and second["evaluated_samples"] == 300
    assert second["missing"] == ["split-client-1"]
    assert all(0.0 <= e["accuracy"] <= 1.0 for e in history)


def test_each_schedule_is_an_object_that_says_what_differs():
    """One client is alone whatever --schedule says; splitfed-v1 and v2 have a fed, and only v1
    gives each client its own copy of the server layers (so no batch waits for another's); the
    round-robin turns skip clients that are not there and end after the last epoch."""
    from splitfed.protocol import Message
    from splitfed.roles.split.schedules import OneClient, RoundRobin, SplitFedV1, SplitFedV2, TurnOrder, schedule_for

    names = ["split-client-0", "split-client-1", "split-client-2"]
    for schedule in SCHEDULES:
        assert type(schedule_for(SplitNNSettings(**SMALL, schedule=schedule), names[:1])) is OneClient
    kinds = {schedule: schedule_for(SplitNNSettings(**SMALL, clients=3, schedule=schedule), names) for schedule in SCHEDULES}
    assert [type(kinds[s]) for s in SCHEDULES] == [RoundRobin, SplitFedV1, SplitFedV2]
    assert [kinds[s].fed for s in SCHEDULES] == [False, True, True]
    layers = torch.nn.Sequential(torch.nn.Linear(2, 2))
    opt = train.optimizer(layers.parameters(), "sgd", 0.1)
    assert kinds["splitfed-v2"].layers(layers, opt) == (layers, opt)
    assert kinds["splitfed-v1"].layers(layers, opt)[0] is not layers
    batch = Message("activations", "s", names[0], meta={"train": True})
    assert not kinds["splitfed-v1"].must_wait(batch, [])

    turns = TurnOrder(names, epochs=2)
    order = []
    while (holder := turns.advance(lambda name: name != "split-client-1")) is not None:
        order.append((turns.epoch, holder))
    assert order == [(1, "split-client-0"), (1, "split-client-2"), (2, "split-client-0"), (2, "split-client-2")]
