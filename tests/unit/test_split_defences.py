"""The split client's defences (learning.defences): each one's maths against an independent
computation, each split run with defences equal to the one-process reference that applies them
in a plain loop, and the server refusing a label-prior query where none belongs."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from splitfed.learning import defences
from splitfed.learning.settings import SplitNNSettings
from splitfed.protocol import Message, ProtocolError
from splitfed.roles.split.checks import check_activations
from tests.unit.test_splitnn import assert_equals_reference, max_diff, run_saving_layers

SMALL = dict(dataset="digits", batch_size=32, limit=600, test_limit=300, epochs=2)


def numpy_distance_correlation(x: np.ndarray, z: np.ndarray) -> float:
    """Szekely's V-statistic, written out with loops over the double-centred matrices."""

    def centred(samples: np.ndarray) -> np.ndarray:
        flat = samples.reshape(len(samples), -1).astype(np.float64)
        d = np.sqrt(((flat[:, None, :] - flat[None, :, :]) ** 2).sum(-1))
        return d - d.mean(0, keepdims=True) - d.mean(1, keepdims=True) + d.mean()

    a, b = centred(x), centred(z)
    return math.sqrt((a * b).mean() / math.sqrt((a * a).mean() * (b * b).mean()))


def test_distance_correlation_matches_numpy_and_is_differentiable():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(16, 1, 4, 4, generator=generator)
    related = torch.tanh(x.flatten(1) @ torch.randn(16, 8, generator=generator))
    unrelated = torch.randn(16, 8, generator=generator)
    for z in (related, unrelated):
        assert abs(defences.distance_correlation(x, z).item() - numpy_distance_correlation(x.numpy(), z.numpy())) <= 1e-5
    assert abs(defences.distance_correlation(x, x).item() - 1.0) <= 1e-5
    assert defences.distance_correlation(x, related).item() > defences.distance_correlation(x, unrelated).item()
    z = related.clone().requires_grad_(True)
    defences.distance_correlation(x, z).backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_activation_clipping_bounds_each_sample_and_keeps_short_ones():
    batch = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]])
    clipped = defences.clip_activations(batch, 1.0)
    assert np.allclose(clipped.numpy(), [[0.6, 0.8], [0.3, 0.4], [0.0, 0.0]])


def test_max_norm_gives_every_sample_the_largest_expected_squared_norm():
    dims, draws = 400, 300
    gradients = torch.zeros(3, dims)
    gradients[0, 0], gradients[1, 1], gradients[2, 2] = 1.0, 2.0, 4.0
    stream = torch.Generator().manual_seed(1)
    squared = np.mean([(defences.max_norm_noise(gradients, stream).norm(dim=1) ** 2).numpy() for _ in range(draws)], axis=0)
    assert np.allclose(squared, 16.0, rtol=0.03), squared  # 1, 4 and 16 before
    assert torch.equal(defences.max_norm_noise(gradients[2:], stream), gradients[2:])  # the largest gets none


def test_gradient_noise_has_the_stated_standard_deviation():
    gradients = torch.zeros(64, 100)
    gradients[0, 0] = 10.0  # the batch's largest norm: s = 0.5 * 10 / sqrt(100) = 0.5
    noisy = defences.gaussian_noise(gradients, 0.5, torch.Generator().manual_seed(2))
    assert abs(float((noisy - gradients)[1:].std()) - 0.5) <= 0.02


def rr_probabilities(prior: np.ndarray, epsilon: float, label: int) -> np.ndarray:
    """RR-with-prior's output distribution for one label, from its definition (brute force over k)."""
    order = np.argsort(-prior, kind="stable")
    scores = [math.exp(epsilon) / (math.exp(epsilon) + k - 1) * prior[order[:k]].sum() for k in range(1, len(prior) + 1)]
    k = int(np.argmax(scores)) + 1
    chosen = order[:k]
    out = np.zeros(len(prior))
    if label in chosen:
        out[chosen] = 1 / (math.exp(epsilon) + k - 1)
        out[label] = math.exp(epsilon) / (math.exp(epsilon) + k - 1)
    else:
        out[chosen] = 1 / k
    return out


