"""What the split server keeps: of each client (`ClientState`) and of each closed epoch, with its
evaluation as the parts come in (`EpochLog`, and the summary a result and a progress event show)."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass
class ClientState:
    """What the server knows of one client."""

    name: str
    index: int
    queue: str
    heard: float  # when it last sent anything (time.monotonic)
    body: torch.nn.Sequential | None = None  # the layers its batches train (splitfed-v1: its own copy); None until the server has its model
    opt: torch.optim.Optimizer | None = None
    greeted: bool = False
    # The nonces of its latest hellos (one per start of the client): one seen again is a replay.
    # Bounded: in unsafe mode anyone can send hellos in its name.
    hellos: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=32))
    begun: bool = False  # it has sent a batch: a new hello from it can no longer start over
    gone: bool = False  # given up after --client-timeout of silence; back once heard from
    pending: tuple[torch.Tensor, torch.Tensor] | None = None  # u-shaped: (input, output) awaiting gradients
    samples: int = 0  # training samples in the current period (the whole epoch, in round-robin)
    reported: dict | None = None  # its `trained` for the current period
    epoch_samples: int = 0  # over the current epoch's reported periods
    epoch_loss: float = 0.0  # their training loss, summed over those samples
    batches: int = 0


@dataclass
class EpochLog:
    epoch: int
    included: list[str]
    missing: list[str]
    samples: dict[str, int]  # over the whole epoch
    train_loss: float
    accuracy: float | None = None
    loss: float | None = None
    opened: float = 0.0  # time.perf_counter() when the epoch began
    seconds: float = 0.0  # from then until its evaluation was reported (or given up)
    evaluators: list[str] = field(default_factory=list)  # who scores which part of the test set (--evaluate server, both), in part order
    party_evaluators: list[str] = field(default_factory=list)  # who scores the model on its whole own test data (--evaluate parties, both)
    scores: dict[str, tuple[int, float, int]] = field(default_factory=dict)  # evaluator -> (correct, loss sum, samples) of its part
    party_scores: dict[str, tuple[int, float, int]] = field(default_factory=dict)  # party evaluator -> the same, of its own test data

    def waiting_for(self) -> list[str]:
        """The evaluators not heard from: each sends one `evaluated`, with whatever it was asked to score."""
        asked = dict.fromkeys(self.evaluators + self.party_evaluators)
        return [name for name in asked if name not in self.scores and name not in self.party_scores]

    def add_up(self) -> None:
        """The epoch's accuracy and loss over the parts scored (all of the test set, unless an
        evaluator went silent); with --evaluate parties, over the parties' own test data."""
        scores = self.scores if self.evaluators else self.party_scores
        if samples := sum(n for _, _, n in scores.values()):
            self.accuracy = sum(c for c, _, _ in scores.values()) / samples
            self.loss = sum(loss for _, loss, _ in scores.values()) / samples

    @property
    def evaluated_samples(self) -> int:
        return sum(n for _, _, n in (self.scores if self.evaluators else self.party_scores).values())

    def parties(self) -> dict:
        """The parties' scores of the model on their own test data: the total and each one's."""
        samples = sum(n for _, _, n in self.party_scores.values())
        return {
            "accuracy": sum(c for c, _, _ in self.party_scores.values()) / samples if samples else None,
            "loss": sum(loss for _, loss, _ in self.party_scores.values()) / samples if samples else None,
            "samples": samples,
            "missing": [name for name in self.party_evaluators if name not in self.party_scores],
            "clients": {name: {"accuracy": correct / n, "loss": loss / n, "correct": correct, "samples": n}
                        for name, (correct, loss, n) in self.party_scores.items() if n},
        }

    def summary(self) -> dict:
        """The epoch as the run's history and its progress events show it."""
        return {
            "step": self.epoch, "accuracy": self.accuracy, "loss": self.loss, "train_loss": self.train_loss, "seconds": self.seconds,
            "included": self.included, "missing": self.missing, "samples": self.samples, "evaluators": self.evaluators,
            "evaluated_samples": self.evaluated_samples, **({"parties": self.parties()} if self.party_evaluators else {}),
        }
