"""torchvision classification models as `nn.Sequential`, so that any top-level child is a cut point.

A model is cut by running its children in order: that is the same computation as the model only
where its forward is exactly its children in order, with a flatten (or a global average pool and
a flatten) between the features and the classifier. `build` makes that Sequential and checks it
against the model's own forward on a probe, refusing the models whose forward does more (auxiliary
heads, functional activations, class tokens): a split of those would not be the model.

torchvision is imported only here and only when a torchvision model is asked for: images with
torch but no torchvision still run cnn and tiny.
"""

from __future__ import annotations

from collections import OrderedDict
from types import ModuleType

import torch
from torch import nn

from splitfed.learning.settings import MODELS, DataShape

SMALL_IMAGE = 64  # px: at most this, a ResNet gets the CIFAR stem (3x3 conv, no max pool)
LARGEST_PROBE = 512  # px: the largest input tried when looking for a model's minimum input size
EXAMPLES = ("resnet18", "mobilenet_v3_small", "vgg11")
# What a forward raises on an input it cannot take: a feature map shrunk to nothing, an image size
# a transformer asserts, a child that cannot take its predecessor's output (a ModuleList).
PROBE_ERRORS = (RuntimeError, AssertionError, ValueError, TypeError, NotImplementedError, IndexError, KeyError)


def torchvision_module() -> ModuleType:
    """torchvision, or a ValueError that says it is missing (rather than an ImportError trace)."""
    try:
        import torchvision
    except ImportError:
        raise ValueError(f"torchvision is not installed: it builds every model but {' and '.join(MODELS)} (pip install torchvision)") from None
    return torchvision


def names() -> list[str]:
    """The torchvision classification models `build` accepts (it may refuse some as uncuttable)."""
    torchvision = torchvision_module()
    return torchvision.models.list_models(module=torchvision.models)


def build(name: str, meta: DataShape, seed: int) -> nn.Sequential:
    """torchvision's `name`, randomly initialised from `seed` (never a weight download), fitted to
    `meta`'s images and turned into a Sequential of its named children."""
    torchvision = torchvision_module()
    if name not in torchvision.models.list_models(module=torchvision.models):
        raise ValueError(f"unknown model {name!r}; choose {', '.join(MODELS)} or a torchvision classification model such as "
                         f"{', '.join(EXAMPLES)} (splitfed models lists them)")
    torch.manual_seed(seed)
    model = torchvision.models.get_model(name, weights=None, num_classes=meta.classes)
    _fit_input(model, meta.shape, torchvision)
    _without_randomness(model, torchvision)
    _out_of_place(model)
    model.eval()  # the probes must not move BatchNorm's running statistics
    with torch.no_grad():
        probe = _probe(meta.shape)
        try:
            expected = model(probe)
        except PROBE_ERRORS as exc:
            raise _cannot_run(name, model, meta, exc) from None
        return _as_sequential(f"--model {name}", model, probe, expected).train()


def sequential_of(model: nn.Module, shape: tuple[int, ...], name: str) -> nn.Sequential:
    """Any model as the Sequential of its children, checked on a probe of `shape` (one sample's);
    ValueError naming `name` if its forward is not its children in order."""
    probe = _probe(shape)
    model.eval()  # the probe must not move BatchNorm's running statistics
    with torch.no_grad():
        return _as_sequential(name, model, probe, model(probe)).train()


def _probe(shape: tuple[int, ...]) -> torch.Tensor:
    """(2, C, H, W) from a generator of its own: the global RNG stays as the seed left it."""
    return torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))


def _fit_input(model: nn.Module, shape: tuple[int, int, int], torchvision: ModuleType) -> None:
    """The first convolution takes the data set's channels; a ResNet on small images gets the CIFAR
    stem, since its 7x7 stride-2 conv and max pool would shrink 32 px to 8 before its first block."""
    channels, height, width = shape
    if isinstance(model, torchvision.models.ResNet) and max(height, width) <= SMALL_IMAGE:
        model.conv1 = _initialised(nn.Conv2d(channels, model.conv1.out_channels, 3, stride=1, padding=1, bias=False))
        model.maxpool = nn.Identity()
        return
    path, conv = next(((path, m) for path, m in model.named_modules() if isinstance(m, nn.Conv2d)), (None, None))
    if conv is None or conv.in_channels == channels:
        return
    parent, _, attribute = path.rpartition(".")
    replacement = nn.Conv2d(channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                            conv.groups, conv.bias is not None, conv.padding_mode)
    setattr(model.get_submodule(parent), attribute, _initialised(replacement))


def _initialised(conv: nn.Conv2d) -> nn.Conv2d:
    # As torchvision initialises the convolutions of ResNet, VGG, MobileNet, EfficientNet, RegNet.
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


