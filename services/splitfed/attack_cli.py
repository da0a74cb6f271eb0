"""`splitfed attack inversion|labels RESULTS.json`: what the server of a finished split run could
learn of its client's inputs and labels, as a table for people and JSON (--out) for machines.
The attacks themselves are `splitfed.learning.attacks`.

RESULTS is what `splitfed run split ... --save-model FILE --out RESULTS` writes: the run's
settings, and the path of its saved model (both halves, safetensors: nothing is unpickled).
Torch is imported when a command runs, so that loading the command line does not load it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from splitfed.commandline import ExitCode, check_outputs, err, fail, guard
from splitfed.learning.settings import DEVICE_PATTERN

ENV_PREFIX = "SPLITFED_ATTACK_"
HOW_TO_MAKE = "make one with splitfed run split ... --save-model FILE --out RESULTS"

attack_app = typer.Typer(help="Attack a finished split run as its server could: invert the client's inputs, infer its labels.", no_args_is_help=True)

Results = Annotated[Path, typer.Argument(metavar="RESULTS", help="The results file of a split run made with --save-model (splitfed run split ... --out).", show_default=False)]
Out = Annotated[Optional[Path], typer.Option(envvar=ENV_PREFIX + "OUT", help="Also write the figures as JSON here.")]
Seed = Annotated[int, typer.Option(envvar=ENV_PREFIX + "SEED", help="The attacker's seed: every draw of the attack (its decoder, the defences' noise it simulates).")]
Device = Annotated[str, typer.Option(envvar=ENV_PREFIX + "DEVICE", metavar="auto|cpu|cuda[:N]", help="Where the attack computes.")]


@dataclasses.dataclass
class Run:
    """A finished split run, as its results file describes it."""

    path: Path
    results: dict[str, Any]
    settings: Any  # learning.settings.SplitSettings

    def described(self) -> dict[str, Any]:
        """The run, as the attack's JSON names it."""
        from splitfed.learning.attacks import DEFENCE_FIELDS

        config = self.results["config"]
        return {"results": str(self.path), "dataset": config.get("dataset"), "model": config.get("model"), "task": config.get("task"),
                "mode": self.settings.mode, "defences": {name: config.get(name) for name in DEFENCE_FIELDS}}


def read_run(path: Path, device: str) -> Run:
    """The results file at `path`, checked to be a split run's; its settings computing on `device`."""
    import re

    from splitfed import config
    from splitfed.learning.settings import SplitSettings
    from splitfed.observability import report

    if not re.fullmatch(DEVICE_PATTERN, device):
        raise fail(f"--device {device!r}: give auto, cpu, cuda or cuda:N", ExitCode.BAD_INPUT)
    results = guard(lambda: report.read(path))
    if results.get("scenario") != "split":
        raise fail(f"{path}: a {results.get('scenario', 'unknown')} run's results; attacks read a split run's ({HOW_TO_MAKE})", ExitCode.BAD_INPUT)
    if not isinstance(results.get("config"), dict):
        raise fail(f"{path}: the results hold no config (the run's settings)", ExitCode.BAD_INPUT)
    settings = guard(lambda: config.build(SplitSettings, results["config"]))
    # The attack computes in fp32 wherever the run did.
    return Run(path, results, dataclasses.replace(settings, device=device, precision="fp32", data_on_device=False))


