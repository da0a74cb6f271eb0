"""The splitfed command line: `run` a whole scenario, `serve` one role, manage `keys`, draw a `report`, list `models` and their cut points,
`attack` a finished split run to measure what its server could learn.

Every `run` and `serve` command is generated from the scenario and role declarations: one flag
and one SPLITFED_* variable per settings field, so the CLI, the launcher and the Helm chart
cannot drift apart."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from splitfed import __version__, config
from splitfed.attack_cli import attack_app
from splitfed.cluster.commands import register as register_cluster_commands
from splitfed.commandline import ExitCode, check_outputs, command, err, fail, finish, guard
from splitfed.roles.registry import ROLES
from splitfed.scenarios.registry import SCENARIOS
from splitfed.sizing_cli import size_command

app = typer.Typer(help=__doc__, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
run_app = typer.Typer(help="Run a whole scenario and write its results.", no_args_is_help=True)
serve_app = typer.Typer(help="Run one long-lived service (the entrypoint of every image). Every option can also come from SPLITFED_<OPTION>.", no_args_is_help=True)
keys_app = typer.Typer(help="Party identities: ed25519 key pairs and the key-list file servers trust.", no_args_is_help=True)
app.add_typer(run_app, name="run")
app.add_typer(serve_app, name="serve")
app.add_typer(keys_app, name="keys")
app.add_typer(attack_app, name="attack")


def _version(value: bool) -> None:
    if value:
        print(f"splitfed {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """Train PyTorch models across parties that never share raw data."""


# -- commands generated from settings declarations ------------------------------------------


def _run_body(name: str) -> Callable[[dict[str, Any]], None]:
    def body(values: dict[str, Any]) -> None:
        from splitfed.roles.service import configure_logging
        from splitfed.scenarios import launch
        from splitfed.scenarios.progress import Reporter

        scenario = SCENARIOS[name]
        learning = guard(lambda: config.build(scenario.learning, values))
        settings = guard(lambda: config.build(scenario.run_settings, values))
        check_outputs(settings.out, getattr(settings, "save_model", None), plot=settings.plot)
        configure_logging(settings.log_level)
        with Reporter(scenario.label(learning, settings)) as reporter:
            result = guard(lambda: launch.run(scenario, learning, settings, reporter))
        finish(result, settings.out, settings.plot)

    return body


def _serve_body(name: str) -> Callable[[dict[str, Any]], None]:
    def body(values: dict[str, Any]) -> None:
        from splitfed.roles.service import serve

        guard(lambda: serve(ROLES[name], values))

    return body


for _scenario in SCENARIOS.values():
    _options = config.options(_scenario.learning, _scenario.run_settings)
    run_app.command(_scenario.name, help=_scenario.summary)(command(_options, _scenario.summary, _run_body(_scenario.name)))
for _role in ROLES.values():
    serve_app.command(_role.name, help=_role.summary)(command(_role.options(), _role.summary, _serve_body(_role.name)))


# -- keys -------------------------------------------------------------------------------------


@keys_app.command("generate")
def keys_generate(
    out: Annotated[Path, typer.Option(envvar="SPLITFED_KEYS_OUT", help="Folder for PARTY.key (private), PARTY.pub and key-list.json.")],
    workers: Annotated[int, typer.Option(envvar="SPLITFED_KEYS_WORKERS", help="Worker key pairs to make: worker-0 ... worker-(N-1).", min=0)] = 0,
    party: Annotated[Optional[list[str]], typer.Option(envvar="SPLITFED_KEYS_PARTY", help="Other parties (repeatable): NAME:ROLE, or a role name such as split-client.")] = None,
    server: Annotated[bool, typer.Option(envvar="SPLITFED_KEYS_SERVER", help="Also make the fedavg-server key pair.")] = True,
    force: Annotated[bool, typer.Option(envvar="SPLITFED_KEYS_FORCE", help="Replace key pairs that already exist.")] = False,
    max_samples: Annotated[Optional[int], typer.Option(envvar="SPLITFED_KEYS_MAX_SAMPLES", help="The most training samples each worker's updates may claim.", min=1)] = None,
) -> None:
    """Generate ed25519 key pairs and the key-list file that servers trust."""
    from splitfed.roles.fedavg import SERVER, worker_ids
    from splitfed.security import keys

    names = ([SERVER] if server else []) + worker_ids(workers) + list(party or [])
    if not names:
        raise fail("nothing to generate: give --workers N or --party NAME", ExitCode.BAD_INPUT)
    key_list = guard(lambda: keys.generate(out, names, force=force, max_samples=max_samples))
    err.print(f"wrote {len(names)} key pairs and {key_list}", highlight=False)


# -- report -----------------------------------------------------------------------------------


@app.command("report")
def report_command(
    results: Annotated[list[Path], typer.Argument(metavar="RESULTS", help="Results files written by splitfed run ... --out (one or more).", show_default=False)],
    out: Annotated[Path, typer.Option(envvar="SPLITFED_REPORT_OUT", help="Write the figure here (PNG).")],
    title: Annotated[Optional[str], typer.Option(envvar="SPLITFED_REPORT_TITLE", help="Figure title (default: the scenarios, data set and model).")] = None,
    label: Annotated[Optional[list[str]], typer.Option(envvar="SPLITFED_REPORT_LABEL", help="Legend label per results file, in order (repeatable; default: made from each run's config).")] = None,
) -> None:
    """Draw finished runs as one PNG: test accuracy, test and train loss per epoch or round, epsilon per round of runs with --dp, and traffic (needs the plots extra)."""
    from splitfed.observability import report

    check_outputs(out)
    if label and len(label) != len(results):
        raise fail(f"{len(label)} --label for {len(results)} results files: give one per file, or none", ExitCode.BAD_INPUT)
    guard(report.require)
    loaded = [guard(lambda path=path: report.read(path)) for path in results]
    guard(lambda: report.draw(loaded, out, labels=label or None, title=title, names=[str(path) for path in results]))
    for line in report.privacy_lines(loaded, labels=label or None, names=[str(path) for path in results]):
        err.print(line, highlight=False, markup=False)
    err.print(f"wrote {out} ({len(results)} runs)", highlight=False)


# -- models -----------------------------------------------------------------------------------


@app.command("models")
def models_command(
    cuts: Annotated[Optional[str], typer.Option(envvar="SPLITFED_MODELS_CUTS", metavar="MODEL", help="Show where MODEL can be cut: each cut point's activation and parameters on either side.")] = None,
    dataset: Annotated[str, typer.Option(envvar="SPLITFED_MODELS_DATASET", metavar="DATASET", help="The data set whose images the model takes (it fits the model's input to them).")] = "fashion-mnist",
    mode: Annotated[str, typer.Option(envvar="SPLITFED_MODELS_MODE", metavar="vanilla|u-shaped", help="Split mode: u-shaped keeps the last layer on the client.")] = "vanilla",
    out: Annotated[Optional[Path], typer.Option(envvar="SPLITFED_MODELS_OUT", help="Also write the cut points as JSON here.")] = None,
) -> None:
    """List the models --model takes; with --cuts MODEL, the cut points --cut-layer takes (an index, or the name of the layer to cut after)."""
    if cuts is None:
        _list_models()
        return
    from splitfed.learning import cutting, data, models
    from splitfed.learning.settings import SPLIT_MODES

    if mode not in SPLIT_MODES:
        raise fail(f"--mode {mode!r}: choose one of {', '.join(SPLIT_MODES)}", ExitCode.BAD_INPUT)
    check_outputs(out)
    meta = guard(lambda: data.info(dataset))
    model = guard(lambda: models.build(cuts, meta, seed=1))
    points = cutting.cut_points(model, meta.shape, mode)
    default = _default_cut(model, mode)
    Console().print(_cuts_table(cuts, meta, mode, points, default))
    if not points:
        err.print(f"{cuts} cannot be split in {mode} mode: no cut leaves weights to train on both sides", highlight=False, markup=False, soft_wrap=True)
    if out is not None:
        document = {"model": cuts, "dataset": dataset, "mode": mode, "input": list(meta.shape), "default": default, "cuts": [
            {"index": p.index, "after": p.name, "shape": list(p.shape), "floats": p.floats, "kib": p.floats * 4 / 1024,
             "client_params": p.client_params, "server_params": p.server_params} for p in points]}
        out.write_text(json.dumps(document, indent=2) + "\n")
        err.print(f"cut points in {out}", highlight=False, markup=False)


def _list_models() -> None:
    from splitfed.learning.settings import MODELS

    table = Table(title="models (--model)", title_justify="left")
    table.add_column("model", no_wrap=True)
    table.add_column("from")
    for name in MODELS:
        table.add_row(name, "splitfed")
    try:
        from splitfed.learning import vision

        for name in vision.names():
            table.add_row(name, "torchvision")
    except ValueError:
        table.caption = "torchvision is not installed: only the splitfed models are available"
    Console().print(table)


def _default_cut(model: Any, mode: str) -> int | None:
    """Where a run without --cut-layer cuts `model`, or None where that cut would be refused."""
    from splitfed.learning import cutting

    try:
        return cutting.cut(model, None, mode).cut_layer
    except ValueError:
        return None


def _cuts_table(name: str, meta: Any, mode: str, points: list, default: int | None) -> Table:
    """One row per cut point (learning.cutting.CutPoint); * marks the default."""
    table = Table(title=f"cut points of {name} on {meta.name} ({'x'.join(map(str, meta.shape))}), {mode}", title_justify="left")
    for column in ("cut", "after", "activation", "floats", "KiB", "client params", "server params"):
        table.add_column(column, justify="left" if column in ("after", "activation") else "right", no_wrap=True)
    for p in points:
        table.add_row(f"{p.index}{'*' if p.index == default else ''}", p.name, "x".join(map(str, p.shape)), f"{p.floats:,}",
                      f"{p.floats * 4 / 1024:,.1f}", f"{p.client_params:,}", f"{p.server_params:,}")
    table.caption = "activation: per sample at the cut (float32); * the default cut" if default else "activation: per sample at the cut (float32)"
    return table


# -- Kubernetes: launch SCENARIO, status, logs, delete (splitfed.cluster; its client is imported when they run) --

register_cluster_commands(app)


# -- size (splitfed/sizing_cli.py: the memory a role needs, for values.yaml) ------------------

app.command("size")(size_command)


def main() -> None:
    app(prog_name="splitfed")


if __name__ == "__main__":
    sys.exit(main())
