"""Cutting a sequential model into the parts each party holds.

vanilla:   client = layers[:cut]                      server = layers[cut:]
u-shaped:  client = layers[:cut] + layers[-tail:]     server = layers[cut:-tail]
In u-shaped learning the client computes the loss, so labels never leave it.

A cut is an index K (the client keeps the first K layers) or, in a model whose children are named
(torchvision's: conv1, layer1, ..., fc), a child's name: cut after it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from splitfed.learning.models import evaluating
from splitfed.learning.settings import SPLIT_MODES as MODES


@dataclass
class Parts:
    head: nn.Sequential  # client: input -> cut activation
    body: nn.Sequential  # server
    tail: nn.Sequential | None  # client again in u-shaped mode: server output -> logits
    cut_layer: int  # index of the body's first layer in the full model
    tail_start: int  # index of the tail's first layer (== number of layers when there is none)


@dataclass(frozen=True)
class CutPoint:
    """One place a model can be cut, as `splitfed models --cuts` shows it."""

    index: int  # the client keeps layers [0, index)
    name: str  # the client's last layer
    shape: tuple[int, ...]  # the activation at the cut, per sample
    client_params: int  # head and, in u-shaped mode, tail
    server_params: int

    @property
    def floats(self) -> int:
        return math.prod(self.shape)


def cut(model: nn.Sequential, cut_layer: int | str | None, mode: str = "vanilla", tail_layers: int = 1) -> Parts:
    """Cut `model` before layer `cut_layer`, an index or the name of the layer to cut after (None:
    the model's `default_cut` if its builder set one, as the cnn's does; else the last cut point,
    before its classifier).

    The parts are indexed 0.. like any `nn.Sequential(*layers)`, whatever the model names its
    children: a part's state-dict keys are its own layer indices (roles.split.common.save_parts
    shifts them by the part's first index)."""
    if mode not in MODES:
        raise ValueError(f"unknown split mode {mode!r}; choose one of {', '.join(MODES)}")
    layers = list(model)
    end = len(layers) - (tail_layers if mode == "u-shaped" else 0)
    index = _index(model, cut_layer, mode, tail_layers, end)
    if not 1 <= index < end:
        raise ValueError(f"cut layer {index} must be in 1..{end - 1} for a {len(layers)}-layer model in {mode} mode{_names_hint(model, end)}")
    # Both halves must have weights to train (each side runs an optimiser over its own).
    usable = usable_cuts(model, mode, tail_layers)
    if index not in usable:
        choice = f"cuts where both do: {_listed(model, usable)}" if usable else "this model cannot be split: choose another"
        client_trains = any(_trains(layer) for layer in layers[:index])
        raise ValueError(f"cut layer {_shown(model, index)} leaves the {'server' if client_trains else 'client'} no weights to train; {choice}")
    tail = nn.Sequential(*layers[end:]) if mode == "u-shaped" else None
    return Parts(nn.Sequential(*layers[:index]), nn.Sequential(*layers[index:end]), tail, index, end)


def usable_cuts(model: nn.Sequential, mode: str = "vanilla", tail_layers: int = 1) -> list[int]:
    """The indices where the model can be cut in `mode`: each side keeps weights to train."""
    trains = [_trains(layer) for layer in model]
    end = len(trains) - (tail_layers if mode == "u-shaped" else 0)
    return [k for k in range(1, end) if any(trains[:k]) and any(trains[k:end])]


def cut_points(model: nn.Sequential, input_shape: tuple[int, ...], mode: str = "vanilla", tail_layers: int = 1) -> list[CutPoint]:
    """Every usable cut with its activation shape and each side's parameter count."""
    names = list(model._modules)
    counts = [sum(p.numel() for p in layer.parameters()) for layer in model]
    end = len(counts) - (tail_layers if mode == "u-shaped" else 0)
    shapes, x = [], torch.zeros(1, *input_shape)  # (1, C, H, W)
    with evaluating(model):  # a probe: BatchNorm's running statistics stay as they are
        for layer in model:
            x = layer(x)
            shapes.append(tuple(x.shape[1:]))
    return [
        CutPoint(k, names[k - 1], shapes[k - 1], sum(counts[:k]) + sum(counts[end:]), sum(counts[k:end]))
        for k in usable_cuts(model, mode, tail_layers)
    ]


def _trains(layer: nn.Module) -> bool:
    return any(True for _ in layer.parameters())


def _named(model: nn.Sequential) -> bool:
    """Whether the children have names of their own (torchvision's) rather than their indices."""
    return any(not name.isdigit() for name in model._modules)


def _index(model: nn.Sequential, cut_layer: int | str | None, mode: str, tail_layers: int, end: int) -> int:
    """The index a cut names: digits are an index, anything else the layer to cut after."""
    if cut_layer is None:  # the builder's choice (the cnn's), else the last cut before the classifier
        usable = usable_cuts(model, mode, tail_layers)
        return getattr(model, "default_cut", None) or (usable[-1] if usable else 1)
    if isinstance(cut_layer, int) or cut_layer.isdigit():
        return int(cut_layer)
    names = list(model._modules)
    if cut_layer not in names or not _named(model):
        raise ValueError(f"unknown cut {cut_layer[:80]!r}: give an index in 1..{end - 1}{_names_hint(model, end)}")
    return names.index(cut_layer) + 1


def _names_hint(model: nn.Sequential, end: int) -> str:
    if not _named(model):
        return ""
    return f", or the name of the layer to cut after: {', '.join(list(model._modules)[:end - 1])}"


def _shown(model: nn.Sequential, index: int) -> str:
    """A cut as the user may give it: 4, or 4 (after layer1) in a model with named children."""
    return f"{index} (after {list(model._modules)[index - 1]})" if _named(model) and 1 <= index <= len(model) else str(index)


def _listed(model: nn.Sequential, indices: list[int]) -> str:
    return ", ".join(_shown(model, k) for k in indices)
