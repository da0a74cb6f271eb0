"""Server optimisers and SCAFFOLD: the math by hand on tiny vectors, state that survives a
checkpoint, and the worker side of SCAFFOLD."""

import numpy as np
import pytest
import torch

from splitfed.learning import data, federated, models, objectives
from splitfed.learning import strategies as st
from splitfed.learning.settings import FederatedSettings


def build(name, **params):
    return st.from_settings(FederatedSettings(strategy=name, **params))


X = torch.tensor([1.0, -2.0, 0.5])
UPDATES = torch.tensor([[2.0, -2.0, 0.0], [4.0, 0.0, 0.5]])  # weighted mean with (1, 3): [3.5, -0.5, 0.375]
WEIGHTS = torch.tensor([1.0, 3.0])
DELTA = np.array([2.5, 1.5, -0.125])  # mean - X


def test_fedavgm_without_momentum_at_lr_1_is_fedavg_and_with_momentum_accumulates():
    plain = build("fedavgm", server_lr=1.0, server_momentum=0.0)
    assert torch.allclose(plain.step(X, UPDATES, WEIGHTS, {})[0], build("fedavg")(UPDATES, WEIGHTS))
    momentum = build("fedavgm", server_lr=0.5, server_momentum=0.9)
    first, state = momentum.step(X, UPDATES, WEIGHTS, {})
    np.testing.assert_allclose(first.numpy(), X.numpy() + 0.5 * DELTA, rtol=1e-6)
    second, _ = momentum.step(first, UPDATES, WEIGHTS, state)  # m = 0.9 * DELTA + (mean - first)
    expected_m = 0.9 * DELTA + (np.array([3.5, -0.5, 0.375]) - first.numpy())
    np.testing.assert_allclose(second.numpy(), first.numpy() + 0.5 * expected_m, rtol=1e-6)


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad"])
def test_adaptive_first_step_by_hand(name):
    strategy = build(name, server_lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    m = 0.1 * DELTA
    v0 = 1e-6  # tau^2
    v = {
        "fedadam": 0.99 * v0 + 0.01 * DELTA**2,
        "fedadagrad": v0 + DELTA**2,
        "fedyogi": v0 - 0.01 * DELTA**2 * np.sign(v0 - DELTA**2),
    }[name]
    np.testing.assert_allclose(strategy.step(X, UPDATES, WEIGHTS, {})[0].numpy(), X.numpy() + 0.1 * m / (np.sqrt(v) + 1e-3), rtol=1e-5)


def test_robust_rule_under_a_server_optimiser():
    poisoned = torch.cat([torch.full((1, 3), 1e6), UPDATES, UPDATES])  # the poisoned row first
    strategy = build("fedavgm", rule="median", server_lr=1.0, server_momentum=0.0)
    assert torch.equal(strategy.step(X, poisoned, torch.ones(5), {})[0], torch.tensor([4.0, 0.0, 0.5]))


@pytest.mark.parametrize("name", ["fedavgm", "fedadam", "fedyogi", "fedadagrad", "scaffold"])
def test_state_round_trip_gives_the_same_next_step(name):
    original = build(name)
    _, state = original.step(X, UPDATES, WEIGHTS, {})
    if original.recipe.control_variates:
        state = original.next_control(torch.ones(2, 3), 2, state)
    before = {k: v.clone() for k, v in state.items()}
    restored = build(name)
    restored_state = restored.loaded_state({k: v.clone() for k, v in state.items()})
    assert state and set(restored_state) == set(state)
    assert torch.equal(original.step(X, UPDATES, WEIGHTS, state)[0], restored.step(X, UPDATES, WEIGHTS, restored_state)[0])
    assert all(torch.equal(state[k], before[k]) for k in state)  # a step returns its new state, leaving the one it was given
    with pytest.raises(ValueError):
        build("fedavg").loaded_state(state)


def test_scaffold_steps_and_moves_its_control():
    strategy = build("scaffold", server_lr=0.5)
    stepped, state = strategy.step(X, UPDATES, WEIGHTS, {})
    np.testing.assert_allclose(stepped.numpy(), X.numpy() + 0.5 * DELTA, rtol=1e-6)
    assert torch.equal(strategy.control(X, state), torch.zeros(3))
    state = strategy.next_control(torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]]), total_workers=4, state=state)  # sum / N
    assert torch.equal(strategy.control(X, state), torch.tensor([1.0, 1.0, 1.0]))


