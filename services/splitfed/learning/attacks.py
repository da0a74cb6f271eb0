"""What a split server can learn from what it sees, measured on a finished split run: pure torch,
behind `splitfed attack` (attack_cli.py), so that a defence (learning.defences) is judged by
what it hides rather than by what it costs.

- Model inversion (He et al. 2019, black-box with query access): the server trains a decoder
  from cut activations back to inputs on public data of the same kind, passed through the
  client's layers and its activation defence (with noise of the attacker's own draws: it cannot
  know the client's), then decodes the victim's activations. Scored by MSE in normalised units
  and, for images, SSIM on 0..1 pixels, beside an attacker that learned nothing (every
  reconstruction the mean public input).
- Label inference (u-shaped, Li et al. 2022): from the gradients the client returns for the
  server's outputs. The norm attack scores a sample by its gradient's norm (two classes: the
  rarer class's gradients are longer); the cosine attack knows a few labelled samples per class
  and predicts the class whose mean unit gradient points most nearly the same way.
- Vanilla runs send the labels themselves: the server's guess is the label it got, right as
  often as label DP leaves it true.

Every random draw (the decoder's initialisation and batch order, the defences' noise) comes
from the attacker's seed, so an attack gives the same figures twice.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from splitfed.learning import clients, cutting, data, models
from splitfed.learning.context import Context
from splitfed.learning.cutting import Parts
from splitfed.learning.defences import Defences, per_sample_norms
from splitfed.learning.settings import DATASETS, SplitNNSettings, SplitSettings
from splitfed.learning.tasks import Task

DEFENCE_FIELDS = ("nopeek_weight", "activation_clip", "activation_noise", "gradient_defence", "gradient_noise", "label_dp", "label_dp_prior")
PIXEL_SCALE = 255.0  # 8-bit pixels
DIGITS_SCALE = 16.0  # scikit-learn's digits: 0..16 as published (learning.data keeps them so)
LARGEST_SSIM_WINDOW = 11  # SSIM's usual Gaussian window (sigma 1.5); smaller images get the largest odd one that fits


# -- the run, rebuilt ---------------------------------------------------------------------------


@dataclass
class Victim:
    """A finished split run's client and server, rebuilt from its settings and saved model."""

    settings: SplitNNSettings  # the run's, as its one client had them
    task: Task
    context: Context  # the client's
    parts: Parts  # in eval mode
    classes: int

    def defences(self, seed: int, samples: int) -> Defences:
        """The client's defences as the run configured them, drawing from `seed` rather than the run's."""
        return Defences(dataclasses.replace(self.settings, seed=seed), 0, samples, self.classes)


def client_of(settings: SplitSettings) -> tuple[SplitNNSettings, Task, Context]:
    """A split run's one client: its settings as the split roles ran them, its task, its context."""
    one_client = SplitNNSettings(**dataclasses.asdict(settings))
    return one_client, Task(one_client), clients.client_context(one_client, 0)


def rebuild(settings: SplitSettings, state: dict[str, torch.Tensor]) -> Victim:
    """The run's model from `state` (the merged halves, keys as an `nn.Sequential`'s), cut as the
    run cut it. ValueError where the state is not this model's."""
    one_client, task, context = client_of(settings)
    whole = task.sequential(context)
    try:
        whole.load_state_dict(state)
    except RuntimeError as exc:
        first = next((line.strip() for line in str(exc).splitlines()[1:] if line.strip()), str(exc))
        raise ValueError(f"the model file does not hold this run's model ({first[:200]})") from None
    whole.eval()
    return Victim(one_client, task, context, cutting.cut(whole, settings.cut_layer, settings.mode), len(task.classes(context)))


def public_data(victim: Victim) -> data.Samples:
    """The attacker's public data: the run's training set as published, without the run's --limit
    (the server is not bound by how much the client trained on)."""
    return Task(dataclasses.replace(victim.settings, limit=None)).data(victim.context, train=True)


