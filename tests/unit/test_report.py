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