@pytest.mark.parametrize("prior", [np.full(10, 0.1), np.array([0.5, 0.3, 0.15, 0.01, 0.01, 0.01, 0.01, 0.004, 0.003, 0.003])])
@pytest.mark.parametrize("epsilon", [1.0, 3.0])
def test_randomised_response_draws_as_its_definition_says_and_is_epsilon_dp(prior, epsilon):
    draws = 40000
    uniforms = torch.rand((draws, 2), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    expected = {}
    for label in (0, 4):
        released = defences.randomised_response(torch.full((draws,), label), torch.tensor(prior).repeat(draws, 1), epsilon, uniforms)
        frequencies = np.bincount(released.numpy(), minlength=10) / draws
        expected[label] = rr_probabilities(prior, epsilon, label)
        assert np.abs(frequencies - expected[label]).max() <= 0.01, (frequencies, expected[label])
    # epsilon-label-DP: no output is more than e^eps times likelier under one label than another.
    both = np.stack([expected[0], expected[4]])
    seen = both.min(0) > 0
    assert (both[:, seen].max(0) / both[:, seen].min(0)).max() <= math.exp(epsilon) + 1e-9
    assert np.all((both[0] > 0) == (both[1] > 0))


def test_each_label_is_released_once():
    settings = SplitNNSettings(**SMALL, label_dp=1.0)
    guard = defences.Defences(settings, 0, samples=50, classes=10)
    labels = torch.arange(50) % 10
    first = guard.release(torch.arange(50), labels)
    again = guard.release(torch.arange(50).flip(0), labels.flip(0))
    assert torch.equal(again.flip(0), first)
    counts = guard.label_counts(labels)
    assert counts == {"released": 50, "true": int((first == labels).sum())} and 0 < counts["true"] < 50


def test_the_models_prior_waits_for_half_the_labels():
    guard = defences.Defences(SplitNNSettings(**SMALL, label_dp=1.0, label_dp_prior="model"), 0, samples=10, classes=10)
    labels = torch.arange(10)
    assert not guard.needs_prior(torch.arange(5))
    guard.release(torch.arange(4), labels[:4])
    assert not guard.needs_prior(torch.arange(4, 10))
    guard.release(torch.arange(4, 5), labels[4:5])
    assert guard.needs_prior(torch.arange(5, 10)) and not guard.needs_prior(torch.arange(5))  # released ones never again


CASES = {
    "nopeek": dict(mode="vanilla", nopeek_weight=0.5),
    "activation noise": dict(mode="vanilla", activation_clip=5.0, activation_noise=0.5),
    "label dp with the model's prior": dict(mode="vanilla", label_dp=1.0, label_dp_prior="model"),
    "label dp": dict(mode="vanilla", label_dp=2.0),
    "max-norm": dict(mode="u-shaped", gradient_defence="max-norm"),
    "gradient noise": dict(mode="u-shaped", gradient_defence="noise", gradient_noise=1.0),
    "all of u-shaped's": dict(mode="u-shaped", gradient_defence="max-norm", nopeek_weight=0.3, activation_clip=3.0, activation_noise=0.2),
    "splitfed-v1, label dp and noise": dict(mode="vanilla", clients=3, schedule="splitfed-v1", label_dp=1.0, label_dp_prior="model", activation_clip=3.0,
                                            activation_noise=0.3),
}


@pytest.fixture(scope="module")
def undefended(tmp_path_factory):
    """Each mode's one-client run without defences: what a defence must change."""
    return {mode: run_saving_layers(SplitNNSettings(**SMALL, mode=mode), tmp_path_factory.mktemp(mode))[1]["split-client"] for mode in ("vanilla", "u-shaped")}


@pytest.mark.parametrize("case", CASES)
def test_a_defended_run_equals_its_reference(case, tmp_path, undefended):
    settings = SplitNNSettings(**SMALL, **CASES[case])
    result, client_layers, server_layers = run_saving_layers(settings, tmp_path)
    assert_equals_reference(settings, client_layers, server_layers)
    if settings.clients == 1:
        assert max_diff(client_layers["split-client"], undefended[settings.mode]) > 1e-3  # the defence did something
    assert result["accuracy"] is not None


def test_the_server_takes_a_prior_query_only_from_a_vanilla_batch_that_does_not_train():
    def view(mode):
        settings = SplitNNSettings(**SMALL, mode=mode)
        return SimpleNamespace(settings=settings, in_shape=(128,), classes=10, schedule=SimpleNamespace(check_turn=lambda state, message: None))

    state = SimpleNamespace(pending=None)
    x = {"x": np.zeros((4, 128), np.float32)}
    check_activations(view("vanilla"), state, Message("activations", "s", "split-client", 1, meta={"train": False, "prior": True}, tensors=x))
    for mode, meta in [("vanilla", {"train": False, "prior": "yes"}), ("u-shaped", {"train": False, "prior": True}),
                       ("vanilla", {"train": True, "prior": True})]:
        tensors = {**x, "y": np.zeros(4, np.int64)} if meta["train"] else x
        with pytest.raises(ProtocolError, match="prior") as refused:
            check_activations(view(mode), state, Message("activations", "s", "split-client", 1, meta=meta, tensors=tensors))
        assert refused.value.reason == "malformed"
