"""learning.privacy against computations that do not go through it: norms and noise statistics
measured on the outputs, Andrew et al.'s formulas written out, the Gaussian mechanism's RDP
minimised by hand, and DP-SGD's step rebuilt from per-sample gradients taken one sample at a time."""

import copy
import math

import pytest
import torch
from dp_accounting import dp_event, rdp
from torch import nn

from splitfed.learning import models, privacy
from splitfed.learning.settings import DataShape

# Opacus hooks the first layer too, whose input (the data) needs no gradient: torch warns, harmlessly.
opacus_hooks = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# clip_l2

def test_a_change_above_the_clip_is_scaled_to_the_clip_in_the_same_direction():
    delta = torch.randn(10_000, generator=seeded()) * 3
    norm = math.sqrt(sum(float(x) ** 2 for x in delta))  # by hand, not torch's norm
    clipped, within = privacy.clip_l2(delta, 2.0)
    assert within is False
    assert torch.linalg.vector_norm(clipped).item() == pytest.approx(2.0, rel=1e-6)
    assert torch.allclose(clipped, delta * (2.0 / norm), rtol=1e-5, atol=1e-8)
    assert clipped.dtype == torch.float32


def test_a_three_four_five_change_is_clipped_to_its_unit_vector():
    clipped, within = privacy.clip_l2(torch.tensor([3.0, 4.0]), 1.0)
    assert not within
    assert torch.allclose(clipped, torch.tensor([0.6, 0.8]))


@pytest.mark.parametrize("clip", [5.0, 10.0])  # at the clip and above it
def test_a_change_within_the_clip_is_kept_as_it_is(clip):
    delta = torch.tensor([3.0, 4.0])
    clipped, within = privacy.clip_l2(delta, clip)
    assert within is True
    assert torch.equal(clipped, delta)


def test_a_clip_must_be_positive():
    with pytest.raises(ValueError, match="positive"):
        privacy.clip_l2(torch.ones(3), 0.0)


# gaussian_noise

def test_noise_from_equal_generators_is_equal_and_without_one_it_is_fresh():
    assert torch.equal(privacy.gaussian_noise((100,), 1.0, seeded(3)), privacy.gaussian_noise((100,), 1.0, seeded(3)))
    assert not torch.equal(privacy.gaussian_noise((100,), 1.0), privacy.gaussian_noise((100,), 1.0))


def test_noise_without_a_generator_neither_follows_nor_moves_the_global_seed():
    torch.manual_seed(0)
    first = privacy.gaussian_noise((100,), 1.0)
    after_first = torch.rand(3)
    torch.manual_seed(0)
    second = privacy.gaussian_noise((100,), 1.0)
    assert not torch.equal(first, second)
    assert torch.equal(torch.rand(3), after_first)  # the global generator was not drawn from


# noised_mean

def test_the_noised_mean_adds_noise_of_z_clip_over_contributors():
    parameters, contributors, clip, z = 400_000, 4, 2.0, 1.5
    total = torch.randn(parameters, generator=seeded(1)) * 5
    mean = privacy.noised_mean(total, contributors, clip, z, seeded(2))
    assert mean.dtype == torch.float32 and mean.shape == (parameters,)
    noise = mean.double() - total.double() / contributors
    expected = z * clip / contributors
    assert noise.std().item() == pytest.approx(expected, rel=0.02)
    assert abs(noise.mean().item()) < 5 * expected / math.sqrt(parameters)


def test_without_noise_the_mean_is_exactly_the_sum_over_contributors():
    total = torch.randn(1000, generator=seeded(1))
    assert torch.equal(privacy.noised_mean(total, 3, 1.0, 0.0), (total.double() / 3).float())


def test_a_mean_of_nobody_is_refused():
    with pytest.raises(ValueError, match="contributor"):
        privacy.noised_mean(torch.zeros(3), 0, 1.0, 1.0)


# local_noise

def test_local_noise_is_the_clipped_change_plus_noise_of_z_clip():
    delta = torch.randn(200_000, generator=seeded(1)) * 10
    clip, z = 0.5, 2.0
    assert torch.linalg.vector_norm(privacy.local_noise(delta, clip, 0.0)).item() == pytest.approx(clip, rel=1e-6)
    noise = privacy.local_noise(delta, clip, z, seeded(2)) - delta * (clip / torch.linalg.vector_norm(delta.double()).item())
    assert noise.std().item() == pytest.approx(z * clip, rel=0.02)


# adaptive clipping

def test_the_effective_noise_multiplier_matches_andrew_et_al():
    # z = 1, sigma_b = 1: (1 - 1/4)^(-1/2) = 2 / sqrt(3)
    assert privacy.effective_noise_multiplier(1.0, 1.0) == pytest.approx(2 / math.sqrt(3), rel=1e-12)
    assert privacy.effective_noise_multiplier(0.0, 3.0) == 0.0


