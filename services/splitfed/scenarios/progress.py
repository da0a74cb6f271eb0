"""Progress for people: a rich bar on a terminal, plain log lines otherwise."""

from __future__ import annotations

import logging
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from splitfed.learning.train import EpochRecord

log = logging.getLogger("splitfed.progress")


class Reporter:
    """Receives batch and epoch events from a training loop; shows them as fits the terminal."""

    def __init__(self, label: str, epochs: int, console: Console | None = None):
        self.label = label
        self.epochs = epochs
        self.console = console or Console(stderr=True)
        self.interactive = self.console.is_terminal
        self._bar: Progress | None = None
        self._task = None
        self._epoch = 1
        self._last_logged = -1

    def __enter__(self) -> Reporter:
        if self.interactive:
            self._bar = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn(), TimeRemainingColumn(), console=self.console,
            )
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar:
            self._bar.stop()

    def batch(self, done: int, total: int, loss: float) -> None:
        if self._bar:
            description = f"{self.label} epoch {self._epoch}/{self.epochs}"
            if self._task is None:
                self._task = self._bar.add_task(description, total=total, loss=loss)
            self._bar.update(self._task, completed=done, total=total, description=description, loss=loss)
        elif (tenth := done * 10 // total) != self._last_logged:
            self._last_logged = tenth
            log.info("%s epoch %d/%d batch %d/%d loss %.4f", self.label, self._epoch, self.epochs, done, total, loss)

    def round(self, record: EpochRecord, rounds: int) -> None:
        """A federated round closed: the bar counts rounds, the line shows the global model."""
        self.batch(record.step, rounds, record.train_loss)
        self._line(f"{self.label} round {record.step}/{rounds}: test accuracy {record.accuracy:.4f}, test loss {record.loss:.4f}, train loss {record.train_loss:.4f}, {record.seconds:.1f}s")

    def _line(self, message: str) -> None:
        if self._bar:
            self._bar.console.print(message, highlight=False)
        else:
            log.info(message)

    def epoch(self, record: EpochRecord) -> None:
        self._line(f"{self.label} epoch {record.step}: test accuracy {record.accuracy:.4f}, test loss {record.loss:.4f}, train loss {record.train_loss:.4f}, {record.seconds:.1f}s")
        self._task = None
        self._epoch = record.step + 1
        self._last_logged = -1
