"""`splitfed report` and `splitfed run ... --plot`: figures drawn from real results files, checked
as images (a PNG of a sensible size with something drawn on it), and bad input refused."""

import json
import subprocess
import sys

import numpy as np
import pytest
from matplotlib import image

from splitfed.observability import report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "splitfed", *args], capture_output=True, text=True, timeout=timeout)


def assert_drawn(path):
    """A PNG, at least 800 x 300 pixels, with curves and text on it rather than one flat colour."""
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    pixels = image.imread(str(path))
    height, width = pixels.shape[:2]
    assert width >= 800 and height >= 300, (width, height)
    colours = np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)
    assert len(colours) > 200, f"only {len(colours)} distinct colours: a blank figure?"
    assert (pixels[..., :3] < 0.5).mean() > 0.002  # dark pixels: text, axes, lines


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny real runs: centralized (drawn at its end with --plot) and fedavg."""
    folder = tmp_path_factory.mktemp("runs")
    tiny = ["--dataset", "digits", "--limit", "240", "--test-limit", "200"]
    centralized = run_cli("run", "centralized", *tiny, "--epochs", "2", "--out", str(folder / "centralized.json"), "--plot", str(folder / "centralized.png"))
    assert centralized.returncode == 0, centralized.stderr[-2000:]
    assert f"figure in {folder / 'centralized.png'}" in centralized.stderr
    fedavg = run_cli("run", "fedavg", *tiny, "--rounds", "2", "--workers", "2", "--partition", "iid", "--out", str(folder / "fedavg.json"))
    assert fedavg.returncode == 0, fedavg.stderr[-2000:]
    return folder


def test_run_plot_draws_the_run(runs):
    assert_drawn(runs / "centralized.png")


def test_report_draws_several_runs_on_one_figure(runs):
    out = runs / "report.png"
    completed = run_cli("report", str(runs / "centralized.json"), str(runs / "fedavg.json"), "--out", str(out), "--title", "two runs")
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert_drawn(out)


def test_labels_come_from_the_configs(runs):
    results = [json.loads((runs / name).read_text()) for name in ("centralized.json", "fedavg.json")]
    centralized, fedavg = report.run_labels(results)
    assert centralized.startswith("centralized") and fedavg.startswith("fedavg")
    second = {**results[1], "config": {**results[1]["config"], "partition": "classes:0-4,5-9", "session": "another"}}
    assert report.run_labels([results[1], second]) == ["iid", "classes:0-4,5-9"]  # only what differs; never the session


@pytest.mark.parametrize("content, says", [
    ({"accuracy": 0.5}, "not a splitfed results file"),
    ({"scenario": "fedavg", "history": []}, "hold no history"),
    ({"scenario": "fedavg", "history": [{"step": 1}]}, "lacks a numeric step, accuracy or loss"),
    ("not json {", "not JSON"),
])
def test_report_refuses_what_is_not_a_results_file(tmp_path, content, says):
    bad = tmp_path / "bad.json"
    bad.write_text(content if isinstance(content, str) else json.dumps(content))
    completed = run_cli("report", str(bad), "--out", str(tmp_path / "r.png"))
    assert completed.returncode == 2
    errors = [line for line in completed.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and says in errors[0] and str(bad) in errors[0], completed.stderr
    assert "Traceback" not in completed.stderr and not (tmp_path / "r.png").exists()


def test_report_of_a_missing_file(tmp_path):
    completed = run_cli("report", str(tmp_path / "missing.json"), "--out", str(tmp_path / "r.png"))
    assert completed.returncode == 2 and "missing.json: no such file" in completed.stderr and "Traceback" not in completed.stderr


# -- differential privacy: epsilon per round, and what the run ended with ------------------------


def _record(step, accuracy, **more):
    return {"step": step, "accuracy": accuracy, "loss": 2.0 - accuracy, "train_loss": 2.1 - accuracy, "seconds": 1.5, **more}


PLAIN = {"scenario": "fedavg", "config": {"dp": "none", "workers": 3, "dataset": "digits"}, "accuracy": 0.7, "loss": 1.3,
         "history": [_record(1, 0.5), _record(2, 0.6), _record(3, 0.7)], "traffic": {"bytes": 3e6, "messages": 60}, "wall_seconds": 4.0}
# What the fedavg-server writes with --dp central and a target it would pass in round 3.
PRIVATE = {"scenario": "fedavg", "config": {"dp": "central", "dp_delta": 1e-5, "dp_target_epsilon": 3.0, "workers": 3, "dataset": "digits"},
           "accuracy": 0.55, "loss": 1.45, "history": [_record(1, 0.4, epsilon=1.25, clip=1.0), _record(2, 0.55, epsilon=2.5, clip=1.0)],
           "dp": {"epsilon": 2.5, "delta": 1e-5, "stopped": "round 3 would take epsilon to 3.75, past --dp-target-epsilon 3"},
           "traffic": {"bytes": 2e6, "messages": 40}, "wall_seconds": 3.0}


def test_privacy_of_a_run_is_its_epsilon_per_round_and_what_it_ended_with():
    assert report.privacy_curve(PRIVATE) == [(1, 1.25), (2, 2.5)]
    assert report.privacy(PRIVATE) == {"epsilon": 2.5, "delta": 1e-5, "stopped": PRIVATE["dp"]["stopped"]}
    assert report.privacy_line(PRIVATE) == ("epsilon 2.5 at delta 1e-05 after 2 rounds; "
                                            "stopped early: round 3 would take epsilon to 3.75, past --dp-target-epsilon 3")
    assert report.privacy_curve(PLAIN) == [] and report.privacy(PLAIN) is None and report.privacy_line(PLAIN) is None
    # a history that says it, without the run's `dp` (a round's progress record, say): its last epsilon, the config's delta
    partial = {**PRIVATE, "history": PRIVATE["history"][:1]}
    del partial["dp"]
    assert report.privacy_line(partial) == "epsilon 1.25 at delta 1e-05 after 1 round"
    # dp sample where no worker reported its epsilon: DP all the same, its epsilon unknown
    unreported = {**PRIVATE, "history": [_record(1, 0.4, epsilon=None)], "dp": {"epsilon": None, "delta": 1e-5, "stopped": ""}}
    assert report.privacy_curve(unreported) == [] and report.privacy_line(unreported) == "epsilon not reported at delta 1e-05 after 1 round"
    assert report.privacy_lines([PLAIN, PRIVATE], labels=["plain", "private"]) == [f"private: {report.privacy_line(PRIVATE)}"]


def test_the_figure_draws_epsilon_per_round_only_for_runs_with_dp():
    from matplotlib import pyplot

    figure = report.draw_figure([PLAIN, PRIVATE], labels=["plain", "private"])
    try:
        titles = [axes.get_title() for axes in figure.axes]
        assert titles == ["test accuracy", "loss", "privacy spent (epsilon)", "traffic of the lead role (sent + received)"]
        privacy = figure.axes[2]
        curves = [line for line in privacy.get_lines() if line.get_linestyle() != ":"]
        assert len(curves) == 1 and list(curves[0].get_xdata()) == [1, 2] and list(curves[0].get_ydata()) == [1.25, 2.5]
        (target,) = [line for line in privacy.get_lines() if line.get_linestyle() == ":"]
        assert list(target.get_ydata()) == [3.0, 3.0]  # --dp-target-epsilon
        legend = [text.get_text() for text in privacy.get_legend().get_texts()]
        assert legend == ["private: ε 2.5 (δ 1e-05), stopped early", "--dp-target-epsilon"]
    finally:
        pyplot.close(figure)
    plain = report.draw_figure([PLAIN])
    try:
        assert [axes.get_title() for axes in plain.axes] == ["test accuracy", "loss", "traffic of the lead role (sent + received)"]
    finally:
        pyplot.close(plain)


def test_report_says_what_privacy_each_run_spent(tmp_path):
    (tmp_path / "plain.json").write_text(json.dumps(PLAIN))
    (tmp_path / "private.json").write_text(json.dumps(PRIVATE))
    out = tmp_path / "report.png"
    completed = run_cli("report", str(tmp_path / "plain.json"), str(tmp_path / "private.json"), "--out", str(out), "--label", "plain", "--label", "private")
    assert completed.returncode == 0, completed.stderr[-2000:]
    said = " ".join(completed.stderr.split())  # the console wraps long lines
    assert "private: epsilon 2.5 at delta 1e-05 after 2 rounds; stopped early: round 3 would take epsilon to 3.75, past --dp-target-epsilon 3" in said
    assert "plain:" not in said
    assert_drawn(out)


def test_the_runs_table_has_an_epsilon_column_with_dp(capsys):
    from splitfed.commandline import _write_results

    _write_results(PRIVATE, None)
    private = capsys.readouterr().err
    header = next(line for line in private.splitlines() if "test accuracy" in line)
    assert "epsilon" in header
    assert [line.split()[-2] for line in private.splitlines() if line.strip().startswith(("│    1 ", "│    2 "))] == ["1.25", "2.5"]
    assert "privacy: epsilon 2.5 at delta 1e-05 after 2 rounds; stopped early:" in " ".join(private.split())
    _write_results(PLAIN, None)
    plain = capsys.readouterr().err
    assert "epsilon" not in plain and "privacy:" not in plain