def test_the_sum_and_the_count_together_spend_what_one_gaussian_with_z_spends():
    z, count_stddev, delta = 1.2, 2.5, 1e-6
    z_sum = privacy.effective_noise_multiplier(z, count_stddev)
    accountant = rdp.RdpAccountant()
    # The count's sensitivity is 1/2, so its Gaussian of stddev sigma_b has multiplier 2 sigma_b.
    accountant.compose(dp_event.ComposedDpEvent([dp_event.GaussianDpEvent(z_sum), dp_event.GaussianDpEvent(2 * count_stddev)]))
    single = rdp.RdpAccountant()
    single.compose(dp_event.GaussianDpEvent(z))
    assert accountant.get_epsilon(delta) == pytest.approx(single.get_epsilon(delta), rel=1e-9)


@pytest.mark.parametrize("count_stddev", [0.5, 0.3])  # 2 sigma_b == z, and below it
def test_a_count_noise_that_would_use_the_whole_budget_is_refused(count_stddev):
    with pytest.raises(ValueError, match="too small"):
        privacy.effective_noise_multiplier(1.0, count_stddev)


def test_without_count_noise_the_clip_follows_the_exponential_update():
    assert privacy.next_clip(2.0, 3, 4, 0.5, 0.2, 0.0) == pytest.approx(2.0 * math.exp(-0.2 * (3 / 4 - 0.5)), rel=1e-12)


def test_the_clip_shrinks_when_every_update_fit_and_grows_when_none_did():
    # All updates within the clip: the clip is above the target quantile of the norms.
    assert privacy.next_clip(1.0, 10, 10, 0.5, 0.2, 0.0) == pytest.approx(math.exp(-0.1))
    assert privacy.next_clip(1.0, 0, 10, 0.5, 0.2, 0.0) == pytest.approx(math.exp(0.1))


def test_the_count_noise_has_the_given_stddev():
    generator, contributors, clip_lr, count_stddev = seeded(5), 40, 0.2, 2.0
    logs = torch.tensor([math.log(privacy.next_clip(1.0, 20, contributors, 0.5, clip_lr, count_stddev, generator)) for _ in range(4000)])
    # log(next / clip) = -clip_lr * ((20 + N) / 40 - 0.5) = -clip_lr * N / 40
    assert logs.std().item() == pytest.approx(clip_lr * count_stddev / contributors, rel=0.05)
    assert abs(logs.mean().item()) < 5 * clip_lr * count_stddev / contributors / math.sqrt(len(logs))


def test_the_default_count_noise_is_one_twentieth_of_the_contributors():
    assert privacy.default_count_stddev(100) == 5.0


# epsilon

@pytest.mark.parametrize("z, steps", [(1.1, 10), (2.0, 1), (5.0, 100), (0.8, 3)])
def test_without_subsampling_epsilon_is_at_most_the_gaussian_mechanisms_plain_rdp_bound(z, steps):
    # Composed Gaussian RDP: steps * alpha / (2 z^2) = r * alpha; the plain conversion
    # r alpha + log(1/delta) / (alpha - 1) is least at alpha = 1 + sqrt(log(1/delta) / r): r + 2 sqrt(r log(1/delta)).
    delta = 1e-5
    r = steps / (2 * z * z)
    by_hand = r + 2 * math.sqrt(r * math.log(1 / delta))
    accounted = privacy.epsilon(z, 1.0, steps, delta)
    assert 0.8 * by_hand <= accounted <= by_hand


def test_abadi_et_al_figure_is_an_upper_bound():
    # Abadi et al. 2016, section 3.1: q = 0.01, sigma = 4, T = 10000, delta = 1e-5 gives epsilon ~ 1.26 by
    # their moments accountant; RDP with a tighter conversion can only be lower, and not by much.
    assert 0.8 * 1.26 <= privacy.epsilon(4.0, 0.01, 10_000, 1e-5) <= 1.26


def test_epsilon_grows_with_steps_and_shrinks_with_noise_and_subsampling():
    assert privacy.epsilon(1.0, 0.1, 10, 1e-5) < privacy.epsilon(1.0, 0.1, 20, 1e-5)
    assert privacy.epsilon(2.0, 0.1, 10, 1e-5) < privacy.epsilon(1.0, 0.1, 10, 1e-5)
    assert privacy.epsilon(1.0, 0.1, 10, 1e-5) < privacy.epsilon(1.0, 1.0, 10, 1e-5)


def test_epsilon_without_noise_is_infinite_and_without_steps_zero():
    assert privacy.epsilon(0.0, 0.5, 1, 1e-5) == math.inf
    assert privacy.epsilon(0.0, 1.0, 1, 1e-5) == math.inf
    assert privacy.epsilon(1.0, 0.5, 0, 1e-5) == 0.0


def test_a_sampling_rate_outside_zero_one_is_refused():
    with pytest.raises(ValueError, match="sampling rate"):
        privacy.epsilon(1.0, 1.5, 1, 1e-5)


# sample_dp

BATCH, FEATURES, CLASSES, LR = 8, 20, 4, 0.5


def linear_and_batch(seed: int = 0, features: int = FEATURES, classes: int = CLASSES) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(features, classes))
    generator = seeded(seed + 100)
    return model, torch.randn(BATCH, features, generator=generator) * 3, torch.randint(0, classes, (BATCH,), generator=generator)


