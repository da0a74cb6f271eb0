"""Training settings and data set facts, kept free of torch so that torch-free roles (relay,
tracker) and the CLI can share them."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class DatasetInfo:
    """What a party needs to build a model without loading any data."""

    name: str
    shape: tuple[int, int, int]  # (C, H, W)
    classes: int
    mean: float
    std: float


DATASETS: dict[str, DatasetInfo] = {
    "fashion-mnist": DatasetInfo("fashion-mnist", (1, 28, 28), 10, 0.2860, 0.3530),
    "mnist": DatasetInfo("mnist", (1, 28, 28), 10, 0.1307, 0.3081),
    "digits": DatasetInfo("digits", (1, 8, 8), 10, 4.884, 6.017),
}


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
