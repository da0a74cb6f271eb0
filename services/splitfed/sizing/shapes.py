"""The models as shapes: each layer of `learning.models.build`'s `nn.Sequential` as its parameter
count and output size, and the halves `learning.cutting.cut` makes of it. torch-free; the shapes
are described a second time here, and tests/unit/test_sizing.py checks them against
`learning.models` layer by layer, so the two cannot drift apart. A model the walk does not know
(a task's, a torchvision one) becomes the same `Layer`s in `sizing.task_sizes`, which probes it
with torch."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from splitfed.learning.settings import SPLIT_MODES, DataShape

# learning.models.DEFAULT_CUT (that module imports torch); tests/unit/test_sizing.py checks they agree.
DEFAULT_CUT = 9
TAIL_LAYERS = 1  # learning.cutting.cut's default: the client's tail in u-shaped mode


@dataclass(frozen=True)
class Layer:
    """One layer of an `nn.Sequential` model, as sizes per sample: its parameters, its output, and
    what it keeps for the backward pass."""

    kind: str  # conv | relu | pool | flatten | linear (the walk); a probed module's class name
    params: int
    out: tuple[int, ...]
    floats: int  # float32 outputs it makes: its own, or a block's modules' outputs; 0 for a view of its input
    int64s: int  # int64 it keeps for backward: max pooling's argmax indices

    @property
    def size(self) -> int:
        return math.prod(self.out)

    @property
    def view(self) -> bool:
        """Its output shares its input's memory."""
        return self.floats == 0

    @property
    def indices(self) -> bool:
        """It keeps int64 argmax indices of its output for the backward pass."""
        return self.int64s > 0


def _walk(shape: tuple[int, ...], plan: list[tuple]) -> list[Layer]:
    layers = []
    for kind, *args in plan:
        if kind == "conv":  # Conv2d(in, out, kernel, padding), stride 1
            out_channels, kernel, padding = args
            channels, height, width = shape
            params = out_channels * channels * kernel * kernel + out_channels
            shape = (out_channels, height + 2 * padding - kernel + 1, width + 2 * padding - kernel + 1)
        elif kind == "pool":  # MaxPool2d(k)
            (k,) = args
            params, shape = 0, (shape[0], shape[1] // k, shape[2] // k)
        elif kind == "flatten":
            params, shape = 0, (math.prod(shape),)
        elif kind == "linear":
            (features,) = args
            params, shape = shape[0] * features + features, (features,)
        else:  # relu
            params = 0
        size = math.prod(shape)
        layers.append(Layer(kind, params, shape, 0 if kind == "flatten" else size, size if kind == "pool" else 0))
    return layers


# The built-in models the walk describes, each as its layers for a number of classes. A built-in
# model without a plan here is sized all the same, probed with torch (sizing.task_sizes): a plan
# only keeps sizing it torch-free.
PLANS: dict[str, Callable[[int], list[tuple]]] = {
    "cnn": lambda classes: [  # learning.models.default_cnn
        ("conv", 32, 5, 2), ("relu",), ("pool", 2), ("conv", 64, 5, 2), ("relu",), ("pool", 2), ("flatten",),
        ("linear", 128), ("relu",), ("linear", 64), ("relu",), ("linear", classes)],
    "tiny": lambda classes: [("flatten",), ("linear", classes)],  # learning.models.tiny
}


def walks(model: str) -> bool:
    """Whether the walk describes `model` (the others are probed with torch: sizing.task_sizes)."""
    return model in PLANS


def model_layers(model: str, meta: DataShape) -> list[Layer]:
    """The layers of `learning.models.build(model, meta)`, as sizes."""
    if model not in PLANS:
        raise ValueError(f"--model {model!r}: the walk knows {', '.join(PLANS)}; sizing.task_sizes probes the others")
    return _walk(meta.shape, PLANS[model](meta.classes))


@dataclass(frozen=True)
class Parts:
    """Who holds which layers of a split model (as learning.cutting.cut cuts it)."""

    head: list[Layer]  # client
    body: list[Layer]  # server
    tail: list[Layer]  # client again, u-shaped mode
    cut_shape: tuple[int, ...]  # per sample, between head and body
    body_out: tuple[int, ...]  # per sample, what the server answers with in evaluation


class CannotSplit(ValueError):
    """The model cannot be cut as asked: a split run would fail."""


class NotSized(Exception):  # noqa: N818 (a state of an estimate, not a failure of the settings)
    """The role cannot be sized from here: its data cannot be read, its task cannot be built, or
    its model cannot be probed. Not a ValueError: the settings may be right (the data may live
    where the role runs), so `splitfed size` reports it and goes on with the other roles."""


@dataclass(frozen=True)
class OwnData:
    """A party's own data (a local format, a task's data(), or a data set in a folder of its own),
    as `sizing.task_sizes` read it: nothing is shared out, so the party keeps all it reads."""

    source: str  # how it is read: a key of measured.OWN_DATA_READ_BYTES, task (its data()) or files
    train_samples: int | None  # as the role uses them (--limit applied); None: the role does not read that part
    test_samples: int | None
    held_bytes: float  # inputs and labels as kept: all that was read, since --limit keeps a view of it
    read_bytes: float  # the peak over the interpreter while the parts are read

    @property
    def samples(self) -> int:
        """Samples the role uses, both parts."""
        return (self.train_samples or 0) + (self.test_samples or 0)


@dataclass(frozen=True)
class Sized:
    """What a role's estimate is computed from: its model's layers for one sample of `shape`, the
    party's own data if it has any, and, for a model sizing.task_sizes probed and cut with torch,
    the cut (the head's end and the tail's start)."""

    shape: tuple[int, ...]
    layers: tuple[Layer, ...]
    own: OwnData | None = None
    cut: tuple[int, int] | None = None  # None: split_parts cuts the layers as the settings say
    notes: tuple[str, ...] = ()


def cut_index(cut_layer: int | str | None) -> int:
    """The index a --cut-layer gives for cnn and tiny, whose layers are named by their indices."""
    if cut_layer is None:
        return DEFAULT_CUT
    if isinstance(cut_layer, int) or cut_layer.isdigit():
        return int(cut_layer)
    raise CannotSplit(f"unknown cut {cut_layer[:80]!r}: cnn and tiny are cut at a layer index")


def split_parts(layers: list[Layer], cut_layer: int | str | None, mode: str) -> Parts:
    """The halves as learning.cutting.cut makes them; CannotSplit where a run would fail."""
    cut_layer = cut_index(cut_layer)
    if mode not in SPLIT_MODES:
        raise ValueError(f"--mode {mode!r}: choose one of {', '.join(SPLIT_MODES)}")
    end = len(layers) - (TAIL_LAYERS if mode == "u-shaped" else 0)
    if not 1 <= cut_layer < end:
        raise CannotSplit(f"cut layer {cut_layer} must be in 1..{end - 1} for a {len(layers)}-layer model in {mode} mode")
    head, body, tail = layers[:cut_layer], layers[cut_layer:end], layers[end:]
    for who, held in (("split-client", head + tail), ("split-server", body)):
        if not sum(layer.params for layer in held):
            raise CannotSplit(f"cut layer {cut_layer} leaves the {who} layers without parameters: its optimizer would have nothing to train")
    return parts_at(layers, cut_layer, end)


def parts_at(layers: list[Layer], cut: int, tail_start: int) -> Parts:
    """The halves of `layers` cut before `cut`, the tail from `tail_start` (len(layers): none)."""
    head, body, tail = layers[:cut], layers[cut:tail_start], layers[tail_start:]
    return Parts(head, body, tail, head[-1].out, body[-1].out)