def load_victim(run: Run) -> Any:
    """The run's model, rebuilt from its model file (learning.attacks.Victim)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from splitfed.learning import attacks

    model_file = run.results.get("model_file")
    if not model_file or not isinstance(model_file, str):
        raise fail(f"{run.path}: the run saved no model (no model_file); {HOW_TO_MAKE}", ExitCode.BAD_INPUT)
    if not Path(model_file).is_file():
        raise fail(f"{run.path}: its model file {model_file} is not there", ExitCode.BAD_INPUT)
    try:
        state = load_file(model_file)  # safetensors: tensors only, no code runs
    except (SafetensorError, OSError) as exc:
        raise fail(f"{model_file}: not a safetensors model file ({exc})", ExitCode.BAD_INPUT) from None
    return guard(lambda: attacks.rebuild(run.settings, state))


def _figure(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _defences(defences: dict[str, Any]) -> str:
    """The run's defences in a few words, for a table's title."""
    shown = []
    if defences.get("activation_clip") is not None:
        shown.append(f"clip {defences['activation_clip']:g}" + (f" noise {defences['activation_noise']:g}" if defences.get("activation_noise") else ""))
    if defences.get("nopeek_weight"):
        shown.append(f"NoPeek {defences['nopeek_weight']:g}")
    if defences.get("gradient_defence") not in (None, "none"):
        shown.append(f"gradients {defences['gradient_defence']}" + (f" {defences['gradient_noise']:g}" if defences["gradient_defence"] == "noise" else ""))
    if defences.get("label_dp") is not None:
        shown.append(f"label DP eps {defences['label_dp']:g}")
    return ", ".join(shown) or "none"


def _write(document: dict[str, Any], out: Path | None) -> None:
    if out is not None:
        out.write_text(json.dumps(document, indent=2) + "\n")
        err.print(f"figures in {out}", highlight=False, markup=False)


@attack_app.command("inversion")
def inversion_command(
    results: Results,
    public_samples: Annotated[int, typer.Option(envvar=ENV_PREFIX + "PUBLIC_SAMPLES", min=1, help="The attacker's public data: the first N of the training set.")] = 10000,
    victims: Annotated[int, typer.Option(envvar=ENV_PREFIX + "VICTIMS", min=1, help="Reconstruct the first N of the client's test set.")] = 1000,
    epochs: Annotated[int, typer.Option(envvar=ENV_PREFIX + "EPOCHS", min=1, help="Passes of the decoder's training over the public data.")] = 20,
    grid: Annotated[Optional[Path], typer.Option(envvar=ENV_PREFIX + "GRID", help="Draw the first 16 victims (top) over their reconstructions (bottom) here (PNG; images only).")] = None,
    seed: Seed = 0,
    device: Device = "cpu",
    out: Out = None,
) -> None:
    """Model inversion (He et al. 2019): train a decoder from cut activations to inputs on public data passed through the run's client layers and activation defence, then reconstruct the client's test inputs from what the server receives. MSE in normalised units, SSIM on 0..1 pixels (images), beside the mean public input as a baseline."""
    from splitfed.learning import attacks

    check_outputs(out, grid)
    run = read_run(results, device)
    victim = load_victim(run)
    test = guard(lambda: victim.task.data(victim.context, train=False))
    public = guard(lambda: attacks.public_data(victim))
    if grid is not None and attacks.pixel_view(test, victim.settings.dataset) is None:
        raise fail("--grid draws images, and this run's inputs are not images of a known pixel range", ExitCode.BAD_INPUT)
    found = attacks.invert(victim, public, test, public_samples, victims, epochs, seed)
    document = {"attack": "inversion", "run": run.described(), "cut_layer": victim.parts.cut_layer, "seed": seed, **found.as_dict()}
    table = Table(title=f"model inversion of {results.name}: cut {victim.parts.cut_layer} ({victim.settings.mode}), defences: {_defences(document['run']['defences'])}",
                  title_justify="left")
    for column in ("attacker", "MSE", "SSIM"):
        table.add_column(column, justify="left" if column == "attacker" else "right", no_wrap=True)
    table.add_row(f"decoder ({found.public_samples} public samples, {found.epochs} epochs)", f"{found.decoder.mse:.4f}", _figure(found.decoder.ssim))
    table.add_row("baseline: the mean public input", f"{found.baseline.mse:.4f}", _figure(found.baseline.ssim))
    table.caption = f"{found.victims} victims (test samples); MSE in normalised units; SSIM 1: a perfect copy, the baseline's: what no leak looks like"
    Console().print(table)
    _write(document, out)
    if grid is not None:
        attacks.grid_image(found.pixels(found.originals), found.pixels(found.reconstructions)).save(grid, format="PNG")
        err.print(f"grid in {grid}", highlight=False, markup=False)


@attack_app.command("labels")
def labels_command(
    results: Results,
    samples: Annotated[int, typer.Option(envvar=ENV_PREFIX + "SAMPLES", min=1, help="u-shaped: attack the first N of the client's training samples.")] = 5000,
    known: Annotated[int, typer.Option(envvar=ENV_PREFIX + "KNOWN", min=1, help="u-shaped: labels the attacker knows per class (the first of each), for the cosine attack.")] = 1,
    seed: Seed = 0,
    device: Device = "cpu",
    out: Out = None,
) -> None:
    """Label inference by the server. u-shaped: from the gradients the client returns (through its gradient defence), the norm attack (two classes: AUC) and the cosine attack (AUC for two classes, else accuracy; it knows --known labels per class). vanilla: the server gets the labels, true as often as --label-dp left them."""
    from splitfed.learning import attacks

    check_outputs(out)
    run = read_run(results, device)
    if run.settings.mode == "u-shaped":
        victim = load_victim(run)
        training = guard(lambda: victim.task.data(victim.context, train=True))
        gradients, labels = attacks.returned_gradients(victim, training, samples, seed)
        guesses = guard(lambda: attacks.infer_labels(gradients, labels, victim.classes, known))
    else:
        counts = run.results.get("label_dp")
        if run.settings.label_dp is not None and counts is None:
            raise fail(f"{run.path}: a run with --label-dp whose results hold no label_dp (the client's count of the true labels it sent)", ExitCode.BAD_INPUT)
        _, task, context = guard(lambda: attacks.client_of(run.settings))
        training = guard(lambda: task.data(context, train=True))
        guesses = [guard(lambda: attacks.received_labels(counts, training.labels))]
    document = {"attack": "labels", "run": run.described(), "seed": seed, **({"known_per_class": known} if run.settings.mode == "u-shaped" else {}),
                "guesses": [dataclasses.asdict(guess) for guess in guesses]}
    table = Table(title=f"label inference on {results.name}: {run.settings.mode}, defences: {_defences(document['run']['defences'])}", title_justify="left")
    two_classes = any(guess.auc is not None for guess in guesses)  # the AUCs: two classes only
    for column in ("attack", "samples", *(("AUC",) if two_classes else ()), "accuracy", "chance"):
        table.add_column(column, justify="left" if column == "attack" else "right", no_wrap=True)
    for guess in guesses:
        table.add_row(guess.method, str(guess.samples), *((_figure(guess.auc),) if two_classes else ()), _figure(guess.accuracy), _figure(guess.chance))
    notes = ["AUC: 0.5 is chance, 1 tells every label apart"] if two_classes else []
    notes.append("chance: the largest class's share")
    notes.append(f"cosine knows {known} labelled sample{'s' if known > 1 else ''} per class (not scored)" if run.settings.mode == "u-shaped" else "received: the labels the server was sent")
    table.caption = "; ".join(notes)
    Console().print(table)
    _write(document, out)
