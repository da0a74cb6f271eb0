"""What every splitfed command shares: errors as one line on stderr with an exit code, commands
generated from settings declarations, the checks of output paths before a run, and the table,
results file and figure after one.

cli.py, cluster/commands.py and sizing_cli.py build on it; it imports none of them."""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Sequence
from enum import IntEnum
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from splitfed import config

err = Console(stderr=True)

T = TypeVar("T")


class ExitCode(IntEnum):
    """The exit codes of every command."""

    BAD_INPUT = 2  # an option, a values or key file, an output path, a release that already ran or is not there
    TIMEOUT = 3  # a role's --timeout, or launch's --wait-timeout
    RUN_FAILED = 4  # the broker, the scenario's processes, or a pod of the run failed
    REFUSED = 5  # a party refused the run or aborted it
    CHECKPOINT = 6  # a checkpoint that cannot be resumed from
    NO_CLUSTER = 7  # no reachable cluster, no helm, no kubernetes client, no chart, or helm failed
    INTERRUPTED = 130  # Ctrl-C


# (exception types, exit code) pairs; the first pair whose types match an error decides its code.
Failures = Sequence[tuple[tuple[type[BaseException], ...], ExitCode]]


def fail(message: str, code: ExitCode) -> typer.Exit:
    """Print `message` as the error line; the caller raises what this returns."""
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, markup=True, soft_wrap=True)  # a message's own brackets are text
    return typer.Exit(int(code))


def run_failures() -> Failures:
    """The expected failures of a run, a role or their inputs. Imported here, when a command
    runs, so that loading the command line does not load the roles and the transport."""
    from splitfed.errors import DataError, DeviceError, Refused, RunAborted, TaskError
    from splitfed.observability.report import PlotsUnavailable
    from splitfed.roles.endpoint import RoleTimeout
    from splitfed.roles.fedavg import CheckpointError
    from splitfed.scenarios.launch import ScenarioError
    from splitfed.security.keys import KeyFileError
    from splitfed.transport import TransportError

    return [
        ((DataError, DeviceError, TaskError, KeyFileError, ValueError, PlotsUnavailable), ExitCode.BAD_INPUT),
        ((CheckpointError,), ExitCode.CHECKPOINT),
        ((RoleTimeout,), ExitCode.TIMEOUT),
        ((TransportError, ScenarioError), ExitCode.RUN_FAILED),
        ((Refused, RunAborted), ExitCode.REFUSED),
    ]


def guard(fn: Callable[[], T], failures: Failures | None = None) -> T:
    """fn(), with its expected failures (`failures`, by default a run's) turned into one line on
    stderr and their exit code; any other error goes on as it is."""
    try:
        return fn()
    except Exception as exc:
        for types, code in run_failures() if failures is None else failures:
            if isinstance(exc, types):
                raise fail(str(exc), code) from None
        raise


# -- commands generated from settings declarations ------------------------------------------


def parameter(option: config.Option, env_prefix: str | None = None) -> inspect.Parameter:
    """Flags are taken as text and parsed by the declaration, so that every bad value, from a flag
    or a variable, gets the same one-line error; booleans are plain on/off flags, and one that is
    on by default also has its --no- form to turn it off. Its variable is the option's own, or
    `env_prefix` and the option's name."""
    envvar = option.env if env_prefix is None else env_prefix + option.name.upper()
    if option.type is bool:
        info = typer.Option(f"{option.flag}/--no-{option.flag[2:]}" if option.default else option.flag, envvar=envvar, help=option.help)
        return inspect.Parameter(option.name, inspect.Parameter.KEYWORD_ONLY, default=option.default, annotation=Annotated[bool, info])
    shown = "required" if option.required else ("" if option.default is None else str(option.default))
    info = typer.Option(option.flag, envvar=envvar, help=option.help, metavar=option.metavar or option.kind, show_default=shown or False)
    return inspect.Parameter(option.name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[Optional[str], info])


def command(options: Sequence[config.Option], summary: str, body: Callable[..., None], *, own: Sequence[inspect.Parameter] = (),
            env_prefix: str | None = None) -> Callable[..., None]:
    """A typer command taking exactly `options`, then the command's `own` typer parameters; it
    calls body(values, **own values) with the options' values by field name (options not given
    are left out, so the settings' own defaults apply)."""
    by_name = {option.name: option for option in options}

    def generated(**given: Any) -> None:
        own_values = {extra.name: given.pop(extra.name) for extra in own}
        values = {}
        for name, value in given.items():
            if isinstance(value, str):
                values[name] = guard(lambda option=by_name[name], value=value: option.parse(value))
            elif value is not None:
                values[name] = value
        body(values, **own_values)

    parameters = [parameter(option, env_prefix) for option in options] + list(own)
    generated.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    generated.__annotations__ = {extra.name: extra.annotation for extra in parameters}
    generated.__doc__ = summary
    return generated


# -- before and after a run -------------------------------------------------------------------


def check_outputs(*paths: Path | None, plot: Path | None = None) -> None:
    """Before a run (not after it): every output can be written, and a figure can be drawn."""
    from splitfed.roles.service import output_problem

    for path in (*paths, plot):
        if path is not None and (problem := output_problem(path)):
            raise fail(problem, ExitCode.BAD_INPUT)
    if plot:
        from splitfed.observability import report

        guard(report.require)


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"  # n/a: an epoch whose evaluator went silent


def _write_results(result: dict, out: Path | None) -> None:
    if out:
        out.write_text(json.dumps(result, indent=2) + "\n")
    from splitfed.observability import report  # matplotlib only when it draws

    several = any("included" in record for record in result["history"])  # splitnn: which clients each epoch had
    private = bool(report.privacy_curve(result))  # --dp: epsilon spent by each round
    table = Table(title=f"splitfed {result['scenario']}")
    for column in ("step", "test accuracy", "test loss", "train loss", "seconds", *(("epsilon",) if private else ()),
                   *(("clients", "missing") if several else ())):
        table.add_column(column, justify="right")
    for record in result["history"]:
        epsilon = (_epsilon(record.get("epsilon")),) if private else ()
        clients = (str(len(record["included"])), ", ".join(record["missing"]) or "-") if several else ()
        table.add_row(str(record["step"]), _number(record["accuracy"]), _number(record["loss"]), _number(record["train_loss"]), f"{record['seconds']:.1f}",
                      *epsilon, *clients)
    if calibrated := result.get("calibration"):  # fedavg --calibration: the model the run leaves
        table.add_row("calibrated", _number(calibrated["accuracy"]), _number(calibrated["loss"]), _number(calibrated["train_loss"]), f"{calibrated['seconds']:.1f}",
                      *((_epsilon(calibrated.get("epsilon")),) if private else ()))
    err.print(table)
    err.print(f"accuracy {_number(result['accuracy'])}  loss {_number(result['loss'])}  wall {result['wall_seconds']:.1f}s  "
              f"traffic {result['traffic']['messages']} messages / {result['traffic']['bytes'] / 1e6:.1f} MB"
              + (f"  results in {out}" if out else ""), highlight=False)
    if spent := report.privacy_line(result):
        err.print(f"privacy: {spent}", highlight=False, markup=False)


def _epsilon(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def finish(result: dict, out: Path | None, plot: Path | None) -> None:
    """What `run` and `launch` do with a run's result: the table, the results file, the figure."""
    _write_results(result, out)
    if plot:
        from splitfed.observability import report

        guard(lambda: report.draw([result], plot))
        err.print(f"figure in {plot}", highlight=False)
