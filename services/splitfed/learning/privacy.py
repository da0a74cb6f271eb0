"""Differential privacy for federated averaging: the maths only, no I/O and no messaging.

Three places a round's privacy can come from, each a Gaussian mechanism on clipped changes:

- central DP (DP-FedAvg, McMahan et al. 2018): every worker clips its model change to L2 norm
  `clip`, the server adds N(0, (z * clip)^2) to their sum and divides by the number of workers
  (`clip_l2`, `noised_mean`); the clip may follow a quantile of the update norms (adaptive
  clipping, Andrew et al. 2021: `next_clip`, `effective_noise_multiplier`, `default_count_stddev`);
- local DP: every worker adds that noise to its own clipped change (`local_noise`);
- sample-level DP: DP-SGD (Abadi et al. 2016) in a worker's local training, through Opacus
  (`sample_dp`, `check_sample_dp`).

`epsilon` turns a noise multiplier, a sampling rate and a number of steps into the epsilon spent,
with dp-accounting's RDP accountant (Mironov 2017). Noise is drawn from a torch.Generator: a given
one for tests and reproducible runs, otherwise a fresh one seeded from the operating system.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import secrets
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from splitfed.learning.models import device_of


def clip_l2(delta: torch.Tensor, clip: float) -> tuple[torch.Tensor, bool]:
    """(P,) float32 model change -> (the change scaled down to L2 norm <= clip, whether its norm was
    <= clip already). A change within the clip is returned as it is (the same tensor, not a copy)."""
    if clip <= 0:
        raise ValueError(f"the clip must be positive, got {clip}")
    # The norm in float64: over millions of parameters float32 accumulation drifts, and the
    # sensitivity every guarantee rests on is this comparison.
    norm = torch.linalg.vector_norm(delta, dtype=torch.float64).item()
    if norm <= clip:
        return delta, True
    return (delta.double() * (clip / norm)).to(delta.dtype), False


def gaussian_noise(shape: tuple[int, ...], stddev: float, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """float32 N(0, stddev^2) of `shape`, drawn on the generator's device and moved to `device` when given.

    Without a generator, a fresh one seeded from the operating system's randomness: never a fixed
    seed nor torch's global generator (which --seed makes predictable), since noise that someone
    could regenerate and subtract protects nothing."""
    if stddev < 0:
        raise ValueError(f"the noise's standard deviation must be >= 0, got {stddev}")
    if generator is None:
        generator = _os_seeded_generator(device)
    noise = torch.normal(0.0, stddev, size=tuple(shape), generator=generator, device=generator.device, dtype=torch.float32)
    return noise if device is None else noise.to(device)


def noised_mean(total: torch.Tensor, contributors: int, clip: float, noise_multiplier: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Central DP (DP-FedAvg, McMahan et al. 2018, every worker weighing the same):
    (total + N(0, (z * clip)^2 I)) / contributors, `total` being the (P,) sum of `contributors`
    clipped changes. Returns float32 (P,), computed in float64.

    Equal weights keep the sum's sensitivity at `clip`: weighing workers by their sample counts
    would let one worker move the mean by more than clip / contributors."""
    if contributors < 1:
        raise ValueError(f"a noised mean needs at least one contributor, got {contributors}")
    noise = gaussian_noise(total.shape, noise_multiplier * clip, generator, device=total.device)
    return ((total.double() + noise.double()) / contributors).float()


