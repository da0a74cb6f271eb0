import io
import logging

from rich.console import Console

from splitfed.roles.declaration import Progress
from splitfed.scenarios.progress import Reporter

EPOCH = Progress("epoch", 1, 1, 0.4, {"step": 1, "accuracy": 0.9, "loss": 0.3, "train_loss": 0.4, "seconds": 1.0})


def test_plain_lines_when_not_a_terminal(caplog):
    caplog.set_level(logging.INFO, "splitfed.progress")
    with Reporter("demo", console=Console(file=io.StringIO(), force_terminal=False)) as reporter:
        assert not reporter.interactive
        for done in range(1, 101):
            reporter(Progress("batch", done, 100, 0.5))
        reporter(EPOCH)
    lines = [r.getMessage() for r in caplog.records]
    assert sum("batch" in line for line in lines) == 11  # first batch, then every tenth
    assert any("test accuracy 0.9000" in line for line in lines)


def test_progress_bar_on_a_terminal():
    screen = io.StringIO()
    with Reporter("demo", console=Console(file=screen, force_terminal=True, width=100)) as reporter:
        reporter(Progress("batch", 50, 100, 0.25))
        task = reporter._bar.tasks[0]
        assert (task.completed, task.total) == (50, 100)
        reporter(EPOCH)
    assert "demo epoch 1/1" in screen.getvalue() and "test accuracy 0.9000" in screen.getvalue()


def test_rounds_advance_the_bar_and_print_a_line():
    screen = io.StringIO()
    record = {"step": 2, "accuracy": 0.5, "loss": 1.0, "train_loss": 0.7, "seconds": 2.0}
    with Reporter("fed", console=Console(file=screen, force_terminal=True, width=100)) as reporter:
        reporter(Progress("round", 2, 10, 0.7, record))
        task = reporter._bar.tasks[0]
        assert (task.completed, task.total) == (2, 10)
    assert "fed round 2/10: test accuracy 0.5000" in screen.getvalue()
