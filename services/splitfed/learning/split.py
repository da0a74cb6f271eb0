"""Cutting a sequential model into the parts each party holds.

vanilla:   client = layers[:cut]                      server = layers[cut:]
u-shaped:  client = layers[:cut] + layers[-tail:]     server = layers[cut:-tail]
In u-shaped learning the client computes the loss, so labels never leave it.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from splitfed.learning.models import DEFAULT_CUT
from splitfed.learning.settings import SPLIT_MODES as MODES


@dataclass
class Parts:
    head: nn.Sequential  # client: input -> cut activation
    body: nn.Sequential  # server
    tail: nn.Sequential | None  # client again in u-shaped mode: server output -> logits
    cut_layer: int  # index of the body's first layer in the full model
    tail_start: int  # index of the tail's first layer (== number of layers when there is none)


def cut(model: nn.Sequential, cut_layer: int | None, mode: str = "vanilla", tail_layers: int = 1) -> Parts:
    """Cut `model` before layer `cut_layer` (None: DEFAULT_CUT)."""
    cut_layer = DEFAULT_CUT if cut_layer is None else cut_layer
    if mode not in MODES:
        raise ValueError(f"unknown split mode {mode!r}; choose one of {', '.join(MODES)}")
    layers = list(model)
    end = len(layers) - (tail_layers if mode == "u-shaped" else 0)
    if not 1 <= cut_layer < end:
        raise ValueError(f"cut layer {cut_layer} must be in 1..{end - 1} for a {len(layers)}-layer model in {mode} mode")
    # Both halves must have weights to train (each side runs an optimiser over its own).
    trains = [any(True for _ in layer.parameters()) for layer in layers]
    if not (any(trains[:cut_layer]) and any(trains[cut_layer:end])):
        usable = [k for k in range(1, end) if any(trains[:k]) and any(trains[k:end])]
        choice = f"cuts where both do: {', '.join(map(str, usable))}" if usable else "this model cannot be split: choose another"
        raise ValueError(f"cut layer {cut_layer} leaves the {'client' if not any(trains[:cut_layer]) else 'server'} no weights to train; {choice}")
    tail = nn.Sequential(*layers[end:]) if mode == "u-shaped" else None
    return Parts(nn.Sequential(*layers[:cut_layer]), nn.Sequential(*layers[cut_layer:end]), tail, cut_layer, end)
