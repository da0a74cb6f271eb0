"""Progress for people: a rich bar on a terminal, plain log lines otherwise. Fed by the typed
progress events every role emits (in this process, or as JSON lines from a role process)."""

from __future__ import annotations

import logging

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from splitfed.roles.declaration import Progress

log = logging.getLogger("splitfed.progress")


class Reporter:
    """Shows batch, epoch and round events as fits the terminal; call it with each event."""

    def __init__(self, label: str, console: Console | None = None):
        self.label = label
        self.console = console or Console(stderr=True)
        self.interactive = self.console.is_terminal
        self._bar: Bar | None = None
        self._task = None
        self._epoch = 1
        self._last_logged = -1

    def __enter__(self) -> Reporter:
        if self.interactive:
            self._bar = Bar(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn(), TimeRemainingColumn(), console=self.console,
            )
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar:
            self._bar.stop()

    def __call__(self, progress: Progress) -> None:
        if progress.event == "batch":
            self._advance(f"{self.label} epoch {self._epoch} batch", progress.done, progress.total, progress.loss)
        elif progress.event == "epoch":
            self._line(f"{self.label} epoch {progress.done}/{progress.total}: {self._summary(progress.record)}")
            self._task = None
            self._epoch = progress.done + 1
            self._last_logged = -1
        elif progress.event == "round":
            self._advance(f"{self.label} rounds", progress.done, progress.total, progress.loss)
            self._line(f"{self.label} round {progress.done}/{progress.total}: {self._summary(progress.record)}")
        elif progress.event == "calibration":
            self._line(f"{self.label} calibrated: {self._summary(progress.record)}")

    def _advance(self, description: str, done: int, total: int, loss: float) -> None:
        if self._bar:
            if self._task is None:
                self._task = self._bar.add_task(description, total=total, loss=loss)
            self._bar.update(self._task, completed=done, total=total, description=description, loss=loss)
        elif (tenth := done * 10 // max(1, total)) != self._last_logged:
            self._last_logged = tenth
            log.info("%s %d/%d loss %.4f", description, done, total, loss)

    @staticmethod
    def _summary(record: dict | None) -> str:
        def number(key: str) -> str:  # an epoch whose evaluator went silent has no accuracy
            value = (record or {}).get(key)
            return "n/a" if value is None else f"{value:.4f}"

        seconds = (record or {}).get("seconds") or 0.0
        return f"test accuracy {number('accuracy')}, test loss {number('loss')}, train loss {number('train_loss')}, {seconds:.1f}s"

    def _line(self, message: str) -> None:
        if self._bar:
            self._bar.console.print(message, highlight=False)
        else:
            log.info(message)
