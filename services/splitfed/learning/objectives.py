"""What a party adds to its task's local loss when its data is skewed, shared by FedAvg's workers
and the decentralized peers: logit calibration by its own label counts (FedLC), restricted softmax
over the classes it holds (FedRS), and the proximal term towards the model it last agreed on
(FedProx's global model, a peer's last average). Pure torch."""

from __future__ import annotations

import torch
from torch import nn

from splitfed.learning import data
from splitfed.learning.train import Loss


def absent_class_scale(share: data.Samples, classes: int, scale: float) -> torch.Tensor:
    """(classes,): 1 for the classes in `share`, `scale` for the others."""
    factors = torch.full((classes,), scale, device=share.device)
    factors[share.labels.unique()] = 1.0
    return factors


def calibration_offsets(share: data.Samples, classes: int, tau: float) -> torch.Tensor:
    """(classes,): FedLC's logit calibration tau * n_c^(-1/4) from the share's label counts n_c,
    subtracted from the logits in the local loss. A class the share holds no sample of counts as
    one sample (the guard against n_c = 0): its logits are pushed down the most, by tau."""
    counts = torch.bincount(share.labels, minlength=classes).to(share.device, torch.float32)  # (classes,)
    return tau * counts.clamp(min=1.0).pow(-0.25)


def adjusted(loss_of: Loss, scale: torch.Tensor | None = None, offsets: torch.Tensor | None = None) -> Loss:
    """`loss_of` on the logits scaled by `scale` (classes,) and then less `offsets` (classes,): the
    local loss of a party whose labels are skewed. Only training uses it; scores use the plain logits."""
    if scale is None and offsets is None:
        return loss_of

    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:  # (B, classes), (B,)
        if scale is not None:
            logits = logits * scale
        if offsets is not None:
            logits = logits - offsets
        return loss_of(logits, labels)

    return loss


class Proximal:
    """mu/2 * ||w - w_anchor||^2 over the model's parameters, added to the local loss: it keeps local
    training near the anchor, the model last agreed on (`anchor_here` moves it to the model as it is)."""

    def __init__(self, model: nn.Module, mu: float):
        self.params = list(model.parameters())
        self.mu = mu
        self.anchor_here()

    def anchor_here(self) -> None:
        self.anchor = [p.detach().clone() for p in self.params]

    def __call__(self) -> torch.Tensor:
        return self.mu / 2 * sum((p - a).pow(2).sum() for p, a in zip(self.params, self.anchor))
