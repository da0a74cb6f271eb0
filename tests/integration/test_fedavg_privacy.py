"""Differential privacy in a distributed FedAvg run (the roles in threads over the in-memory
transport; the same roles over RabbitMQ are in test_fedavg_secagg and the Prometheus test): the
noise the server adds has the spread the settings give it, measured against the noiseless run;
epsilon in each round's record is the accountant's for that many rounds, computed here with
dp-accounting directly; --dp-target-epsilon ends the run before the round that would pass it;
adaptive clipping moves the clip by the paper's factor; --dp sample reports each worker's own
epsilon; the privacy a worker is set up for must be the server's."""

from __future__ import annotations

import dataclasses
import math

import pytest
from dp_accounting import dp_event, rdp
from safetensors.torch import load_file

from splitfed.errors import TaskError
from splitfed.learning import federated, strategies
from splitfed.learning.settings import FederatedSettings
from splitfed.learning.tasks import Task
from splitfed.scenarios import fedavg, launch
from splitfed.scenarios.fedavg import FedAvgRun

BASE = dict(dataset="digits", partition="iid", workers=4, model="tiny", lr=0.05, test_limit=120, local_steps=3)


def accountant_epsilon(z: float, rate: float, rounds: int, delta: float) -> float:
    event = dp_event.GaussianDpEvent(z) if rate == 1 else dp_event.PoissonSampledDpEvent(rate, dp_event.GaussianDpEvent(z))
    accountant = rdp.RdpAccountant()
    accountant.compose(event, rounds)
    return accountant.get_epsilon(delta)


def test_central_dp_without_noise_is_the_plain_loop_and_epsilon_is_the_accountants():
    settings = FederatedSettings(**BASE, rounds=2, dp="central", dp_clip=0.3, dp_noise_multiplier=0.0)
    _, plain = federated.reference_run(settings)
    result = launch.run(fedavg.SCENARIO, settings, FedAvgRun(timeout=60))
    assert [r["loss"] for r in result["history"]] == [r.loss for r in plain]  # clipped, uniform weights: the same maths both ways
    assert [r["epsilon"] for r in result["history"]] == [math.inf, math.inf]  # no noise, no privacy
    noisy = launch.run(fedavg.SCENARIO, dataclasses.replace(settings, dp_noise_multiplier=1.3, clients_per_round=2), FedAvgRun(timeout=60))
    # Amplified by the secret draw of 2 of the 4 workers a round.
    assert [r["epsilon"] for r in noisy["history"]] == pytest.approx([accountant_epsilon(1.3, 0.5, n, 1e-5) for n in (1, 2)], rel=1e-9)
    assert noisy["dp"] == {"epsilon": noisy["history"][-1]["epsilon"], "delta": 1e-5, "stopped": ""}


def test_the_server_noise_has_the_stated_spread(tmp_path):
    """One round from the same start with and without noise: the models differ by the server's
    noise alone, N(0, (z C / K)^2) per coordinate for K workers."""
    settings = FederatedSettings(**BASE, rounds=1, dp="central", dp_clip=0.2, dp_noise_multiplier=2.0)
    noiseless, _ = federated.reference_run(dataclasses.replace(settings, dp_noise_multiplier=0.0))
    launch.run(fedavg.SCENARIO, settings, FedAvgRun(timeout=60, checkpoint_dir=tmp_path))
    noised = load_file(str(tmp_path / "model.safetensors"))
    names = list(noiseless.state_dict())
    difference = strategies.flatten(noised, names) - strategies.flatten(noiseless.state_dict(), names)  # (P,)
    expected = 2.0 * 0.2 / settings.workers
    assert difference.std().item() == pytest.approx(expected, rel=0.15)
    assert abs(difference.mean().item()) < 4 * expected / difference.numel() ** 0.5


def test_the_target_epsilon_ends_the_run_before_the_round_that_would_pass_it(tmp_path):
    target = (accountant_epsilon(1.0, 1.0, 2, 1e-5) + accountant_epsilon(1.0, 1.0, 3, 1e-5)) / 2  # between 2 and 3 rounds
    settings = FederatedSettings(**BASE, rounds=5, dp="local", dp_clip=0.5, dp_noise_multiplier=1.0, dp_target_epsilon=target)
    result = launch.run(fedavg.SCENARIO, settings, FedAvgRun(timeout=60))
    assert [r["step"] for r in result["history"]] == [1, 2]
    assert result["dp"]["epsilon"] <= target < accountant_epsilon(1.0, 1.0, 3, 1e-5)
    assert result["dp"]["stopped"].startswith("round 3 would take epsilon to")
    with pytest.raises(TaskError, match="one round already spends epsilon"):
        launch.run(fedavg.SCENARIO, dataclasses.replace(settings, dp_target_epsilon=0.01), FedAvgRun(timeout=60))


def test_adaptive_clipping_moves_the_clip_by_the_papers_factor():
    """With no noise on the count and a clip far above every update's norm, every update is under
    it: the clip shrinks by exp(-lr (1 - quantile)) each round, through the secure sum's count."""
    settings = FederatedSettings(**BASE, rounds=3, dp="central", dp_clip=50.0, dp_noise_multiplier=0.0, dp_adaptive_clip=True,
                                 dp_clip_count_stddev=0.0, dp_clip_lr=0.2, dp_target_quantile=0.5, secure_aggregation="secagg+")
    result = launch.run(fedavg.SCENARIO, settings, FedAvgRun(timeout=60))
    clips = [r["clip"] for r in result["history"]]
    assert clips == pytest.approx([50.0 * math.exp(-0.1) ** n for n in range(3)], rel=1e-12)


def test_sample_level_dp_reports_each_workers_epsilon():
    settings = FederatedSettings(**BASE, rounds=2, dp="sample", dp_clip=1.0, dp_noise_multiplier=1.1, batch_size=32)
    result = launch.run(fedavg.SCENARIO, settings, FedAvgRun(timeout=60))
    shares = federated.worker_shares(Task(settings), settings, list(range(settings.workers)))
    rate = 32 / min(len(share) for share in shares)  # the smallest share samples at the highest rate: its epsilon is the largest
    assert [r["epsilon"] for r in result["history"]] == pytest.approx([accountant_epsilon(1.1, rate, 3 * n, 1e-5) for n in (1, 2)], rel=1e-9)
    assert result["history"][0]["epsilon_next"] == pytest.approx(result["history"][1]["epsilon"], rel=1e-9)
