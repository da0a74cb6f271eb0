"""Split learning's defences against its attacks: one command, one table.

    .venv/bin/python ci/bench_defences.py [--jobs 2] [--limit N] [--out table.json] [--keep DIR]

For the default CNN on Fashion-MNIST at its default cut (9: the client keeps the convolutions and
the first dense layer, 128 floats a sample) and at an earlier one (3: after the first
convolution block, 32x14x14), one epoch each: no defence and each defence at two strengths, in
vanilla mode (NoPeek, activation clipping and noise, label DP) and u-shaped mode (no defence,
max-norm, gradient noise). Each row is a real split run over the in-memory transport (`splitfed
run split ... --save-model`), then `splitfed attack inversion` and `splitfed attack labels` on its
results: test accuracy, the inversion's SSIM on test inputs (beside an attacker that learned
nothing) and the label attack's score (beside chance).

Activation noise is a standard deviation per element of S times the clip C, so the noise's norm
is S * C * sqrt(d): the strengths are given as that ratio (noise norm / C) and divided by sqrt(d)
for the cut at hand. Rows run one after another (--jobs 1, the default) unless told otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from rich.console import Console
from rich.table import Table

# cut -> (floats a sample at the cut, the activation clip C: about the median norm of a sample's
# activation there in the untrained model, 1.3 and 44, so that clipping leaves the scale the
# layers start from and the noise ratio means the same at both cuts).
CUTS = {9: (128, 1.0), 3: (32 * 14 * 14, 40.0)}
# (mode, label, options); "noise_ratio" is the activation noise's norm over C, turned into
# --activation-noise per cut.
ROWS = [
    ("vanilla", "none", {}),
    ("vanilla", "nopeek 0.5", {"nopeek_weight": 0.5}),
    ("vanilla", "nopeek 2", {"nopeek_weight": 2.0}),
    ("vanilla", "activation noise 0.5", {"noise_ratio": 0.5}),
    ("vanilla", "activation noise 1", {"noise_ratio": 1.0}),
    ("vanilla", "activation noise 2", {"noise_ratio": 2.0}),
    ("vanilla", "label dp eps 4", {"label_dp": 4.0}),
    ("vanilla", "label dp eps 1", {"label_dp": 1.0}),
    ("vanilla", "label dp eps 4, model prior", {"label_dp": 4.0, "label_dp_prior": "model"}),
    ("u-shaped", "none", {}),
    ("u-shaped", "max-norm", {"gradient_defence": "max-norm"}),
    ("u-shaped", "gradient noise 0.25", {"gradient_defence": "noise", "gradient_noise": 0.25}),
    ("u-shaped", "gradient noise 1", {"gradient_defence": "noise", "gradient_noise": 1.0}),
]


def options(cut: int, mode: str, defence: dict) -> dict:
    """The run's settings for one row."""
    chosen = {"cut_layer": str(cut), "mode": mode, **defence}
    ratio = chosen.pop("noise_ratio", None)
    if ratio is not None:
        floats, clip = CUTS[cut]
        chosen.update(activation_clip=clip, activation_noise=ratio / math.sqrt(floats))
    return chosen


def splitfed(*args: str, threads: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "SPLITFED_LOG_LEVEL": "warning"}
    completed = subprocess.run([sys.executable, "-m", "splitfed", *args], capture_output=True, text=True, env=env)
    if completed.returncode != 0:
        raise RuntimeError(f"splitfed {' '.join(args)} failed ({completed.returncode}): {completed.stderr[-2000:]}")


def row(job: tuple, threads: int, limit: int | None, keep: Path) -> dict:
    cut, mode, label, defence = job
    name = f"cut{cut}-{mode}-{label.replace(' ', '-')}"
    chosen = options(cut, mode, defence)
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in chosen.items()]
    if limit:
        flags.append(f"--limit={limit}")
    started = time.perf_counter()
    results, model = keep / f"{name}.json", keep / f"{name}.safetensors"
    splitfed("run", "split", "--epochs=1", "--via=direct", *flags, f"--save-model={model}", f"--out={results}", threads=threads)
    trained = time.perf_counter()
    splitfed("attack", "inversion", str(results), f"--out={keep / f'{name}.inversion.json'}", f"--grid={keep / f'{name}.png'}", threads=threads)
    splitfed("attack", "labels", str(results), f"--out={keep / f'{name}.labels.json'}", threads=threads)
    run = json.loads(results.read_text())
    inversion = json.loads((keep / f"{name}.inversion.json").read_text())
    labels = json.loads((keep / f"{name}.labels.json").read_text())
    # Ten classes: one guess per run, the cosine attack's (u-shaped) or the labels received (vanilla).
    return {"cut": cut, "mode": mode, "defence": label, "options": chosen, "accuracy": run["accuracy"], "inversion": inversion,
            "label_attack": labels["guesses"][-1],
            "train_seconds": trained - started, "attack_seconds": time.perf_counter() - trained}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=1, help="rows run at a time (each gets cores / jobs torch threads)")
    parser.add_argument("--limit", type=int, default=None, help="train on the first N training samples only (a quick look)")
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    parser.add_argument("--keep", type=Path, default=None, help="keep every run's results, model, attack reports and grid here")
    args = parser.parse_args()
    keep = args.keep or Path(tempfile.mkdtemp(prefix="bench-defences-"))
    keep.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    jobs = [(cut, mode, label, defence) for cut in CUTS for mode, label, defence in ROWS]
    with ProcessPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(row, jobs, [threads] * len(jobs), [args.limit] * len(jobs), [keep] * len(jobs)))
    table = Table(title=f"split learning's defences and attacks, fashion-mnist, 1 epoch{f', {args.limit} samples' if args.limit else ''}")
    for column in ("cut", "mode", "defence", "accuracy", "inversion SSIM", "label attack"):
        table.add_column(column)
    for r in rows:
        table.add_row(str(r["cut"]), r["mode"], r["defence"], f"{r['accuracy']:.4f}",
                      f"{r['inversion']['decoder']['ssim']:.3f} (nothing learned: {r['inversion']['baseline']['ssim']:.3f})",
                      f"{r['label_attack']['accuracy']:.3f} ({r['label_attack']['method']}; chance {r['label_attack']['chance']:.3f})")
    Console().print(table)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
