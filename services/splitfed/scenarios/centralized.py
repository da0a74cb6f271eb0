"""centralized: the reference's "normal" mode, one process, the baseline for every scenario."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from splitfed.learning import data, models, train
from splitfed.learning.settings import TrainSettings
from splitfed.scenarios.progress import Reporter


def run(settings: TrainSettings, reporter: Reporter | None = None, save_model: Path | None = None) -> dict:
    meta = data.info(settings.dataset)
    model = models.build(settings.model, meta, settings.seed)
    opt = train.optimizer(model.parameters(), settings.optimizer, settings.lr)
    train_data = data.load(settings.dataset, train=True, data_dir=settings.data_dir, limit=settings.limit)
    test_data = data.load(settings.dataset, train=False, data_dir=settings.data_dir, limit=settings.test_limit)

    def forward(images: torch.Tensor) -> torch.Tensor:
        model.eval()
        return model(images)

    started = time.perf_counter()
    history = train.fit(
        train_data, test_data, settings,
        step=lambda images, labels: train.train_step(model, opt, images, labels),
        forward=forward,
        on_batch=reporter.batch if reporter else None,
        on_epoch=reporter.epoch if reporter else None,
    )
    if save_model:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(save_model))
    return {
        "scenario": "centralized",
        "accuracy": history[-1].accuracy,
        "loss": history[-1].loss,
        "wall_seconds": time.perf_counter() - started,
        "history": [vars(r) for r in history],
        "traffic": {"messages": 0, "bytes": 0},
        "config": settings.config(),
    }
