"""Client sampling: a seeded draw of workers per round. The distributed run equals the plain loop
drawing with the same sampler; a worker that misses its round is not drawn again until heard
from; the settings refuse what cannot work."""

import pytest
from prometheus_client import REGISTRY
from safetensors.torch import load_file

from splitfed.learning import federated
from splitfed.learning.settings import FederatedSettings, worker_ids
from splitfed.protocol import decode
from splitfed.roles.fedavg.common import worker_queue
from splitfed.scenarios import fedavg, launch
from splitfed.scenarios.fedavg import FedAvgRun
from splitfed.transport import MemoryBroker, MemoryTransport


def drawn(settings: FederatedSettings, round_number: int) -> list[str]:
    return federated.sample_workers(worker_ids(settings.workers), settings.round_sample_size(settings.workers), settings.seed, round_number)


@pytest.mark.parametrize(("strategy", "workers", "sampling"), [
    ("fedavg", 5, {"clients_per_round": 2}), ("fedadam", 5, {"fraction": 0.5}), ("scaffold", 4, {"clients_per_round": 2, "optimizer": "sgd", "lr": 0.05}),
])
def test_sampled_rounds_equal_the_plain_loop_with_the_same_sampler(tmp_path, strategy, workers, sampling):
    settings = FederatedSettings(dataset="digits", model="tiny", rounds=4, workers=workers, partition="iid", strategy=strategy, **sampling)
    reference, _ = federated.reference_run(settings)
    result = launch.run(fedavg.SCENARIO, settings, FedAvgRun(session=f"sample-{strategy}", checkpoint_dir=tmp_path))
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert max((reference.state_dict()[k] - saved[k]).abs().max().item() for k in saved) <= 1e-5
    expected = {str(r): drawn(settings, r) for r in range(1, settings.rounds + 1)}
    assert result["contributors"] == expected
    assert len({tuple(workers) for workers in expected.values()}) > 1  # the draw changes from round to round
    assert all(len(workers) == settings.round_sample_size(settings.workers) < settings.workers for workers in expected.values())


def test_the_sampler_is_seeded_and_ignores_the_order_it_is_given():
    names = worker_ids(50)
    first = federated.sample_workers(names, 10, seed=7, round_number=3)
    assert first == federated.sample_workers(list(reversed(names)), 10, seed=7, round_number=3) == sorted(first)
    assert len(set(first)) == 10 and set(first) <= set(names)
    assert first != federated.sample_workers(names, 10, seed=7, round_number=4)
    assert first != federated.sample_workers(names, 10, seed=8, round_number=3)
    assert federated.sample_workers(names[:3], 10, seed=7, round_number=3) == sorted(names[:3])


def test_sampling_settings_are_checked():
    with pytest.raises(ValueError, match="not both"):
        FederatedSettings(workers=3, clients_per_round=2, fraction=0.5)
    with pytest.raises(ValueError, match="more than the 3 workers"):
        FederatedSettings(workers=3, clients_per_round=4)
    with pytest.raises(ValueError, match="above 0"):
        FederatedSettings(workers=3, fraction=0.0)
    assert FederatedSettings(workers=10, partition="iid", fraction=0.25).round_sample_size(10) == 3  # rounded up
    assert FederatedSettings(workers=10, partition="iid", fraction=0.01).round_sample_size(10) == 1  # never nobody
    assert FederatedSettings(workers=10, partition="iid").round_sample_size(10) == 10 and not FederatedSettings(workers=10, partition="iid").samples_clients()


class Silent(MemoryTransport):
    """A worker whose updates never reach the server (its machine went quiet)."""

    def publish(self, queue, body, *, persistent=False, must_exist=False):
        if decode(body).kind != "update":
            super().publish(queue, body, persistent=persistent, must_exist=must_exist)


def test_a_worker_that_misses_its_round_is_not_drawn_until_heard_from():
    settings = FederatedSettings(dataset="digits", model="tiny", rounds=6, workers=4, partition="iid", clients_per_round=2, seed=3)
    silent = "worker-1"
    rounds_drawn = [r for r in range(1, settings.rounds + 1) if silent in drawn(settings, r)]
    assert len(rounds_drawn) >= 2, "pick a seed that draws the silent worker more than once, or the test proves nothing"
    shared = MemoryBroker()
    models_to_silent = []
    shared.taps.append(lambda queue, body: models_to_silent.append(decode(body).round) if queue == worker_queue("sample-silent", silent) and decode(body).kind == "model" else None)
    result = launch.run(
        fedavg.SCENARIO, settings, FedAvgRun(session="sample-silent", min_workers=1, round_timeout=0.5, timeout=60),
        connect_as=lambda party: (Silent if party == silent else MemoryTransport)(shared),
    )
    assert models_to_silent == rounds_drawn[:1]  # drawn once, missed, never drawn again
    assert all(silent not in workers for workers in result["contributors"].values())
    assert [r["step"] for r in result["history"]] == list(range(1, settings.rounds + 1))  # no stall
    labels = {"role": "fedavg-server", "session": "sample-silent"}
    assert REGISTRY.get_sample_value("splitfed_worker_missed_rounds", {**labels, "worker": silent}) == 1
    assert REGISTRY.get_sample_value("splitfed_sampled_workers", labels) == 2


def test_a_secret_draw_does_not_follow_the_seed():
    """Central DP's amplification by sampling needs a draw nobody can redo from --seed."""
    from splitfed.learning.federated import sample_workers

    candidates = [f"worker-{i}" for i in range(100)]
    seeded = {tuple(sample_workers(candidates, 10, 1, 3)) for _ in range(5)}
    secret = {tuple(sample_workers(candidates, 10, 1, 3, secret=True)) for _ in range(5)}
    assert len(seeded) == 1 and len(secret) > 1 and all(len(draw) == 10 and list(draw) == sorted(draw) for draw in secret)
