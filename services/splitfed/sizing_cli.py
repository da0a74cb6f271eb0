"""`splitfed size`: the memory a role needs, as a table for people, a values.yaml snippet to paste
(or pass to helm with -f) and JSON for machines. The estimate itself is `splitfed.sizing`.

Its learning options are the run settings' own declarations (name, help, choices, bounds), so
they cannot drift from `splitfed run`; they are taken as text and parsed by the declaration, so a
bad value is one line on stderr and exit code 2, as everywhere in the CLI.

A role that cannot be sized from here (its task or data cannot be read, its model cannot be
probed: `sizing.NotSized`) is reported as not sized, with the reason, in the table, the JSON
(`not_sized`) and the values snippet (a comment in place of its resources), and the other roles
are sized as usual: exit code 0, as for the split roles left out of a model that cannot be split.
When the one role asked for (ROLE or --role) cannot be sized, or cannot be split, there is
nothing to print: one error line, exit code 2."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from splitfed import config, sizing
from splitfed.commandline import ExitCode, check_outputs, command, err, fail
from splitfed.learning.settings import FederatedSettings, PeerSettings, SplitSettings

# The run settings `size` reads, in the order --help shows them.
LEARNING_OPTIONS = ("task", "model", "dataset", "data_dir", "label_column", "classes", "image_size", "mean", "std", "batch_size", "eval_batch_size",
                    "optimizer", "limit", "test_limit", "holdout", "cut_layer", "mode", "workers", "peers", "partition")
_DECLARED = {option.name: option for option in config.options(PeerSettings, SplitSettings, FederatedSettings)}
OPTIONS = [_DECLARED[name] for name in LEARNING_OPTIONS]
ENV_PREFIX = "SPLITFED_SIZE_"


def _own_parameters() -> list[inspect.Parameter]:
    def keyword(name: str, default: Any, annotation: Any) -> inspect.Parameter:
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)

    return [
        keyword("role_argument", None, Annotated[Optional[str], typer.Argument(
            metavar="ROLE", show_default=False, help=f"One role ({', '.join(sizing.ROLE_NAMES)}; default: every role), or --role.")]),
        keyword("role", None, Annotated[Optional[str], typer.Option(
            envvar=ENV_PREFIX + "ROLE", metavar="|".join(sizing.ROLE_NAMES), help="One role (default: every role).")]),
        keyword("gpu", False, Annotated[bool, typer.Option(
            envvar=ENV_PREFIX + "GPU", help="Run on a GPU (the chart's gpu.enabled): the -cuda image's CUDA build, and the GPU memory the model needs.")]),
        keyword("torch_build", None, Annotated[Optional[str], typer.Option(
            envvar=ENV_PREFIX + "TORCH_BUILD", metavar="|".join(sizing.TORCH_BUILDS),
            help="torch build in the role's image (default: cpu, as ci/images.sh builds them; cuda with --gpu).")]),
        keyword("out", None, Annotated[Optional[Path], typer.Option(
            envvar=ENV_PREFIX + "OUT", help="Write the estimates as JSON here (- for stdout, instead of the values snippet).")]),
    ]


def size(values: dict[str, Any], *, role_argument: str | None, role: str | None, gpu: bool, torch_build: str | None, out: Path | None) -> None:
    """`splitfed size`, given its learning options' values and its own options."""
    if role_argument is not None and role is not None and role_argument != role:
        raise fail(f"role {role_argument!r} and --role {role!r}: give one", ExitCode.BAD_INPUT)
    role = role_argument if role_argument is not None else role
    if role is not None and role not in sizing.ROLE_NAMES:
        raise fail(f"--role {role!r}: choose one of {', '.join(sizing.ROLE_NAMES)}", ExitCode.BAD_INPUT)
    check_outputs(None if str(out) == "-" else out)
    roles = [role] if role else [name for name in sizing.ROLE_NAMES if not (gpu and name not in sizing.GPU_ROLES)]
    estimates, skipped, not_sized = [], {}, {}
    for name in roles:
        try:
            estimates.append(sizing.estimate_from(name, values, gpu=gpu, torch_build=torch_build))
        except sizing.CannotSplit as exc:
            if role is not None:
                raise fail(str(exc), ExitCode.BAD_INPUT) from None
            skipped[name] = str(exc)
        except ValueError as exc:
            raise fail(str(exc), ExitCode.BAD_INPUT) from None  # all roles asked for: a model that cannot be split still sizes FedAvg
        except sizing.NotSized as exc:
            if role is not None:
                raise fail(f"{name}: not sized: {exc}", ExitCode.BAD_INPUT) from None
            not_sized[name] = str(exc)
    snippet = values_snippet(estimates, not_sized)
    if out is not None:
        document = {"estimates": [e.as_dict() for e in estimates], "skipped": skipped, "not_sized": not_sized,
                    "values": {sizing.values_key(e.role): e.resources() for e in estimates}}
        text = json.dumps(document, indent=2) + "\n"
        if str(out) == "-":
            print(text, end="")
        else:
            out.write_text(text)
    err.print(table(estimates, not_sized))
    for name, reason in skipped.items():
        err.print(f"{name} left out: {reason}", highlight=False, markup=False)
    for name, reason in not_sized.items():
        err.print(f"{name} not sized: {reason}", highlight=False, markup=False)
    for e in estimates:
        if e.gpu is not None:
            err.print(f"{e.role}: nvidia.com/gpu: 1, GPU memory {e.gpu[1]:.0f} MiB ({e.gpu[0]:.0f}-{e.gpu[2]:.0f})", highlight=False, markup=False)
    for note in sorted({note for e in estimates for note in e.notes}):
        err.print(f"note: {note}", highlight=False, markup=False)
    if out is None:
        print(snippet, end="")
    elif str(out) != "-":
        err.print(f"estimates in {out}", highlight=False, markup=False)


