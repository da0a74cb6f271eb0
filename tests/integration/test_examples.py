"""The examples of README.md's "Your own model and data" run as the README shows them: each bash
block is taken from README.md and run as it stands (so the README cannot drift from what works), in
a copy of examples/ under tmp_path, with the in-memory broker. Each block makes its parties' data,
trains, and must reach an accuracy well above chance in every results file it writes."""

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SECTION = "## Your own model and data"
BIN = Path(sys.executable).parent  # the environment's python and splitfed, as the README's commands name them


def readme_blocks() -> dict[str, str]:
    """The section's bash blocks, by the example folder each one's make_data.py is in."""
    text = (REPO / "README.md").read_text()
    assert SECTION in text, f"README.md has no {SECTION!r} section"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    blocks = {}
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.DOTALL):
        example = re.search(r"examples/(\w+)/make_data\.py", block)
        assert example, f"a block of {SECTION!r} makes no data:\n{block}"
        blocks[example.group(1)] = block
    return blocks


def run_block(block: str, folder: Path) -> None:
    """Run a README block with bash in `folder`, which holds a copy of examples/."""
    assert (BIN / "splitfed").exists(), f"no splitfed beside {sys.executable}: install the package in this environment"
    shutil.copytree(REPO / "examples", folder / "examples", ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONDONTWRITEBYTECODE": "1"}
    # -x: bash echoes each command to stderr before it runs, so a failure shows which one it was
    completed = subprocess.run(["bash", "-xeuo", "pipefail", "-c", block], cwd=folder, env=env, capture_output=True, text=True, timeout=300)
    if completed.returncode != 0:
        pytest.fail(f"the README block failed (exit {completed.returncode}):\n{completed.stderr[-3000:]}", pytrace=False)


def results(block: str, folder: Path) -> dict[str, dict]:
    """The results file of every --out in the block, by scenario."""
    written = [json.loads((folder / out).read_text()) for out in re.findall(r"--out (\S+)", block)]
    return {result["scenario"]: result for result in written}


def read_csv(path: Path) -> tuple[list[str], list[tuple[str, ...]]]:
    with open(path, newline="") as handle:
        header, *rows = list(csv.reader(handle))
    return header, [tuple(row) for row in rows]


def test_tabular_example(tmp_path):
    block = readme_blocks()["tabular"]
    run_block(block, tmp_path)

    data = tmp_path / "results" / "tabular"
    slices = []
    for index in range(3):
        worker, client = data / f"worker-{index}", data / f"split-client-{index}"
        for part in ("train.csv", "test.csv"):
            assert (worker / part).read_bytes() == (client / part).read_bytes()  # party i holds one slice in either scenario
        header, train = read_csv(worker / "train.csv")
        _, test = read_csv(worker / "test.csv")
        assert len(header) == 31 and header[0] == "mean radius" and header[-1] == "diagnosis"
        assert {row[-1] for row in train} == {row[-1] for row in test} == {"benign", "malignant"}
        slices.append(set(train) | set(test))
    assert sum(len(rows) for rows in slices) == len(set().union(*slices)) == 569  # disjoint, and all of the data set

    runs = results(block, tmp_path)
    assert sorted(runs) == ["fedavg", "splitnn"]
    for scenario, result in runs.items():
        assert result["accuracy"] > 0.9, f"{scenario}: {result['accuracy']:.3f}; predicting benign for all is 0.63"


def test_images_example(tmp_path):
    block = readme_blocks()["images"]
    run_block(block, tmp_path)

    data = tmp_path / "results" / "images"
    slices = []
    for index in range(3):
        client, peer = data / f"split-client-{index}", data / f"p2p-peer-{index}"
        images = sorted(path.relative_to(client) for path in client.rglob("*.png"))
        assert images == sorted(path.relative_to(peer) for path in peer.rglob("*.png"))
        assert {path.parts[:2] for path in images} == {(part, str(digit)) for part in ("train", "test") for digit in range(10)}
        slices.append({path.name for path in images})  # a file is named by the image's place in the data set
    assert sum(len(names) for names in slices) == len(set().union(*slices)) == 1797

    runs = results(block, tmp_path)
    assert sorted(runs) == ["p2p", "splitnn"]
    for scenario, result in runs.items():
        assert result["accuracy"] > 0.6, f"{scenario}: {result['accuracy']:.3f}; guessing is 0.1"
