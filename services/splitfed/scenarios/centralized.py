"""centralized: the whole model in one process, the baseline for every scenario."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from splitfed.config import setting
from splitfed.learning.settings import TrainSettings
from splitfed.roles.declaration import Progress, ProgressSink
from splitfed.scenarios.launch import LocalRun, Scenario


@dataclass(kw_only=True)
class CentralizedRun(LocalRun):
    save_model: Path | None = setting(None, "Write the trained model (safetensors).")


def train_here(settings: TrainSettings, run: CentralizedRun, on_progress: ProgressSink | None = None) -> dict:
    import torch
    from safetensors.torch import save_file

    from splitfed.learning import train
    from splitfed.learning.context import context_of
    from splitfed.learning.tasks import Task

    task = Task(settings)
    context = context_of(settings, "centralized", "centralized")
    model = task.model(context)
    loss_of = task.loss(context)
    opt = train.optimizer(model.parameters(), settings.optimizer, settings.lr)
    train_data = task.data(context, train=True)
    test_data = task.data(context, train=False)

    def forward(images: torch.Tensor) -> torch.Tensor:
        model.eval()
        return model(images)

    history = train.fit(
        train_data, test_data, settings,
        step=lambda images, labels: train.train_step(model, opt, images, labels, loss_of, task.compute),
        forward=forward,
        on_batch=(lambda done, total, loss: on_progress(Progress("batch", done, total, loss))) if on_progress else None,
        on_epoch=(lambda record: on_progress(Progress("epoch", record.step, settings.epochs, record.train_loss, vars(record)))) if on_progress else None,
        loss_of=loss_of,
        compute=task.compute,
    )
    if run.save_model:
        save_file({k: v.cpu().contiguous() for k, v in model.state_dict().items()}, str(run.save_model))
    return {
        "accuracy": history[-1].accuracy,
        "loss": history[-1].loss,
        "history": [vars(r) for r in history],
        "traffic": {"messages": 0, "bytes": 0},
    }


SCENARIO = Scenario(
    "centralized", "The whole model in one process: the baseline every other scenario is compared with.",
    TrainSettings, CentralizedRun, plan=lambda *_: [], queues=lambda *_: [], label=lambda settings, run: "centralized", local=train_here,
)
