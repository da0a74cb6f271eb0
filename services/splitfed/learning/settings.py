"""Training settings, kept free of torch so that torch-free roles (relay, tracker) can share them."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class TrainSettings:
    """What every way of training the same model shares; split and federated settings extend it."""

    dataset: str = "fashion-mnist"
    data_dir: Path | None = None
    model: str = "cnn"
    epochs: int = 1
    batch_size: int = 64
    eval_batch_size: int = 500
    lr: float = 1e-3
    optimizer: str = "adam"
    seed: int = 1
    limit: int | None = None
    test_limit: int | None = None

    def config(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}
