"""What a split client may do to what leaves it, so that the server learns less of its inputs and
labels: pure torch, shared by the split client and the one-process reference (learning.clients).

- NoPeek (Vepakomma et al. 2020): the client adds `weight * dCor(inputs, activations)` to its
  loss, so that its layers learn activations that say less of its inputs.
- Activation clipping and noise: each sample's activation clipped to norm C, then Gaussian noise
  of standard deviation `noise * C` added, on every activation that leaves the client (training
  and evaluation alike: the server sees both).
- Gradient defences (u-shaped): the gradient the client returns for the server's outputs is
  perturbed. max-norm (Li et al. 2022): sample j gets noise N(0, s_j^2 I) with
  s_j^2 = (max_i ||g_i||^2 - ||g_j||^2) / d, so that every sample's expected squared norm is the
  batch's largest and the norm no longer tells the classes apart; noise: N(0, s^2 I) with
  s = strength * max_i ||g_i|| / sqrt(d) for every sample.
- Label DP (vanilla): each training sample's label leaves the client once, through randomised
  response, when the sample is first trained on, and is reused after that, so the server's view
  of a label is EPSILON-label-DP however many epochs run. Plain K-ary by default; with the
  model's prior (Ghazi et al. 2021, RR-with-prior, in two stages) the first half of the labels go
  out plainly, then each response is drawn among the k classes the current model ranks highest
  for the sample, k chosen to maximise the chance of the true label. The prior leans the labels
  sent towards the model's own guesses, and the model then trains on them: at high EPSILON more
  labels go out true than plainly, at EPSILON 1 on Fashion-MNIST the model ended at chance (one
  epoch, 0.10 against 0.74 plainly; without the first stage, from the untrained model's guesses).

Every random draw comes from a generator seeded by the run's seed and the client's index, so a
run and its reference draw the same noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from splitfed.learning.settings import SplitSettings

# Per client, one stream per defence: each draws the same numbers whichever others are on.
PLAIN_SHARE = 0.5  # label DP with the model's prior: the share of a client's labels released by plain randomised response first
STREAMS = {"activations": 1, "gradients": 2, "labels": 3, "evaluation": 4}


def generator(seed: int, index: int, stream: str, epoch: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed((seed + 7919 * index + 104729 * STREAMS[stream] + 1299709 * epoch) % 2**63)


def gaussian(shape: torch.Size, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """Standard normal draws, made on the CPU (the same numbers on any device), moved to `like`'s device."""
    return torch.randn(shape, generator=generator).to(like.device, like.dtype)


def per_sample_norms(batch: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B,) the L2 norm of each sample."""
    return batch.flatten(1).norm(dim=1)


def distance_correlation(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """The sample distance correlation (Szekely et al. 2007) between the rows of x (B, ...) and z
    (B, ...), differentiable: dCor = sqrt(dCov^2(x, z) / sqrt(dVar^2(x) dVar^2(z))), with
    dCov^2 the mean product of the double-centred distance matrices."""

    def centred(samples: torch.Tensor) -> torch.Tensor:
        flat = samples.flatten(1).float()
        # No matrix-product shortcut: exact zeros on the diagonal, whose gradient cdist takes as 0.
        distances = torch.cdist(flat, flat, compute_mode="donot_use_mm_for_euclid_dist")
        return distances - distances.mean(0, keepdim=True) - distances.mean(1, keepdim=True) + distances.mean()

    a, b = centred(x), centred(z)
    covariance, x_variance, z_variance = (a * b).mean(), (a * a).mean(), (b * b).mean()
    denominator = torch.sqrt(x_variance * z_variance)
    if denominator <= 0:  # a constant batch: nothing to correlate
        return covariance * 0
    return torch.sqrt(torch.clamp(covariance / denominator, min=1e-12))


def clip_activations(activations: torch.Tensor, clip: float) -> torch.Tensor:
    """Each sample scaled down to norm `clip` where it is longer (differentiable)."""
    norms = per_sample_norms(activations).clamp(min=1e-12)
    scale = torch.clamp(clip / norms, max=1.0)
    return activations * scale.view(-1, *[1] * (activations.dim() - 1))


def max_norm_noise(gradients: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Li et al.'s max-norm: each sample's gradient plus noise that brings its expected squared
    norm to the batch's largest."""
    dims = gradients[0].numel()
    squared = per_sample_norms(gradients) ** 2
    std = torch.sqrt(torch.clamp(squared.max() - squared, min=0.0) / dims)
    return gradients + gaussian(gradients.shape, generator, gradients) * std.view(-1, *[1] * (gradients.dim() - 1))


