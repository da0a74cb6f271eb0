"""Models as `nn.Sequential`, so that any layer index (or, for torchvision models, child name) is a cut point."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from splitfed.learning import vision
from splitfed.learning.settings import MODELS, DataShape


def default_cnn(meta: DataShape) -> nn.Sequential:
    """Two conv blocks and three linear layers (pytorch/examples mnist, without dropout).

    No dropout: a split run must draw no random numbers that centralized training does not,
    or the halves stop being the same computation as the whole.
    """
    channels, height, width = meta.shape
    flat = 64 * (height // 4) * (width // 4)
    model = nn.Sequential(
        nn.Conv2d(channels, 32, 5, padding=2),  # 0: (B, 32, H, W)
        nn.ReLU(),  # 1
        nn.MaxPool2d(2),  # 2: (B, 32, H/2, W/2)
        nn.Conv2d(32, 64, 5, padding=2),  # 3: (B, 64, H/2, W/2)
        nn.ReLU(),  # 4
        nn.MaxPool2d(2),  # 5: (B, 64, H/4, W/4)
        nn.Flatten(),  # 6: (B, 64*H/4*W/4)
        nn.Linear(flat, 128),  # 7: (B, 128)
        nn.ReLU(),  # 8
        nn.Linear(128, 64),  # 9: (B, 64)
        nn.ReLU(),  # 10
        nn.Linear(64, meta.classes),  # 11: (B, classes) logits; the loss applies log-softmax once
    )
    model.default_cut = DEFAULT_CUT  # where cutting.cut cuts it unless told otherwise
    return model


# Layers [0, DEFAULT_CUT) stay with the data owner: the feature extractor and the first dense
# layer. The cut is where the
# activation is smallest, (B, 128): 32 KiB a batch each way instead of 784 KiB after the conv
# blocks (--cut-layer 6), and communication is what split learning pays for per batch.
DEFAULT_CUT = 9

def tiny(meta: DataShape) -> nn.Sequential:
    """Multinomial logistic regression: for scale tests with many parties, not for accuracy."""
    channels, height, width = meta.shape
    return nn.Sequential(nn.Flatten(), nn.Linear(channels * height * width, meta.classes))


BUILDERS = {"cnn": default_cnn, "tiny": tiny}


def build(name: str, meta: DataShape, seed: int) -> nn.Sequential:
    """The full model, initialised from `seed`: every party builds it and keeps its own layers.
    `name`: cnn, tiny, or a torchvision classification model (learning.vision), whose Sequential
    names its children (conv1, layer1, ..., fc) so that a cut can name them too."""
    if name not in MODELS:
        return vision.build(name, meta, seed)  # it imports torchvision then: images without it still run cnn and tiny
    torch.manual_seed(seed)
    return BUILDERS[name](meta)


@contextmanager
def evaluating(layers: nn.Module) -> Iterator[None]:
    """`layers` in eval mode and without autograd, then back in the modes they had: a probe must
    not move BatchNorm's running statistics (they are part of the model every party keeps), nor
    fail on BatchNorm's one-sample batches."""
    modes = [(module, module.training) for module in layers.modules()]
    layers.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training


def output_shape(layers: nn.Module, input_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of one sample after `layers` (without the batch dimension)."""
    with evaluating(layers):
        return tuple(layers(torch.zeros(1, *input_shape, device=device_of(layers))).shape[1:])


def device_of(layers: nn.Module) -> torch.device:
    """Where `layers` live (the CPU for layers without parameters or buffers)."""
    return next((tensor.device for tensor in [*layers.parameters(), *layers.buffers()]), torch.device("cpu"))


def forward_flops(layers: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Floating-point operations of one sample's forward pass through `layers`."""
    from torch.utils.flop_counter import FlopCounterMode

    with evaluating(layers), FlopCounterMode(display=False) as counter:
        layers(torch.zeros(1, *input_shape, device=device_of(layers)))
    return counter.get_total_flops()
