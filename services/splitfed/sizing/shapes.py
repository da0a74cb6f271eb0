"""The models as shapes: each layer of `learning.models.build`'s `nn.Sequential` as its parameter
count and output size, and the halves `learning.cutting.cut` makes of it. torch-free; the shapes
are described a second time here, and tests/unit/test_sizing.py checks them against
`learning.models` layer by layer, so the two cannot drift apart."""

from __future__ import annotations

import math
from dataclasses import dataclass

from splitfed.learning.settings import MODELS, SPLIT_MODES, DatasetInfo

# learning.models.DEFAULT_CUT (that module imports torch); tests/unit/test_sizing.py checks they agree.
DEFAULT_CUT = 9
TAIL_LAYERS = 1  # learning.cutting.cut's default: the client's tail in u-shaped mode


@dataclass(frozen=True)
class Layer:
    """One layer of an `nn.Sequential` model, as sizes: its parameters and its output per sample."""

    kind: str  # conv | relu | pool | flatten | linear
    params: int
    out: tuple[int, ...]

    @property
    def size(self) -> int:
        return math.prod(self.out)

    @property
    def view(self) -> bool:
        """Its output shares its input's memory."""
        return self.kind == "flatten"

    @property
    def indices(self) -> bool:
        """It keeps int64 argmax indices of its output for the backward pass."""
        return self.kind == "pool"


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
        layers.append(Layer(kind, params, shape))
    return layers


def model_layers(model: str, meta: DatasetInfo) -> list[Layer]:
    """The layers of `learning.models.build(model, meta)`, as sizes."""
    if model == "cnn":  # learning.models.default_cnn
        plan = [("conv", 32, 5, 2), ("relu",), ("pool", 2), ("conv", 64, 5, 2), ("relu",), ("pool", 2), ("flatten",),
                ("linear", 128), ("relu",), ("linear", 64), ("relu",), ("linear", meta.classes)]
    elif model == "tiny":  # learning.models.tiny
        plan = [("flatten",), ("linear", meta.classes)]
    else:
        raise ValueError(f"--model {model!r}: choose one of {', '.join(MODELS)} (torchvision models are not sized yet)")
    return _walk(meta.shape, plan)


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
    return Parts(head, body, tail, head[-1].out, body[-1].out)