def _without_randomness(model: nn.Module, torchvision: ModuleType) -> None:
    """Dropout and stochastic depth become identities, as the cnn has none: a split run must draw
    no random numbers that centralized training does not, or the halves (in two processes, two
    RNG streams) stop being the same computation as the whole. Their eval-mode output is unchanged."""
    drawing = (nn.modules.dropout._DropoutNd, torchvision.ops.StochasticDepth)
    for path, module in list(model.named_modules()):
        if path and isinstance(module, drawing):
            parent, _, attribute = path.rpartition(".")
            setattr(model.get_submodule(parent), attribute, nn.Identity())


def _out_of_place(model: nn.Module) -> None:
    """In-place activations (ReLU(inplace=True)...) compute out of place: the server's first layer
    takes the activation it receives as a leaf that requires grad, which autograd forbids changing
    in place. Same values, one more tensor per activation."""
    for module in model.modules():
        if getattr(module, "inplace", False) is True:
            module.inplace = False


def _cannot_run(name: str, model: nn.Module, meta: DataShape, exc: Exception) -> ValueError:
    """Why `model` cannot take `meta`'s images: too small for it (its feature map shrinks to
    nothing), naming the smallest size it takes, unless it could not be cut at that size either."""
    channels, height, width = meta.shape
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    side = _smallest_input(model, channels, max(height, width))
    if side is None:
        return ValueError(f"--model {name} cannot run on {meta.name}'s {height}x{width} images ({reason})")
    larger = _probe((channels, side, side))
    _as_sequential(f"--model {name}", model, larger, model(larger))  # ValueError: it cannot be cut at any size
    return ValueError(f"--model {name} cannot run on {meta.name}'s {height}x{width} images: it needs images of at least {side}x{side} px ({reason})")


def _smallest_input(model: nn.Module, channels: int, failed: int) -> int | None:
    """The smallest square side (px) that `model` runs on, above `failed`; None up to LARGEST_PROBE.
    Bisection: a conv net that runs on a size runs on every larger one."""
    def runs(side: int) -> bool:
        try:
            model(torch.zeros(1, channels, side, side))
        except PROBE_ERRORS:
            return False
        return True

    if failed >= LARGEST_PROBE:
        return None
    low, high = failed, min(2 * failed, LARGEST_PROBE)
    while not runs(high):
        if high == LARGEST_PROBE:
            return None
        low, high = high, min(2 * high, LARGEST_PROBE)
    while high - low > 1:  # low fails, high runs
        middle = (low + high) // 2
        low, high = (low, middle) if runs(middle) else (middle, high)
    return high


def _as_sequential(name: str, model: nn.Module, probe: torch.Tensor, expected: torch.Tensor) -> nn.Sequential:
    """The model's children in order, with the flatten its forward does between features and
    classifier; ValueError if that is not what the model computes."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    x = probe
    try:
        for child_name, child in model.named_children():
            linear = _first_linear(child)
            if x.dim() == 4 and linear is not None:
                for glue_name, glue in _glue(x, linear, next(reversed(layers.values()), None)):
                    x = _append(layers, glue_name, glue, x)
            x = _append(layers, child_name, child, x)
        if x.dim() > 2 and x.flatten(1).shape == expected.shape:  # squeezenet: its classifier pools to (B, classes, 1, 1)
            x = _append(layers, "flatten", nn.Flatten(), x)
    except PROBE_ERRORS:  # a child that cannot take its predecessor's output
        x = None
    if x is None or x.shape != expected.shape or not torch.allclose(x, expected, rtol=1e-4, atol=1e-5):
        raise ValueError(f"{name} cannot be cut: its forward is not its children in order "
                         f"({', '.join(n for n, _ in model.named_children())}); choose a model such as {', '.join(EXAMPLES)}")
    return nn.Sequential(layers)


def _append(layers: OrderedDict[str, nn.Module], name: str, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Add `module` under `name` and run it; KeyError if a glue layer's name is a child's."""
    if name in layers:
        raise KeyError(name)
    layers[name] = module
    return module(x)


def _first_linear(child: nn.Module) -> nn.Linear | None:
    """The Linear a child starts with (past identities), if it does: a classifier."""
    for module in child.modules():
        if not list(module.children()) and not isinstance(module, nn.Identity):
            return module if isinstance(module, nn.Linear) else None
    return None


def _glue(x: torch.Tensor, linear: nn.Linear, previous: nn.Module | None) -> list[tuple[str, nn.Module]]:
    """What the forward does functionally between (B, C, H, W) features and a classifier: a
    flatten, after a global average pool where the classifier takes C features and no pool
    precedes it (MobileNetV2, ShuffleNetV2 and MnasNet pool in their forward)."""
    _, channels, _, _ = x.shape
    pooled = isinstance(previous, (nn.AdaptiveAvgPool2d, nn.AvgPool2d))
    if linear.in_features == channels and not pooled:
        return [("avgpool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten())]  # (B, C, 1, 1) -> (B, C)
    return [("flatten", nn.Flatten())]  # (B, C, H, W) -> (B, C*H*W)