def observed(head: nn.Module, samples: data.Samples, count: int, send: Callable[[torch.Tensor], torch.Tensor],
             batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `count` samples' inputs (count, *input) and their cut activations as they leave
    the client, through `send` (count, *cut)."""
    inputs, sent = [], []
    with models.evaluating(head):
        for start in range(0, count, batch_size):
            images, _ = samples.batch(slice(start, min(start + batch_size, count)))
            inputs.append(images)
            sent.append(send(head(images)))
    return torch.cat(inputs), torch.cat(sent)


# -- model inversion ----------------------------------------------------------------------------


def pixel_view(samples: data.Samples, dataset: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """How normalised inputs become 0..1 pixels (clamped), or None where the samples are not
    images of known pixel range: features, or a task's own tensors, whose normalisation is its own."""
    images = samples.images
    if not isinstance(images, data.Images) or images.raw.dim() != 4:
        return None
    info = DATASETS.get(dataset)
    scale = DIGITS_SCALE if info is not None and info.reader == "digits" else PIXEL_SCALE

    def pixels(normalised: torch.Tensor) -> torch.Tensor:
        offset, divisor = (torch.as_tensor(value, dtype=normalised.dtype, device=normalised.device) for value in (images.offset, images.divisor))
        return ((normalised * divisor + offset) / scale).clamp(0.0, 1.0)

    return pixels


def ssim_window(height: int, width: int) -> int:
    """The largest odd window, at most 11, that fits an image of this size."""
    side = min(height, width, LARGEST_SSIM_WINDOW)
    return side if side % 2 else side - 1


def ssim(originals: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) 0..1 pixels, twice -> (N,) each pair's SSIM (Wang et al. 2004: Gaussian window,
    sigma 1.5, K = 0.01, 0.03), its channels averaged."""
    from pytorch_msssim import ssim as pair_ssim

    window = ssim_window(*originals.shape[-2:])
    return pair_ssim(originals.double(), reconstructions.double(), data_range=1.0, size_average=False, win_size=window).float()


class Decoder(nn.Module):
    """Cut activation, of any shape, to input, of any shape: the activation centred and scaled by
    the public set's statistics, then a two-hidden-layer MLP (generic: it needs no image structure).
    One scale for all units, not one each: a unit all but constant on the public set (a ReLU that
    rarely fires) would otherwise blow a victim's activation up wherever it fires."""

    def __init__(self, activations: torch.Tensor, input_shape: tuple[int, ...], hidden: int = 512):
        super().__init__()
        flat = activations.flatten(1)
        self.register_buffer("mean", flat.mean(0))
        self.register_buffer("std", (flat - flat.mean(0)).pow(2).mean().sqrt().clamp(min=1e-6))
        self.input_shape = input_shape
        self.layers = nn.Sequential(nn.Linear(flat.shape[1], hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                    nn.Linear(hidden, math.prod(input_shape)))

    def forward(self, activations: torch.Tensor) -> torch.Tensor:
        return self.layers((activations.flatten(1) - self.mean) / self.std).view(-1, *self.input_shape)


def train_decoder(activations: torch.Tensor, inputs: torch.Tensor, epochs: int, seed: int, batch_size: int = 128, lr: float = 1e-3) -> Decoder:
    """A decoder fitted to map `activations` (N, *cut) to `inputs` (N, *input) by MSE, Adam,
    `epochs` passes in seeded order; the global random state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        decoder = Decoder(activations, tuple(inputs.shape[1:])).to(activations.device)
    optimiser = torch.optim.Adam(decoder.parameters(), lr=lr)
    order = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for batch in data.batch_order(len(inputs), batch_size, order):
            batch = batch.to(activations.device)
            optimiser.zero_grad(set_to_none=True)
            nn.functional.mse_loss(decoder(activations[batch]), inputs[batch]).backward()
            optimiser.step()
    return decoder.eval()


@dataclass(frozen=True)
class Quality:
    """How close reconstructions come: MSE in normalised units, SSIM on 0..1 pixels (None: not images)."""

    mse: float
    ssim: float | None


@dataclass
class Inversion:
    decoder: Quality
    baseline: Quality  # every reconstruction the mean public input: what no leak looks like
    public_samples: int
    victims: int
    epochs: int
    originals: torch.Tensor  # (victims, *input) normalised, for the grid
    reconstructions: torch.Tensor
    pixels: Callable[[torch.Tensor], torch.Tensor] | None  # normalised -> 0..1 pixels, where the inputs are images

    def as_dict(self) -> dict[str, Any]:
        return {"public_samples": self.public_samples, "victims": self.victims, "epochs": self.epochs,
                "decoder": dataclasses.asdict(self.decoder), "baseline": dataclasses.asdict(self.baseline)}


def quality(originals: torch.Tensor, reconstructions: torch.Tensor, pixels: Callable[[torch.Tensor], torch.Tensor] | None) -> Quality:
    mse = float(nn.functional.mse_loss(reconstructions, originals))
    return Quality(mse, None if pixels is None else float(ssim(pixels(originals), pixels(reconstructions)).mean()))


def invert(victim: Victim, public: data.Samples, victims: data.Samples, public_count: int, victim_count: int, epochs: int, seed: int) -> Inversion:
    """He et al.'s black-box inversion of the run's head: a decoder trained on the first
    `public_count` of `public` through the head and the activation defence (the attacker's
    draws), scored on the first `victim_count` of `victims` as the server would receive them
    in an evaluation (the client's draws: another stream of the same seed)."""
    public_count, victim_count = min(public_count, len(public)), min(victim_count, len(victims))
    defences = victim.defences(seed, len(public))
    batch = victim.settings.eval_batch_size
    public_inputs, public_sent = observed(victim.parts.head, public, public_count, defences.outgoing, batch)
    evaluation = defences.evaluation_stream(0)
    originals, victim_sent = observed(victim.parts.head, victims, victim_count, lambda a: defences.outgoing(a, evaluation), batch)
    decoder = train_decoder(public_sent, public_inputs, epochs, seed)
    with torch.no_grad():
        reconstructions = decoder(victim_sent)
    pixels = pixel_view(victims, victim.settings.dataset)
    mean_input = public_inputs.mean(0, keepdim=True).expand_as(originals)
    return Inversion(quality(originals, reconstructions, pixels), quality(originals, mean_input, pixels), public_count, victim_count, epochs,
                     originals, reconstructions, pixels)


def grid_image(originals: torch.Tensor, reconstructions: torch.Tensor, count: int = 16, min_side: int = 64, gap: int = 2) -> Any:
    """A PIL image: the first `count` originals (top row) above their reconstructions (bottom
    row), (N, C, H, W) 0..1 pixels, each upscaled (nearest) to at least `min_side` pixels high.
    Three channels are drawn in colour, any other number as the first channel in grey."""
    from PIL import Image

    pairs = min(count, len(originals))
    height, width = originals.shape[-2:]
    scale = max(1, math.ceil(min_side / height))
    colour = originals.shape[1] == 3
    cell_h, cell_w = height * scale, width * scale
    canvas = np.full((2 * cell_h + 3 * gap, pairs * (cell_w + gap) + gap, *((3,) if colour else ())), 255, dtype=np.uint8)
    for row, images in enumerate((originals, reconstructions)):
        for column in range(pairs):
            pixels = images[column] if colour else images[column, :1]
            tile = (pixels.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
            tile = tile.repeat(scale, axis=0).repeat(scale, axis=1)
            top, left = gap + row * (cell_h + gap), gap + column * (cell_w + gap)
            canvas[top:top + cell_h, left:left + cell_w] = tile if colour else tile[:, :, 0]
    return Image.fromarray(canvas, "RGB" if colour else "L")


# -- label inference ----------------------------------------------------------------------------


def returned_gradients(victim: Victim, samples: data.Samples, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What a u-shaped client returns for the server's outputs on its first `count` training
    samples, in batches of the run's size: d (the batch's mean loss) / d (the server's outputs),
    through the client's defences (drawn from `seed`), flattened (count, D); and their labels (count,)."""
    if victim.parts.tail is None:
        raise ValueError("a vanilla run's client returns no gradients: the server computes the loss and gets the labels")
    count = min(count, len(samples))
    defences = victim.defences(seed, len(samples))
    loss_of = victim.task.loss(victim.context)
    gradients, labels = [], []
    for start in range(0, count, victim.settings.batch_size):
        images, batch_labels = samples.batch(slice(start, min(start + victim.settings.batch_size, count)))
        with torch.no_grad():
            outputs = victim.parts.body(defences.outgoing(victim.parts.head(images)))
        outputs.requires_grad_(True)
        (gradient,) = torch.autograd.grad(loss_of(victim.parts.tail(outputs), batch_labels), outputs)
        gradients.append(defences.returned(gradient).flatten(1))
        labels.append(batch_labels)
    return torch.cat(gradients), torch.cat(labels)


def oriented_auc(scores: torch.Tensor, positives: torch.Tensor) -> float:
    """The ROC AUC of `scores` for telling `positives` (bool) apart, whichever way round they
    separate them: max(AUC, 1 - AUC); 0.5 is chance."""
    from sklearn.metrics import roc_auc_score

    if positives.all() or not positives.any():
        raise ValueError("the scored samples hold one class only: an AUC needs both (give more --samples)")
    auc = float(roc_auc_score(positives.cpu().numpy(), scores.detach().double().cpu().numpy()))
    return max(auc, 1.0 - auc)


def known_samples(labels: torch.Tensor, per_class: int, classes: int) -> torch.Tensor:
    """(N,) bool: the first `per_class` samples of each class, whose labels the attacker knows."""
    known = torch.zeros(len(labels), dtype=torch.bool)
    for label in range(classes):
        known[torch.nonzero(labels.cpu() == label).flatten()[:per_class]] = True
    return known


def cosine_similarities(gradients: torch.Tensor, labels: torch.Tensor, known: torch.Tensor, classes: int) -> torch.Tensor:
    """(N, classes): each gradient's cosine with each class's reference direction, the mean unit
    gradient of that class's known samples (-inf for a class with none known)."""
    units = nn.functional.normalize(gradients.double(), dim=1)
    similarities = torch.full((len(gradients), classes), -math.inf, dtype=torch.float64)
    for label in range(classes):
        members = known & (labels.cpu() == label)
        if members.any():
            reference = nn.functional.normalize(units[members.to(units.device)].mean(0), dim=0)
            similarities[:, label] = (units @ reference).cpu()
    return similarities


@dataclass(frozen=True)
class LabelGuess:
    """One label attack's score: `auc` for two classes (norm and cosine), `accuracy` where it
    names a class (cosine, received), `chance` the largest class's share of the scored samples."""

    method: str  # norm | cosine | received
    samples: int  # scored
    auc: float | None = None
    accuracy: float | None = None
    chance: float | None = None


def largest_share(labels: torch.Tensor) -> float:
    return float(torch.bincount(labels.cpu()).max()) / len(labels)


def infer_labels(gradients: torch.Tensor, labels: torch.Tensor, classes: int, known_per_class: int) -> list[LabelGuess]:
    """The norm attack (two classes) and the cosine attack on returned `gradients` (N, D) of
    samples labelled `labels` (N,); the known samples are not scored by the cosine attack."""
    known = known_samples(labels, known_per_class, classes)
    scored = ~known
    if not scored.any():
        raise ValueError(f"--known {known_per_class} leaves no sample to score: give more --samples")
    similarities = cosine_similarities(gradients, labels, known, classes)[scored]
    truth = labels.cpu()[scored]
    accuracy = float((similarities.argmax(1) == truth).double().mean())
    if classes != 2:
        return [LabelGuess("cosine", int(scored.sum()), accuracy=accuracy, chance=largest_share(truth))]
    positives = labels.cpu() == 1
    return [
        LabelGuess("norm", len(labels), auc=oriented_auc(per_sample_norms(gradients).cpu(), positives), chance=largest_share(labels)),
        LabelGuess("cosine", int(scored.sum()), auc=oriented_auc(similarities[:, 1] - similarities[:, 0], truth == 1), accuracy=accuracy,
                   chance=largest_share(truth)),
    ]


def received_labels(label_dp: dict[str, int] | None, labels: torch.Tensor) -> LabelGuess:
    """A vanilla run's server holds the labels it was sent: right wherever label DP (the client's
    own count, `label_dp`) left them true, and always without it. `labels`: the client's training labels."""
    if label_dp is None:
        return LabelGuess("received", len(labels), accuracy=1.0, chance=largest_share(labels))
    if not isinstance(label_dp, dict) or not all(isinstance(label_dp.get(key), int) for key in ("released", "true")) or label_dp["released"] < 1:
        raise ValueError(f"label_dp {str(label_dp)[:80]}: the client's count is {{\"released\": N, \"true\": K}}, N >= 1")
    return LabelGuess("received", label_dp["released"], accuracy=label_dp["true"] / label_dp["released"], chance=largest_share(labels))