def local_noise(delta: torch.Tensor, clip: float, noise_multiplier: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Local DP: the change clipped to `clip` plus N(0, (z * clip)^2 I), added by the worker itself
    before the change leaves it, so that the server and the transport need not be trusted."""
    clipped, _ = clip_l2(delta, clip)
    return clipped + gaussian_noise(clipped.shape, noise_multiplier * clip, generator, device=clipped.device)


def effective_noise_multiplier(noise_multiplier: float, count_stddev: float) -> float:
    """The noise multiplier the update sum must get under adaptive clipping (Andrew et al. 2021,
    "Differentially Private Learning with Adaptive Clipping", Theorem 1) so that, composed with the
    count of unclipped updates noised with stddev `count_stddev`, the pair has the privacy of one
    Gaussian mechanism with `noise_multiplier` z: (z^-2 - (2 sigma_b)^-2)^(-1/2).

    The count's sensitivity is 1/2 per worker, as in the paper: each worker contributes b - 1/2
    with b in {0, 1}, which is the same count once n/2 is added back."""
    if noise_multiplier < 0 or count_stddev < 0:
        raise ValueError(f"noise multipliers and standard deviations are >= 0, got {noise_multiplier} and {count_stddev}")
    if noise_multiplier == 0:
        return 0.0
    if 2 * count_stddev <= noise_multiplier:
        raise ValueError(f"the clipped-count noise stddev {count_stddev} is too small for noise multiplier {noise_multiplier}: "
                         f"it must exceed z / 2 = {noise_multiplier / 2}, or the count alone would spend the whole privacy budget "
                         "(raise the count noise, or lower the noise multiplier)")
    return (noise_multiplier ** -2 - (2 * count_stddev) ** -2) ** -0.5


def next_clip(clip: float, unclipped: float, contributors: int, target_quantile: float, clip_lr: float, count_stddev: float,
              generator: torch.Generator | None = None) -> float:
    """Andrew et al.'s (2021) geometric clip update towards the `target_quantile` of the update norms:
    b = (unclipped + N(0, count_stddev^2)) / contributors, then clip * exp(-clip_lr * (b - target_quantile)).

    A clip that more than the target fraction of updates fit under shrinks, one that fewer fit
    under grows. `unclipped`: how many of the round's updates had norm <= clip (the server gets it
    as a sum, possibly through secure aggregation, so the noise is added here, once)."""
    if contributors < 1:
        raise ValueError(f"a clip update needs at least one contributor, got {contributors}")
    noise = gaussian_noise((), count_stddev, generator).item()
    fraction_unclipped = (unclipped + noise) / contributors
    return clip * math.exp(-clip_lr * (fraction_unclipped - target_quantile))


def default_count_stddev(contributors: int) -> float:
    """contributors / 20, Andrew et al.'s (2021) recommendation for the unclipped count's noise."""
    return contributors / 20


def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Epsilon at `delta` after `steps` compositions of the Poisson-subsampled (rate q) Gaussian
    mechanism with noise multiplier z, by dp-accounting's RDP accountant (add/remove-one
    neighbouring). q == 1: no subsampling. steps == 0: 0.0; z == 0 with steps > 0: inf.

    Central DP: q = workers per round / registered workers, one step per round; local DP: q = 1,
    one step per round; sample-level DP: q = batch size / the worker's samples, one step per batch.
    Workers and batches are drawn as fixed-size samples, not Poisson ones: accounting them as
    Poisson sampling at the same rate is the usual approximation."""
    if not 0 < sample_rate <= 1:
        raise ValueError(f"the sampling rate must be in (0, 1], got {sample_rate}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if steps == 0:
        return 0.0  # nothing released yet (dp-accounting refuses to compose zero events)
    from dp_accounting import dp_event, rdp  # imported here: over a second, and most processes never account

    # The accountant warns through absl for every RDP order whose series does not converge and which
    # it then leaves out (the epsilon stays an upper bound): noise in a worker's log every round.
    logging.getLogger("absl").setLevel(logging.ERROR)
    event = dp_event.GaussianDpEvent(noise_multiplier)
    if sample_rate < 1:
        event = dp_event.PoissonSampledDpEvent(sample_rate, event)
    accountant = rdp.RdpAccountant()
    accountant.compose(event, steps)
    return accountant.get_epsilon(delta)


def epsilon_of_rounds(noise_multiplier: float, rates: list[float], delta: float) -> float:
    """`epsilon` after one Gaussian mechanism per entry of `rates`, each Poisson-subsampled at its
    rate (1: not subsampled): rounds whose worker pool shrank sample at a higher rate."""
    if not rates:
        return 0.0
    from dp_accounting import dp_event, rdp

    logging.getLogger("absl").setLevel(logging.ERROR)  # see epsilon
    accountant = rdp.RdpAccountant()
    for rate, count in collections.Counter(rates).items():
        event = dp_event.GaussianDpEvent(noise_multiplier)
        accountant.compose(event if rate >= 1 else dp_event.PoissonSampledDpEvent(rate, event), count)
    return accountant.get_epsilon(delta)


@contextlib.contextmanager
def sample_dp(model: nn.Module, optimizer: torch.optim.Optimizer, clip: float, noise_multiplier: float, batch_size: int,
              generator: torch.Generator | None = None) -> Iterator[tuple[nn.Module, torch.optim.Optimizer]]:
    """DP-SGD (Abadi et al. 2016) for one round of a worker's local training, through Opacus.

    Yields (module, optimizer) to train with: every sample's gradient is clipped to L2 norm `clip`,
    the batch's sum gets N(0, (z * clip)^2) and is divided by `batch_size` (Opacus's
    GradSampleModule and DPOptimizer with expected_batch_size=batch_size, for a mean loss). The
    training loop stays as it is: forward on the yielded module, loss.backward(), optimizer.step(),
    optimizer.zero_grad(). Batches are fixed-size shuffles rather than the Poisson samples that
    `epsilon` assumes (the usual approximation); a last, smaller batch is still divided by
    `batch_size`, as a Poisson batch would be. A given generator must be on the model's device.

    On exit `model` is a plain nn.Module again (hooks and per-sample attributes removed, the same
    state_dict keys), ready to be sent and loaded as usual. A model Opacus cannot train per sample
    raises a ValueError naming its layers before any training (`check_sample_dp`)."""
    check_sample_dp(model)
    if generator is None:
        # Opacus would otherwise draw from torch's global generator, which --seed makes predictable.
        generator = _os_seeded_generator(device_of(model))
    # Opacus's hooks fire on the first layer, whose input (the data) needs no gradient: torch says
    # so once per process, about nothing that is wrong here.
    warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with respect to module outputs", category=UserWarning)
    from opacus import GradSampleModule  # imported here, as in check_sample_dp: only --dp sample needs Opacus
    from opacus.optimizers import DPOptimizer

    module = GradSampleModule(model)
    try:
        yield module, DPOptimizer(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=clip,
                                  expected_batch_size=batch_size, generator=generator)
    finally:
        module.to_standard_module()  # removes the hooks and the grad_sample attributes GradSampleModule added
        for parameter in model.parameters():
            if hasattr(parameter, "summed_grad"):  # DPOptimizer's, which GradSampleModule does not know of
                del parameter.summed_grad


def check_sample_dp(model: nn.Module) -> None:
    """The refusal `sample_dp` makes, without training: a ValueError naming every layer Opacus
    cannot train per sample and why, so that a worker started with --dp sample fails at once."""
    refused = _per_sample_refusals(model)
    if refused:
        reasons = " ".join(f"Layers {', '.join(layers)}: {why}" for why, layers in refused.items())
        raise ValueError(f"--dp sample cannot train this model. {reasons} Choose a model without these layers "
                         "(GroupNorm, LayerNorm or InstanceNorm instead of BatchNorm) or --dp central or local.")


def _per_sample_refusals(model: nn.Module) -> dict[str, list[str]]:
    """Why Opacus refuses layers -> the layers it refuses for that reason ("name (type)"), grouped
    because a ResNet has a BatchNorm in every block.

    The reasons are Opacus's own: the validators it registers per layer type (BatchNorm mixes the
    samples of a batch, so no gradient belongs to one sample) and GradSampleModule's rule that a
    trainable layer keeps no buffers (they would be computed from the data outside any noise)."""
    refused: dict[str, list[str]] = {}
    from opacus.utils.module_utils import trainable_modules  # imported here: most processes never train per sample
    from opacus.validators import ModuleValidator

    for name, layer in trainable_modules(model):
        validator = ModuleValidator.VALIDATORS.get(type(layer))
        errors = validator(layer) if validator else []
        if errors:
            why = " ".join(_gist(str(error)) for error in errors)
        elif list(layer.buffers()):
            why = "a trainable layer with buffers, which would be computed from the data without noise."
        else:
            continue
        refused.setdefault(why, []).append(f"{name} ({type(layer).__name__})")
    return refused


def _gist(message: str) -> str:
    """The first two sentences of an Opacus validator's message: what it refuses and why (the rest
    is about Opacus's plans, a paragraph too long to repeat in a refusal)."""
    return ". ".join(message.split(". ")[:2]).rstrip(".") + "."


def _os_seeded_generator(device) -> torch.Generator:
    """A torch.Generator on `device` seeded from the operating system's randomness."""
    generator = torch.Generator(device=device if device is not None else "cpu")
    generator.manual_seed(secrets.randbits(63))
    return generator
