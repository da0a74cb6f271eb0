"""FedProx's proximal term against a hand computation: two local SGD steps (momentum 0.9) of a
linear softmax classifier, whose cross-entropy gradient is written out in numpy, plus
mu * (w - w_global), the gradient of mu/2 ||w - w_global||^2, and nothing of autograd."""

import numpy as np
import pytest
import torch
from torch import nn

from splitfed.learning import data, federated
from splitfed.learning import strategies as st
from splitfed.learning.settings import FederatedSettings, PartitionSettings

SEED, MU, LR = 7, 0.5, 0.1


def cross_entropy_gradient(weight: np.ndarray, bias: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """d/dW, d/db of the mean cross-entropy of softmax(x W^T + b)."""
    logits = x @ weight.T + bias  # (B, C)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(len(y)), y] -= 1.0  # softmax minus one-hot
    return p.T @ x / len(y), p.mean(0)


def two_prox_steps_by_hand(weight: np.ndarray, bias: np.ndarray, share: data.Samples, batches: list[torch.Tensor], mu: float) -> tuple[np.ndarray, np.ndarray]:
    anchor = (weight.copy(), bias.copy())
    momentum = None
    for indices in batches:
        x, y = share.images[indices].double().numpy(), share.labels[indices].numpy()
        grad_w, grad_b = cross_entropy_gradient(weight, bias, x, y)
        grad_w, grad_b = grad_w + mu * (weight - anchor[0]), grad_b + mu * (bias - anchor[1])
        momentum = (grad_w, grad_b) if momentum is None else (0.9 * momentum[0] + grad_w, 0.9 * momentum[1] + grad_b)  # torch's SGD: the first buffer is the gradient
        weight, bias = weight - LR * momentum[0], bias - LR * momentum[1]
    return weight, bias


@pytest.mark.parametrize("mu", [MU, 0.0])
def test_the_proximal_term_pulls_towards_the_global_model_as_computed_by_hand(mu):
    generator = torch.Generator().manual_seed(0)
    share = data.Samples(torch.randn(24, 5, generator=generator), torch.randint(0, 3, (24,), generator=generator))
    settings = PartitionSettings(workers=1, partition="iid", local_steps=2, batch_size=8, optimizer="sgd", lr=LR)
    torch.manual_seed(SEED)
    model = nn.Linear(5, 3)
    start = (model.weight.detach().double().numpy(), model.bias.detach().double().numpy())
    batches = federated.local_batches(len(share), settings, torch.Generator().manual_seed(SEED))
    federated.local_training(model, share, settings, SEED, 1, st.LocalRecipe(prox_mu=mu))
    weight, bias = two_prox_steps_by_hand(*start, share, batches, mu)
    np.testing.assert_allclose(model.weight.detach().numpy(), weight, rtol=0, atol=1e-6)  # float32 training against float64 by hand
    np.testing.assert_allclose(model.bias.detach().numpy(), bias, rtol=0, atol=1e-6)


def test_fedprox_trains_differently_from_fedavg_and_closer_to_the_global_model():
    generator = torch.Generator().manual_seed(1)
    share = data.Samples(torch.randn(64, 5, generator=generator), torch.randint(0, 3, (64,), generator=generator))
    settings = PartitionSettings(workers=1, partition="iid", local_steps=8, batch_size=8, optimizer="sgd", lr=LR)
    moved = {}
    for name in ("fedavg", "fedprox"):
        recipe = st.from_settings(FederatedSettings(strategy=name, prox_mu=5.0)).recipe
        torch.manual_seed(SEED)
        model = nn.Linear(5, 3)
        start = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        federated.local_training(model, share, settings, SEED, 1, recipe)
        moved[name] = float((torch.cat([p.detach().flatten() for p in model.parameters()]) - start).norm())
    assert moved["fedprox"] < 0.9 * moved["fedavg"]  # the term holds the local model nearer the global one