def dp_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float, z: float, generator: torch.Generator | None) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    with privacy.sample_dp(model, optimizer, clip, z, BATCH, generator) as (module, dp_optimizer):
        nn.functional.cross_entropy(module(x), y).backward()
        dp_optimizer.step()
        dp_optimizer.zero_grad()


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def clipped_mean_gradient_by_hand(model: nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float) -> torch.Tensor:
    """Each sample's gradient from its own backward pass, clipped to `clip`, averaged over the batch."""
    clipped = []
    for i in range(len(x)):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        gradient = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double()
        clipped.append(gradient * min(1.0, clip / gradient.norm().item()))
    model.zero_grad()
    return torch.stack(clipped).mean(0)


@opacus_hooks
def test_with_a_huge_clip_and_no_noise_one_step_is_plain_sgd():
    model, x, y = linear_and_batch()
    plain = copy.deepcopy(model)
    optimizer = torch.optim.SGD(plain.parameters(), lr=LR)
    nn.functional.cross_entropy(plain(x), y).backward()
    optimizer.step()
    dp_step(model, x, y, clip=1e6, z=0.0, generator=seeded())
    assert torch.allclose(flat(model), flat(plain), atol=1e-6)


@opacus_hooks
def test_with_a_tiny_clip_the_step_is_the_mean_of_clipped_per_sample_gradients():
    clip = 1e-2
    model, x, y = linear_and_batch()
    start = flat(model).double()
    expected = clipped_mean_gradient_by_hand(copy.deepcopy(model), x, y, clip)
    dp_step(model, x, y, clip=clip, z=0.0, generator=seeded())
    step = start - flat(model).double()
    assert step.norm().item() <= LR * clip * (1 + 1e-5)
    assert torch.allclose(step, LR * expected, atol=1e-7)


@opacus_hooks
def test_each_batch_gets_noise_of_z_clip_over_the_batch_size():
    clip, z = 0.5, 1.0
    model, x, y = linear_and_batch(features=500, classes=40)  # 20 040 parameters to measure the noise on
    start = flat(model).double()
    noiseless = start - LR * clipped_mean_gradient_by_hand(copy.deepcopy(model), x, y, clip)
    dp_step(model, x, y, clip=clip, z=z, generator=seeded())
    noise = (flat(model).double() - noiseless) / LR
    assert noise.std().item() == pytest.approx(z * clip / BATCH, rel=0.05)


@opacus_hooks
def test_without_a_generator_the_noise_does_not_follow_the_global_seed():
    steps = []
    for _ in range(2):
        model, x, y = linear_and_batch()  # seeds the global generator the same way each time
        dp_step(model, x, y, clip=1.0, z=1.0, generator=None)
        steps.append(flat(model))
    assert not torch.equal(*steps)


@opacus_hooks
def test_after_the_round_the_model_is_a_plain_module_again():
    model, x, y = linear_and_batch()
    keys = list(model.state_dict())
    dp_step(model, x, y, clip=1.0, z=1.0, generator=seeded())
    assert list(model.state_dict()) == keys
    for parameter in model.parameters():
        assert not {"grad_sample", "summed_grad", "_forward_counter", "_current_grad_sample", "_norm_sample"} & set(vars(parameter))
    for layer in model.modules():
        assert not layer._forward_hooks and not layer._forward_pre_hooks and not layer._backward_hooks
    nn.functional.cross_entropy(model(x), y).backward()  # plain training works, and leaves no per-sample gradients
    assert all(not hasattr(p, "grad_sample") for p in model.parameters())
    copy.deepcopy(model).load_state_dict(model.state_dict())


def test_a_batchnorm_model_is_refused_by_name_before_any_training():
    model = nn.Sequential(nn.Linear(FEATURES, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, CLASSES))
    before = copy.deepcopy(model.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    with pytest.raises(ValueError, match=r"1 \(BatchNorm1d\).*depend on its peers"):
        with privacy.sample_dp(model, optimizer, 1.0, 1.0, BATCH):
            pytest.fail("the context must not be entered")
    with pytest.raises(ValueError, match=r"1 \(BatchNorm1d\)"):
        privacy.check_sample_dp(model)
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())
    assert all(not hasattr(p, "grad_sample") for p in model.parameters())


@opacus_hooks
@pytest.mark.parametrize("name", ["cnn", "tiny"])
def test_the_project_models_train_with_sample_dp(name):
    model = models.build(name, DataShape("fashion-mnist", (1, 28, 28), 10), seed=0)
    privacy.check_sample_dp(model)
    start = flat(model)
    generator = seeded()
    x, y = torch.randn(4, 1, 28, 28, generator=generator), torch.randint(0, 10, (4,), generator=generator)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with privacy.sample_dp(model, optimizer, 1.0, 1.0, 4, generator) as (module, dp_optimizer):
        nn.functional.cross_entropy(module(x), y).backward()
        dp_optimizer.step()
        dp_optimizer.zero_grad()
    assert not torch.equal(flat(model), start)
    assert model(x).shape == (4, 10)