def table(estimates: list[sizing.Estimate], not_sized: dict[str, str] | None = None):  # noqa: ANN201 (rich.table.Table, imported here)
    """One row per role, in MiB: base (interpreter and torch import), data, model (parameters,
    gradients, optimizer state), act (activations), other (messages and framework overhead; apart
    in the JSON), then the estimated peak and its range; * marks a peak while reading the data.
    A role that could not be sized has a row saying so (its reason follows the table)."""
    from rich import box
    from rich.table import Table

    first = estimates[0].settings if estimates else {}
    builds = "/".join(sorted({e.torch_build for e in estimates if e.torch_build})) or "no"
    title = (f"MiB: {first.get('task') or first.get('model')}, {first.get('dataset')}, batch {first.get('batch_size')}, eval batch "
             f"{first.get('eval_batch_size')}, {first.get('optimizer')}, {builds} torch") if first else "MiB"
    grid = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1), collapse_padding=True)
    grid.add_column("role", no_wrap=True)
    for column in ("base", "data", "model", "act", "other", "peak", "range", "request", "limit"):
        grid.add_column(column, justify="right", no_wrap=True)
    rows = {}
    for e in estimates:
        columns = e.columns()
        peak = f"{e.mib:.0f}" + ("*" if e.peak.name == "loading data" else "")
        rows[e.role] = [e.role, *(f"{columns[kind]:.0f}" for kind in ("baseline", "data", "model", "activations")),
                        f"{columns['messages'] + columns['overhead']:.0f}", peak, f"{e.low_mib:.0f}-{e.high_mib:.0f}", e.request, e.limit]
    for role in not_sized or {}:
        rows[role] = [role, *["-"] * 5, "not sized", *["-"] * 3]
    for role in sorted(rows, key=sizing.ROLE_NAMES.index):
        grid.add_row(*rows[role])
    if any(e.peak.name == "loading data" for e in estimates):
        grid.caption, grid.caption_justify = "* while reading its data", "left"
    return grid


def values_snippet(estimates: list[sizing.Estimate], not_sized: dict[str, str] | None = None) -> str:
    """values.yaml lines for the estimates (request = estimate, limit = 1.25 x estimate, both
    rounded up to 32 Mi, as the chart's own figures); a comment for each role not sized."""
    lines = [f"# splitfed size: request = estimate, limit = {sizing.LIMIT_MARGIN:g} x estimate (at least its high bound), rounded up to {sizing.ROUND_TO_MIB} Mi"]
    for e in estimates:
        lines += [f"{sizing.values_key(e.role)}:", "  resources:", "    requests:", f"      memory: {e.request}", "    limits:", f"      memory: {e.limit}"]
        if e.gpu is not None:
            lines += ["  gpu:", f"    enabled: true  # the chart adds limits nvidia.com/gpu: 1; estimated GPU memory {e.gpu[1]:.0f} MiB ({e.gpu[0]:.0f}-{e.gpu[2]:.0f})"]
    for role, reason in (not_sized or {}).items():
        lines.append(f"# {sizing.values_key(role)}: not sized ({' '.join(reason.split())}); its resources are the chart's")
    return "\n".join(lines) + "\n"


size_command = command(OPTIONS, (
    "Estimate a role's peak memory (interpreter and torch, data, parameters, gradients, optimizer state, activations, messages) "
    "and print the requests and limits for values.yaml; --gpu adds the GPU memory."
), size, own=_own_parameters(), env_prefix=ENV_PREFIX)
