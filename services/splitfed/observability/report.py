"""Figures of finished runs, from their results files (`splitfed run ... --out`): test accuracy and
loss per epoch or round for every run on shared axes, the privacy each run spent (--dp: epsilon
per round, when a run's history holds it), and what each run sent over the wire.

Only this module imports matplotlib, and only when it draws (the `plots` extra, Agg backend), so
the rest of splitfed and the torch-free relay never load it."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EXTRA = "plots"  # pyproject.toml's optional dependencies that bring matplotlib
# Config fields that never tell runs apart (a session id differs every time) or say nothing of learning.
IGNORED = frozenset({"session", "data_dir", "eval_batch_size"})
# The fields that name a run of each scenario when nothing else does (a report of one run).
HEADLINE = {"fedavg": ("strategy", "partition", "workers"), "split": ("mode",), "centralized": ()}
# Fields shown in a label by value alone, and the order fields appear in labels.
BARE = frozenset({"strategy", "partition", "mode", "rule"})
ORDER = ("strategy", "partition", "workers", "mode", "model", "dataset", "rule", "optimizer", "lr")
MAX_LABEL_PARTS = 4


class PlotsUnavailable(RuntimeError):
    """matplotlib is not installed: the message says which extra brings it."""


def require() -> Any:
    """matplotlib's pyplot on the Agg backend (no display needed); PlotsUnavailable without it."""
    try:
        import matplotlib
    except ImportError:
        raise PlotsUnavailable(f"drawing figures needs matplotlib: pip install 'splitfed[{EXTRA}]' (or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read(path: Path) -> dict:
    """One results file, checked; ValueError says what is wrong with it."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except (IsADirectoryError, UnicodeDecodeError):
        raise ValueError(f"{path}: not a splitfed results file (not JSON text)") from None
    except OSError as exc:
        raise ValueError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    try:
        result = json.loads(text)
    except ValueError:
        raise ValueError(f"{path}: not a splitfed results file (not JSON)") from None
    check(result, str(path))
    return result


def check(result: Any, name: str = "results") -> None:
    """ValueError unless `result` is what `splitfed run --out` (or a lead role's `--out`) writes,
    with at least one finished epoch or round."""
    if not isinstance(result, dict) or not ("history" in result or "scenario" in result):
        raise ValueError(f"{name}: not a splitfed results file (it has no 'scenario' or 'history'; write one with splitfed run ... --out)")
    history = result.get("history")
    if not history:
        raise ValueError(f"{name}: the results hold no history (no epoch or round finished)")
    if not isinstance(history, list):
        raise ValueError(f"{name}: not a splitfed results file ('history' is not a list of records)")
    for index, record in enumerate(history):
        if not isinstance(record, dict) or not all(_is_number(record.get(key)) for key in ("step", "accuracy", "loss")):
            raise ValueError(f"{name}: not a splitfed results file (history record {index + 1} lacks a numeric step, accuracy or loss)")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# -- labels -----------------------------------------------------------------------------------


def _shown(key: str, value: Any) -> str:
    if key in BARE:
        return str(value)
    if key == "workers":
        return f"{value} workers"
    return f"{key.replace('_', '-')} {value}"


def _key_order(key: str) -> tuple[int, str]:
    return (ORDER.index(key) if key in ORDER else len(ORDER), key)


def run_labels(results: Sequence[dict], names: Sequence[str] | None = None) -> list[str]:
    """A short legend label per run from its config: the scenario (unless every run shares it:
    the title says it), then the settings that tell it apart from the other runs (or, alone,
    the ones that name its kind of run)."""
    configs = [result.get("config") if isinstance(result.get("config"), dict) else {} for result in results]
    differing = set()
    for key in {key for config in configs for key in config} - IGNORED:
        values = {json.dumps(config[key], sort_keys=True) for config in configs if key in config}
        if len(values) > 1:
            differing.add(key)
    scenarios = [result.get("scenario") or (Path(names[index]).stem if names else f"run {index + 1}") for index, result in enumerate(results)]
    shared = len(results) > 1 and len(set(scenarios)) == 1
    found = []
    for scenario, config in zip(scenarios, configs):
        keys = sorted(differing & config.keys(), key=_key_order)
        if not keys and len(results) == 1:
            keys = [key for key in HEADLINE.get(scenario, ()) if key in config]
        parts = [_shown(key, config[key]) for key in keys]
        if len(parts) > MAX_LABEL_PARTS:
            parts = [*parts[:MAX_LABEL_PARTS], "…"]
        if shared and parts:
            found.append(", ".join(parts))
        else:
            found.append(f"{scenario} ({', '.join(parts)})" if parts else scenario)
    made = list(found)
    for index, label in enumerate(made):  # runs nothing tells apart: number them
        if made.count(label) > 1:
            found[index] = f"{label} #{made[:index + 1].count(label)}"
    return found


def _title(results: Sequence[dict]) -> str:
    scenarios = sorted({str(result.get("scenario", "run")) for result in results})
    configs = [result.get("config") or {} for result in results]
    common = [f"{key} {configs[0][key]}" for key in ("dataset", "model") if all(config.get(key) == configs[0].get(key) for config in configs) and key in configs[0]]
    return f"splitfed {' vs '.join(scenarios)}" + (f" — {', '.join(common)}" if common else "")


def _step_name(results: Sequence[dict]) -> str:
    kinds = {"round" if result.get("scenario") == "fedavg" or "contributors" in result else "epoch" for result in results}
    return " / ".join(sorted(kinds))


# -- differential privacy ---------------------------------------------------------------------


def privacy_curve(result: dict) -> list[tuple[float, float]]:
    """(step, epsilon) of each record of a run's history that says what privacy it had spent by
    then (--dp); empty for a run without DP."""
    history = result.get("history") if isinstance(result.get("history"), list) else []
    return [(record["step"], record["epsilon"]) for record in history if isinstance(record, dict) and _is_number(record.get("epsilon"))]


def privacy(result: dict) -> dict | None:
    """What a run spent of its privacy (--dp): {"epsilon", "delta", "stopped"}, from the results'
    `dp` (what the run ended with), else from the last epsilon its history holds and its
    config's dp_delta; None for a run without DP. epsilon is None where no round said it (dp
    sample with no report); stopped is why the run ended before its last round ("" if it did not)."""
    dp = result.get("dp") if isinstance(result.get("dp"), dict) else None
    curve = privacy_curve(result)
    if dp is None and not curve:
        return None
    dp = dp or {}
    config = result.get("config") if isinstance(result.get("config"), dict) else {}
    epsilon = dp["epsilon"] if _is_number(dp.get("epsilon")) else (curve[-1][1] if curve else None)
    delta = next((value for value in (dp.get("delta"), config.get("dp_delta")) if _is_number(value)), None)
    stopped = dp.get("stopped") if isinstance(dp.get("stopped"), str) else ""
    return {"epsilon": epsilon, "delta": delta, "stopped": stopped}


def privacy_line(result: dict) -> str | None:
    """One line on what a run spent of its privacy, as `run` and `report` print it:
    "epsilon 9.01 at delta 1e-05 after 3 rounds; stopped early: ..."; None for a run without DP."""
    spent = privacy(result)
    if spent is None:
        return None
    line = "epsilon " + ("not reported" if spent["epsilon"] is None else f"{spent['epsilon']:.4g}")
    if spent["delta"] is not None:
        line += f" at delta {spent['delta']:g}"
    history = result.get("history") if isinstance(result.get("history"), list) else []
    if history:
        line += f" after {len(history)} {_step_name([result])}{'s' if len(history) > 1 else ''}"
    if spent["stopped"]:
        line += f"; stopped early: {spent['stopped']}"
    return line


def privacy_lines(results: Sequence[dict], labels: Sequence[str] | None = None, names: Sequence[str] | None = None) -> list[str]:
    """"LABEL: privacy line" for each run with DP (labels as the figure's legend)."""
    legend = list(labels) if labels is not None else run_labels(results, names)
    return [f"{label}: {line}" for result, label in zip(results, legend) if (line := privacy_line(result))]


# -- the figure -------------------------------------------------------------------------------


def draw(results: Sequence[dict], out: Path, labels: Sequence[str] | None = None, title: str | None = None, names: Sequence[str] | None = None) -> Path:
    """Write a PNG of `results` (loaded results dicts) to `out`: test accuracy, test (solid) and
    train (dashed) loss per epoch or round, one colour per run, the epsilon spent per round when
    a run has DP, and each run's traffic. `names` (file names) appear in error messages; `labels`
    replace the labels made from the configs."""
    figure = draw_figure(results, labels=labels, title=title, names=names)
    out = Path(out)
    try:
        figure.savefig(out, format="png")
    finally:
        require().close(figure)
    return out


def draw_figure(results: Sequence[dict], labels: Sequence[str] | None = None, title: str | None = None, names: Sequence[str] | None = None) -> Any:
    """The matplotlib Figure that `draw` writes (the caller closes it)."""
    if not results:
        raise ValueError("no results to draw")
    names = list(names) if names is not None else [f"results {index + 1}" for index in range(len(results))]
    for result, name in zip(results, names):
        check(result, name)
    if labels is not None and len(labels) != len(results):
        raise ValueError(f"{len(labels)} labels for {len(results)} results")
    legend = list(labels) if labels is not None else run_labels(results, names)
    plt = require()
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    colours = plt.get_cmap("tab10").colors
    step = _step_name(results)
    private = any(privacy_curve(result) for result in results)
    ratios = [1.15, 1.15, *([1.15] if private else []), 1]
    figure, panels = plt.subplots(1, len(ratios), figsize=(16 + 5.5 * private, 5), dpi=100, gridspec_kw={"width_ratios": ratios},
                                  layout="constrained")
    accuracy_axes, loss_axes, traffic_axes = panels[0], panels[1], panels[-1]
    figure.suptitle(title or _title(results), fontsize=13)
    for index, result in enumerate(results):
        colour = colours[index % len(colours)]
        history = result["history"]
        steps = [record["step"] for record in history]
        accuracy_axes.plot(steps, [record["accuracy"] for record in history], color=colour, marker="o", markersize=4, label=legend[index])
        loss_axes.plot(steps, [record["loss"] for record in history], color=colour, marker="o", markersize=4)
        train = [(record["step"], record["train_loss"]) for record in history if _is_number(record.get("train_loss"))]
        if train:
            loss_axes.plot(*zip(*train), color=colour, linestyle="--", marker=".", markersize=4)
    accuracy_axes.set(title="test accuracy", xlabel=step, ylabel="accuracy", ylim=(0, 1.02))
    loss_axes.set(title="loss", xlabel=step, ylabel="cross-entropy")
    for axes in (accuracy_axes, loss_axes):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
    accuracy_axes.legend(loc="best", fontsize=9)
    loss_axes.legend([Line2D([], [], color="0.3"), Line2D([], [], color="0.3", linestyle="--")], ["test loss", "train loss"], fontsize=9)
    if private:
        _privacy(panels[2], results, legend, colours, step)
    _traffic(traffic_axes, results, legend, colours)
    return figure


def _privacy(axes: Any, results: Sequence[dict], legend: list[str], colours: Sequence[Any], step: str) -> None:
    """Epsilon spent per round of each run with DP, its final epsilon and delta in the legend, and
    its --dp-target-epsilon (dotted) where it has one."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    handles, texts, targets = [], [], False
    for index, result in enumerate(results):
        curve = privacy_curve(result)
        if not curve:
            continue
        colour = colours[index % len(colours)]
        (line,) = axes.plot(*zip(*curve), color=colour, marker="o", markersize=4)
        spent = privacy(result) or {}
        text = legend[index] + (f": ε {spent['epsilon']:.3g}" if spent.get("epsilon") is not None else "")
        text += f" (δ {spent['delta']:g})" if spent.get("delta") is not None else ""
        text += ", stopped early" if spent.get("stopped") else ""
        handles.append(line)
        texts.append(text)
        config = result.get("config") if isinstance(result.get("config"), dict) else {}
        if _is_number(config.get("dp_target_epsilon")):
            axes.axhline(config["dp_target_epsilon"], color=colour, linestyle=":", linewidth=1.2)
            targets = True
    if targets:
        handles.append(Line2D([], [], color="0.3", linestyle=":"))
        texts.append("--dp-target-epsilon")
    axes.set(title="privacy spent (epsilon)", xlabel=step, ylabel="epsilon")
    axes.set_ylim(bottom=0)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)
    axes.legend(handles, texts, loc="best", fontsize=9)


def _traffic(axes: Any, results: Sequence[dict], legend: list[str], colours: Sequence[Any]) -> None:
    """A bar per run: megabytes through the lead role, under its label, messages and wall time."""
    rows = list(range(len(results)))[::-1]  # the first run on top, as in the legend
    megabytes = []
    for result in results:
        traffic = result.get("traffic") if isinstance(result.get("traffic"), dict) else {}
        megabytes.append(float(traffic.get("bytes") or 0) / 1e6)
    widest = max(megabytes) or 1.0
    axes.barh(rows, megabytes, color=[colours[index % len(colours)] for index in range(len(results))], height=0.4, align="edge")
    for row, result, size, label in zip(rows, results, megabytes, legend):
        traffic = result.get("traffic") if isinstance(result.get("traffic"), dict) else {}
        messages = traffic.get("messages")
        text = f"{size:.2f} MB in {messages} messages" if messages else "no messages (one process)"
        if _is_number(result.get("wall_seconds")):
            text += f", {result['wall_seconds']:.1f} s wall"
        axes.text(0, row + 0.45, f"{label}\n{text}", va="bottom", fontsize=9, linespacing=1.4, clip_on=False)
    axes.set_yticks([])
    axes.set_ylim(-0.15, len(results) + 0.05)
    axes.set_xlim(0, widest * 1.15)
    axes.set(title="traffic of the lead role (sent + received)", xlabel="MB")
    axes.grid(axis="x", alpha=0.3)