def tiny_share(n=64):
    share = data.load("digits", train=True, limit=n)
    return models.build("tiny", data.info("digits"), 3), share


def test_scaffold_worker_with_zero_controls_trains_as_without_and_returns_its_gradient():
    settings = FederatedSettings(dataset="digits", model="tiny", local_steps=3, batch_size=16, optimizer="sgd", lr=0.1)
    plain, share = tiny_share()
    controlled, _ = tiny_share()
    zeros = federated.zeros_like_state(plain)
    expected_gradient = federated.local_gradient(controlled, share, federated.local_batches(len(share), settings, torch.Generator().manual_seed(5)))
    a = federated.local_training(plain, share, settings, 5, 1)
    b = federated.local_training(controlled, share, settings, 5, 1, controls=(zeros, zeros))
    assert a.control is None and a.loss == b.loss
    assert all(torch.equal(plain.state_dict()[k], controlled.state_dict()[k]) for k in zeros)
    assert all(torch.allclose(b.control[k], expected_gradient[k]) for k in zeros)


def test_scaffold_correction_shifts_every_step_by_c_minus_ci():
    """SGD's first step (its momentum buffer starts as the gradient) moves the weights by
    -lr * (g + c - c_i): a correction of +1 on every parameter moves each by an extra -lr."""
    settings = FederatedSettings(dataset="digits", model="tiny", local_steps=1, batch_size=16, optimizer="sgd", lr=0.1)
    base, share = tiny_share()
    shifted, _ = tiny_share()
    zeros = federated.zeros_like_state(base)
    ones = {k: torch.ones_like(v) for k, v in zeros.items()}
    federated.local_training(base, share, settings, 5, 1, controls=(zeros, zeros))
    federated.local_training(shifted, share, settings, 5, 1, controls=(ones, zeros))
    for key in zeros:
        torch.testing.assert_close(shifted.state_dict()[key] - base.state_dict()[key], torch.full_like(zeros[key], -0.1))


def test_local_steps_and_lr_decay():
    settings = FederatedSettings(local_steps=7, batch_size=10, lr=0.1, lr_decay=0.5)
    batches = federated.local_batches(25, settings, torch.Generator().manual_seed(0))
    assert [len(b) for b in batches] == [10, 10, 5, 10, 10, 5, 10]  # a second pass begins where the first ends
    assert federated.round_lr(settings, 3) == pytest.approx(0.025)
    epochs = FederatedSettings(local_epochs=2, batch_size=10)
    assert len(federated.local_batches(25, epochs, torch.Generator().manual_seed(0))) == 6


def test_fedrs_scales_only_the_logits_of_absent_classes():
    share = data.load("digits", train=True, limit=200)
    mine = share.labels < 4
    only_low = data.Samples(share.images[mine], share.labels[mine])
    factors = objectives.absent_class_scale(only_low, 10, 0.3)
    assert torch.equal(factors, torch.tensor([1.0] * 4 + [0.3] * 6))
    assert build("fedrs", rs_alpha=0.3).recipe.absent_scale == 0.3 and build("fedavg").recipe.absent_scale == 1.0
    # Scale 1 is plain training; a smaller one trains differently on the same batches.
    settings = FederatedSettings(dataset="digits", model="tiny", local_steps=3, batch_size=16)
    runs = {}
    for scale in (1.0, 0.3):
        model = models.build("tiny", data.info("digits"), 3)
        runs[scale] = (federated.local_training(model, only_low, settings, 5, 1, st.LocalRecipe(absent_scale=scale)), model.state_dict())
    plain, _ = tiny_share()
    federated.local_training(plain, only_low, settings, 5, 1)
    assert all(torch.equal(plain.state_dict()[k], runs[1.0][1][k]) for k in plain.state_dict())
    assert not all(torch.equal(runs[0.3][1][k], runs[1.0][1][k]) for k in plain.state_dict())


def test_fedbabu_workers_leave_the_head_as_it_is():
    model, share = models.build("cnn", data.info("digits"), 3), data.load("digits", train=True, limit=128)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    settings = FederatedSettings(dataset="digits", local_steps=3, batch_size=32)
    federated.local_training(model, share, settings, 5, 1, st.LocalRecipe(frozen_head=True))
    head = federated.last_layer(model)
    assert head == ["11.weight", "11.bias"] and build("fedbabu").recipe.frozen_head and not build("fedavg").recipe.frozen_head
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in head)
    assert not torch.equal(model.state_dict()["0.weight"], before["0.weight"])  # the body trains