def gaussian_noise(gradients: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Every sample's gradient plus N(0, s^2 I), s = strength * the batch's largest norm / sqrt(d)."""
    std = strength * per_sample_norms(gradients).max() / math.sqrt(gradients[0].numel())
    return gradients + gaussian(gradients.shape, generator, gradients) * std


def randomised_response(labels: torch.Tensor, prior: torch.Tensor, epsilon: float, uniforms: torch.Tensor) -> torch.Tensor:
    """RR-with-prior (Ghazi et al. 2021, their algorithm 2), EPSILON-label-DP per sample.

    labels (B,) int64; prior (B, K) probabilities that do not depend on these labels (uniform:
    plain K-ary randomised response); uniforms (B, 2) in [0, 1), the sample's two draws. The
    response set Y is the k classes the prior ranks highest, k maximising
    e^eps / (e^eps + k - 1) * prior(Y); a label in Y is kept with probability e^eps / (e^eps + k - 1),
    else one of Y's other k - 1 classes is drawn; a label outside Y gives a draw from Y."""
    classes = prior.shape[1]
    order = torch.argsort(prior, dim=1, descending=True, stable=True)  # (B, K) classes by prior
    sizes = torch.arange(1, classes + 1, dtype=torch.float64)
    keep = math.exp(epsilon) / (math.exp(epsilon) + sizes - 1)  # (K,) for each k
    k = torch.argmax(keep * torch.cumsum(torch.gather(prior.double(), 1, order), dim=1), dim=1) + 1  # (B,)
    rank = torch.argmax((order == labels.view(-1, 1)).int(), dim=1)  # where the true label stands in the order
    inside = rank < k
    kept = inside & (uniforms[:, 0].double() < keep[k - 1])
    # Outside Y: any of Y's k members; inside and not kept: one of the k - 1 others (skip the label's own rank).
    choices = torch.where(inside, k - 1, k).clamp(min=1)
    pick = torch.clamp((uniforms[:, 1].double() * choices).long(), max=choices - 1)
    pick = torch.where(inside & (pick >= rank), pick + 1, pick)
    drawn = torch.gather(order, 1, pick.view(-1, 1)).view(-1)
    return torch.where(kept, labels, drawn)


@dataclass
class LabelRelease:
    """The labels a client has released so far (-1: not yet), and each sample's two draws."""

    released: torch.Tensor  # (N,) int64
    uniforms: torch.Tensor  # (N, 2)


class Defences:
    """One split client's defences, as its settings ask; `index` seeds its streams."""

    def __init__(self, settings: SplitSettings, index: int, samples: int, classes: int):
        self.settings = settings
        self.index = index
        self.classes = classes
        self.activation_stream = generator(settings.seed, index, "activations")
        self.gradient_stream = generator(settings.seed, index, "gradients")
        self.labels: LabelRelease | None = None
        if settings.label_dp is not None:
            draws = torch.rand((samples, 2), generator=generator(settings.seed, index, "labels"), dtype=torch.float64)
            self.labels = LabelRelease(torch.full((samples,), -1, dtype=torch.int64), draws)

    def penalty(self, inputs: torch.Tensor, activations: torch.Tensor) -> torch.Tensor | None:
        """NoPeek's term of the client's loss, or None without it."""
        if not self.settings.nopeek_weight:
            return None
        return self.settings.nopeek_weight * distance_correlation(inputs, activations)

    def outgoing(self, activations: torch.Tensor, stream: torch.Generator | None = None) -> torch.Tensor:
        """The activations as they leave the client: clipped and noised where asked (differentiable
        through the clipping). `stream`: the evaluation's draws (default: training's)."""
        clip = self.settings.activation_clip
        if clip is None:
            return activations
        clipped = clip_activations(activations, clip)
        if not self.settings.activation_noise:
            return clipped
        noise = gaussian(activations.shape, stream or self.activation_stream, activations)
        return clipped + self.settings.activation_noise * clip * noise.detach()

    def evaluation_stream(self, epoch: int) -> torch.Generator:
        return generator(self.settings.seed, self.index, "evaluation", epoch)

    def returned(self, gradients: torch.Tensor) -> torch.Tensor:
        """The gradient the client returns for the server's outputs (u-shaped), perturbed where asked."""
        kind = self.settings.gradient_defence
        if kind == "max-norm":
            return max_norm_noise(gradients, self.gradient_stream)
        if kind == "noise":
            return gaussian_noise(gradients, self.settings.gradient_noise, self.gradient_stream)
        return gradients

    def needs_prior(self, indices: torch.Tensor) -> bool:
        """Whether some of these samples' labels are still to be released, with the model's prior
        (once the first PLAIN_SHARE of the labels are out)."""
        if self.labels is None or self.settings.label_dp_prior != "model":
            return False
        released = self.labels.released
        return int((released >= 0).sum()) >= PLAIN_SHARE * len(released) and bool((released[indices.cpu()] < 0).any())

    def release(self, indices: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        """The labels of the samples at `indices` as the server gets them: each released once (with
        the prior softmax(logits) where given, else uniform) and the same ever after."""
        if self.labels is None:
            return labels
        at = indices.cpu()
        new = self.labels.released[at] < 0
        if new.any():
            prior = torch.softmax(logits.detach().float().cpu(), dim=1)[new] if logits is not None else torch.full((int(new.sum()), self.classes), 1 / self.classes)
            self.labels.released[at[new]] = randomised_response(labels.cpu()[new], prior, self.settings.label_dp, self.labels.uniforms[at[new]])
        return self.labels.released[at].to(labels.device)

    def label_counts(self, labels: torch.Tensor) -> dict[str, int] | None:
        """How many labels were released and how many of them are true: the client's own record,
        never sent (what `splitfed attack labels` scores a vanilla run's server by)."""
        if self.labels is None:
            return None
        released = self.labels.released >= 0
        return {"released": int(released.sum()), "true": int((self.labels.released[released] == labels.cpu()[released]).sum())}
