import io
import logging

from rich.console import Console

from splitfed.learning.train import EpochRecord
from splitfed.scenarios.progress import Reporter


def test_plain_lines_when_not_a_terminal(caplog):
    caplog.set_level(logging.INFO, "splitfed.progress")
    with Reporter("demo", epochs=1, console=Console(file=io.StringIO(), force_terminal=False)) as reporter:
        assert not reporter.interactive
        for done in range(1, 101):
            reporter.batch(done, 100, 0.5)
        reporter.epoch(EpochRecord(1, 0.9, 0.3, 0.4, 1.0))
    lines = [r.getMessage() for r in caplog.records]
    assert sum("batch" in line for line in lines) == 11  # first batch, then every tenth
    assert any("test accuracy 0.9000" in line for line in lines)


def test_progress_bar_on_a_terminal():
    screen = io.StringIO()
    with Reporter("demo", epochs=1, console=Console(file=screen, force_terminal=True, width=100)) as reporter:
        reporter.batch(50, 100, 0.25)
        task = reporter._bar.tasks[0]
        assert (task.completed, task.total) == (50, 100)
        reporter.epoch(EpochRecord(1, 0.9, 0.3, 0.4, 1.0))
    assert "demo epoch 1/1" in screen.getvalue() and "test accuracy 0.9000" in screen.getvalue()
