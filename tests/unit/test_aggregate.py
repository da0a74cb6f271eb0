import pytest
import torch

from splitfed.learning import aggregate as agg


def test_fedavg_weights_by_samples():
    updates = torch.tensor([[0.0, 2.0], [4.0, 6.0]])
    assert torch.allclose(agg.aggregate("fedavg", updates, torch.tensor([3.0, 1.0])), torch.tensor([1.0, 3.0]))


def test_median_and_trimmed_mean_ignore_one_outlier():
    honest = torch.tensor([[1.0, 1.0], [1.2, 0.8], [0.8, 1.2], [1.1, 0.9]])
    poisoned = torch.cat([honest, torch.tensor([[1e6, -1e6]])])
    weights = torch.ones(5)
    assert (agg.aggregate("median", poisoned, weights) - 1).abs().max() < 0.21
    assert (agg.aggregate("trimmed-mean", poisoned, weights, trim=0.2) - 1).abs().max() < 0.21
    assert agg.aggregate("fedavg", poisoned, weights).abs().max() > 1e5  # the mean is not robust


def test_even_count_median_is_the_middle_mean():
    assert torch.equal(agg.coordinate_median(torch.tensor([[1.0], [2.0], [4.0], [10.0]])), torch.tensor([3.0]))


def test_krum_picks_an_honest_update():
    honest = torch.randn(6, 10) * 0.1
    poisoned = torch.cat([honest, torch.full((1, 10), 50.0)])
    chosen = agg.aggregate("krum", poisoned, torch.ones(7), byzantine=1)
    assert any(torch.equal(chosen, row) for row in honest)


def test_flatten_round_trip_and_errors():
    state = {"a.weight": torch.randn(3, 2), "a.bias": torch.randn(3)}
    names = sorted(state)
    back = agg.unflatten(agg.flatten(state, names), state, names)
    assert all(torch.equal(back[k], state[k]) for k in state)
    with pytest.raises(ValueError):
        agg.aggregate("mode", torch.ones(2, 2), torch.ones(2))
    with pytest.raises(ValueError):
        agg.trimmed_mean(torch.ones(2, 2), 0.5)
