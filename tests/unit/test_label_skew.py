"""FedLC's logit calibration for label skew: the offsets and the loss by hand, the strategy's
place in the registry, and reference runs with it."""

import math

import numpy as np
import pytest
import torch

from splitfed.learning import data, federated, models, objectives
from splitfed.learning import strategies as st
from splitfed.learning.settings import STRATEGIES, FederatedSettings


def test_offsets_follow_the_label_counts_and_guard_absent_classes():
    share = data.Samples(torch.zeros(6, 1, 8, 8), torch.tensor([0, 0, 0, 0, 2, 2]))  # 4 of class 0, none of 1, 2 of class 2
    offsets = objectives.calibration_offsets(share, 4, 2.0)
    expected = [2.0 * 4**-0.25, 2.0, 2.0 * 2**-0.25, 2.0]  # n_c = 0 counts as 1
    np.testing.assert_allclose(offsets.numpy(), expected, rtol=1e-6)


def test_the_local_loss_is_the_cross_entropy_of_the_calibrated_logits():
    full = data.load("digits", train=True, limit=64)
    share = full.subset(torch.nonzero(full.labels < 3).flatten())  # classes 0-2 only
    settings = FederatedSettings(dataset="digits", model="tiny", local_steps=1, batch_size=len(share), optimizer="sgd", lr=0.1)
    model = models.build("tiny", data.info("digits"), 3)
    logits = model(share.images[torch.arange(len(share))]).detach().double()  # one batch: every sample (order does not matter to the mean)
    counts = torch.bincount(share.labels, minlength=10).double()
    calibrated = logits - 0.5 * counts.clamp(min=1) ** -0.25
    by_hand = float(np.mean([math.log(torch.exp(row).sum()) - row[label] for row, label in zip(calibrated, share.labels.tolist())]))
    work = federated.local_training(model, share, settings, 5, 1, st.LocalRecipe(calibration_tau=0.5))
    assert work.loss == pytest.approx(by_hand, rel=1e-5)
    plain = models.build("tiny", data.info("digits"), 3)
    assert federated.local_training(plain, share, settings, 5, 1).loss != pytest.approx(by_hand, rel=1e-3)


def test_fedlc_is_registered_and_its_server_steps_as_fedavgm():
    assert "fedlc" in st.REGISTRY and "fedlc" in STRATEGIES
    strategy = st.from_settings(FederatedSettings(strategy="fedlc", lc_tau=0.7, server_momentum=0.5))
    assert strategy.recipe.calibration_tau == 0.7 and st.from_settings(FederatedSettings(strategy="fedavgm")).recipe.calibration_tau == 0.0
    x, updates, weights = torch.tensor([1.0, -2.0]), torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([1.0, 3.0])
    momentum = st.from_settings(FederatedSettings(strategy="fedavgm", server_momentum=0.5))
    state, momentum_state = {}, {}
    for _ in range(2):
        (stepped, state), (expected, momentum_state) = strategy.step(x, updates, weights, state), momentum.step(x, updates, weights, momentum_state)
        assert torch.equal(stepped, expected)


def run(**params):
    settings = FederatedSettings(dataset="digits", model="tiny", workers=3, partition="classes:0-3,4-6,7-9", rounds=2, local_steps=4,
                                 batch_size=32, optimizer="sgd", lr=0.05, **params)
    model, history = federated.reference_run(settings)
    return model.state_dict(), [record.accuracy for record in history]


def test_reference_runs_with_fedlc_repeat_and_tau_0_is_fedavgm():
    first, accuracies = run(strategy="fedlc", lc_tau=1.0)
    again, same = run(strategy="fedlc", lc_tau=1.0)
    assert accuracies == same and all(torch.equal(first[k], again[k]) for k in first)
    momentum, _ = run(strategy="fedavgm")
    uncalibrated, _ = run(strategy="fedlc", lc_tau=0.0)
    assert all(torch.equal(momentum[k], uncalibrated[k]) for k in momentum)
    assert not all(torch.equal(momentum[k], first[k]) for k in momentum)
