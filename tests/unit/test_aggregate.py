import pytest
import torch

from splitfed.learning import strategies as agg
from splitfed.learning.settings import STRATEGIES, FederatedSettings


def strategy(name: str, **params) -> agg.Strategy:
    return agg.from_settings(FederatedSettings(strategy=name, **params))


def test_fedavg_weights_by_samples():
    updates = torch.tensor([[0.0, 2.0], [4.0, 6.0]])
    assert torch.allclose(strategy("fedavg")(updates, torch.tensor([3.0, 1.0])), torch.tensor([1.0, 3.0]))


def test_median_and_trimmed_mean_ignore_one_outlier():
    honest = torch.tensor([[1.0, 1.0], [1.2, 0.8], [0.8, 1.2], [1.1, 0.9]])
    poisoned = torch.cat([honest, torch.tensor([[1e6, -1e6]])])
    weights = torch.ones(5)
    assert (strategy("median")(poisoned, weights) - 1).abs().max() < 0.21
    assert (strategy("trimmed-mean", trim=0.2)(poisoned, weights) - 1).abs().max() < 0.21
    assert strategy("fedavg")(poisoned, weights).abs().max() > 1e5  # the mean is not robust


def test_even_count_median_is_the_middle_mean():
    assert torch.equal(agg.coordinate_median(torch.tensor([[1.0], [2.0], [4.0], [10.0]])), torch.tensor([3.0]))


def test_krum_picks_an_honest_update():
    honest = torch.randn(6, 10) * 0.1
    poisoned = torch.cat([honest, torch.full((1, 10), 50.0)])
    chosen = strategy("krum", byzantine=1)(poisoned, torch.ones(7))
    assert any(torch.equal(chosen, row) for row in honest)


def test_every_strategy_is_built_with_its_own_parameters():
    assert tuple(agg.REGISTRY) == STRATEGIES
    assert strategy("trimmed-mean", trim=0.3) == agg.TrimmedMean(trim=0.3)
    assert strategy("krum", byzantine=2) == agg.Krum(byzantine=2)
    assert strategy("fedprox", prox_mu=0.5).recipe.prox_mu == 0.5
    assert all(strategy(name).recipe.prox_mu == 0.0 for name in STRATEGIES if name != "fedprox")


def test_flatten_round_trip_and_errors():
    state = {"a.weight": torch.randn(3, 2), "a.bias": torch.randn(3)}
    names = sorted(state)
    back = agg.unflatten(agg.flatten(state, names), state, names)
    assert all(torch.equal(back[k], state[k]) for k in state)
    with pytest.raises(ValueError):
        agg.from_settings(FederatedSettings(strategy="mode"))
    with pytest.raises(ValueError):
        agg.trimmed_mean(torch.ones(2, 2), 0.5)
    with pytest.raises(ValueError, match="K weights"):
        strategy("fedavg")(torch.ones(2, 2), torch.ones(3))


# Exact results, worked out by hand, with the poisoned update FIRST: a rule that returned the
# first row, or any row at all, would fail these.
POISON_FIRST = torch.tensor([[1e6, -1e6], [1.0, 1.0], [1.2, 0.8], [0.8, 1.2], [1.1, 0.9]])


def test_median_of_an_odd_count_is_the_middle_value_per_coordinate():
    # column 0 sorted: 0.8, 1.0, 1.1, 1.2, 1e6 -> 1.1;  column 1 sorted: -1e6, 0.8, 0.9, 1.0, 1.2 -> 0.9
    assert torch.equal(strategy("median")(POISON_FIRST, torch.ones(5)), torch.tensor([1.1, 0.9]))


def test_median_of_an_even_count_with_the_outlier_first():
    updates = torch.tensor([[100.0, -100.0], [1.0, 4.0], [2.0, 2.0], [4.0, 1.0]])
    # column 0 sorted: 1, 2, 4, 100 -> (2 + 4) / 2 = 3;  column 1 sorted: -100, 1, 2, 4 -> (1 + 2) / 2 = 1.5
    assert torch.equal(strategy("median")(updates, torch.ones(4)), torch.tensor([3.0, 1.5]))


def test_trimmed_mean_drops_the_extremes_of_each_coordinate():
    # trim 0.2 of 5 drops one value at each end: column 0 keeps 1.0, 1.1, 1.2; column 1 keeps 0.8, 0.9, 1.0
    expected = torch.tensor([(1.0 + 1.1 + 1.2) / 3, (0.8 + 0.9 + 1.0) / 3])
    assert torch.allclose(strategy("trimmed-mean", trim=0.2)(POISON_FIRST, torch.ones(5)), expected, atol=1e-6)


def test_krum_picks_the_update_with_the_closest_neighbours():
    updates = torch.tensor([[100.0, -100.0], [0.0, 0.0], [1.0, 1.0], [3.0, 0.0], [0.0, 4.0]])
    # n = 5, f = 1: each score is the sum of the n - f - 2 = 2 smallest squared distances to others.
    #   [0,0]: to [1,1] 2, [3,0] 9, [0,4] 16           -> 2 + 9  = 11
    #   [1,1]: to [0,0] 2, [3,0] 5, [0,4] 10           -> 2 + 5  = 7   (the smallest)
    #   [3,0]: to [0,0] 9, [1,1] 5, [0,4] 25           -> 5 + 9  = 14
    #   [0,4]: to [0,0] 16, [1,1] 10, [3,0] 25         -> 10 + 16 = 26
    #   [100,-100]: every distance is above 10^4
    assert torch.equal(strategy("krum", byzantine=1)(updates, torch.ones(5)), torch.tensor([1.0, 1.0]))
