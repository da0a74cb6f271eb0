"""Differential privacy benchmark: test accuracy against epsilon, central DP (DP-FedAvg).

    .venv/bin/python ci/bench_privacy.py [--rounds 20] [--epsilons 8 4 1] [--partitions iid dirichlet:0.3] [--out privacy.json [--resume]]

Fashion-MNIST, the default cnn, 1,000 registered workers of which 100 are drawn each round. For
each partition: a run without DP, then for each target epsilon (at --delta 1e-5) a run with
--dp central whose noise multiplier z is the smallest (to --tolerance) for which the server's
accountant (`federated.epsilon_after`: the RDP accountant, the round's secret draw of 100 / 1,000
workers taken as Poisson sampling at rate 0.1, one Gaussian mechanism per round) gives epsilon <=
the target after --rounds rounds: found by bisection, so epsilon is just under the target.

Every run is the plain single-process loop (`federated.reference_run`), which implements the same
maths as the distributed run, DP included: each sampled worker clips its model change to L2 norm
--clip, the mean is taken with every worker weighing the same and N(0, (z * clip)^2) is added to
the sum. The noise is drawn from the operating system's randomness (as the server draws it), so DP
rows do not repeat exactly. During the rounds the model is scored on the first --round-test-limit
test samples (cheap); the accuracy in the table is the final model's on the whole test set
(10,000). The update norms (the workers' model changes before clipping, every round) are recorded
to show where the clip sits among them: `--norms R` runs R rounds without DP, prints their
quantiles per round and stops (how the clip was chosen).

Defaults (chosen on this 2-core machine, where a round takes ~5 s when it is otherwise idle, so
a 20-round run ~2 min and the grid of 8 ~16 min; on a busy machine several times that): 20
rounds, SGD (momentum 0.9) lr 0.05, batch 16, 2 local epochs (about 8 steps on a 60-sample IID
share), clip 1.0 (about the median update norm without DP), seed 2 (seed 1 leaves a worker
without samples under dirichlet:0.3 with 1,000 workers). `--out FILE` is written after every
run; `--resume` reuses its rows (same settings) and runs only the missing cells. A model made
non-finite by a worker's non-finite update (local training blown up from a heavily noised model)
is marked "NaN model" (the plain loop averages such an update in; the distributed server's codec
refuses non-finite tensors).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from splitfed.learning import federated
from splitfed.learning.settings import FederatedSettings
from splitfed.learning.tasks import Task


def settings_for(args, partition: str, rounds: int | None = None, **privacy) -> FederatedSettings:  # noqa: ANN001 (argparse.Namespace)
    return FederatedSettings(dataset="fashion-mnist", model="cnn", workers=args.workers, clients_per_round=args.clients_per_round, rounds=rounds or args.rounds,
                             partition=partition, optimizer=args.optimizer, lr=args.lr, batch_size=args.batch_size, local_epochs=args.local_epochs,
                             seed=args.seed, test_limit=args.round_test_limit, dp_delta=args.delta, dp_clip=args.clip, **privacy)


def spent(args, z: float) -> float:  # noqa: ANN001
    """Epsilon after --rounds rounds of central DP with noise multiplier z (the server's accountant)."""
    settings = settings_for(args, "iid", dp="central", dp_noise_multiplier=z)
    return federated.epsilon_after(settings, [federated.sampling_rate(settings, args.workers)] * args.rounds)


def noise_for(args, target: float) -> float:  # noqa: ANN001
    """The smallest z (within --tolerance) whose epsilon after --rounds rounds is <= target."""
    low, high = 0.0, 1.0
    while spent(args, high) > target:
        low, high = high, high * 2
    while high - low > args.tolerance:
        middle = (low + high) / 2
        low, high = (middle, high) if spent(args, middle) > target else (low, middle)
    return high


class NormRecorder:
    """The L2 norms of the workers' model changes before clipping: `federated.private_change` is
    what every sampled worker's change goes through, DP or not, so it is wrapped for the run."""

    def __init__(self) -> None:
        self.norms: list[float] = []
        self.original = federated.private_change

    def __enter__(self) -> NormRecorder:
        def recorded(change, settings, clip):  # noqa: ANN001, ANN202
            self.norms.append(torch.linalg.vector_norm(change, dtype=torch.float64).item())
            return self.original(change, settings, clip)
        federated.private_change = recorded
        return self

    def __exit__(self, *exc) -> None:  # noqa: ANN002
        federated.private_change = self.original


def full_test_accuracy(model: torch.nn.Module, settings: FederatedSettings) -> float:
    """The final model on the whole test set (the rounds were scored on its first samples only)."""
    full = dataclasses.replace(settings, test_limit=None)
    task = Task(full)
    server = federated.server_context(full)
    return federated.score(model, federated.evaluation_data(task, server), full.eval_batch_size, task.loss(server), task.compute).accuracy


def one_run(args, partition: str, target: float | None, z: float | None) -> dict:  # noqa: ANN001
    privacy = {"dp": "central", "dp_noise_multiplier": z} if z is not None else {}
    settings = settings_for(args, partition, **privacy)
    started = time.perf_counter()
    label = f"{partition}, " + ("no DP" if z is None else f"epsilon {target:g}, z {z:.4f}")

    def progress(record) -> None:  # noqa: ANN001 (federated.RoundRecord)
        print(f"{label}: round {record.step}, accuracy {record.accuracy:.4f} (first {args.round_test_limit} test samples), {record.seconds:.1f} s", flush=True)

    with NormRecorder() as recorder:
        model, history = federated.reference_run(settings, on_round=progress if args.progress else None)
    accuracy = full_test_accuracy(model, settings)
    norms = recorder.norms
    finite_norms = sorted(n for n in norms if math.isfinite(n))
    return {
        "partition": partition, "target_epsilon": target, "noise_multiplier": z,
        "epsilon": federated.epsilon_after(settings, [federated.sampling_rate(settings, args.workers)] * args.rounds) if z is not None else None,
        "accuracy": accuracy, "round_accuracy": [r.accuracy for r in history], "seconds": time.perf_counter() - started,
        "update_norm_median": statistics.median(finite_norms), "clipped": sum(n > args.clip for n in finite_norms) / len(finite_norms),
        # A non-finite update (a worker's local training blown up from a noised model) makes the
        # mean non-finite, and every round after it: the table says so rather than just 0.1.
        "finite": all(bool(torch.isfinite(value).all()) for value in model.state_dict().values() if value.is_floating_point()),
        "non_finite_updates": sum(not math.isfinite(n) for n in norms),
    }


def norms(args) -> None:  # noqa: ANN001
    """--norms R: R rounds without DP, the update norms' quantiles per round (to choose --clip)."""
    for partition in args.partitions:
        settings = settings_for(args, partition, rounds=args.norms)
        with NormRecorder() as recorder:
            def report(record, recorder=recorder, partition=partition, per=settings.round_sample_size(args.workers)) -> None:  # noqa: ANN001
                last = sorted(recorder.norms[-per:])
                quantile = lambda q: last[min(len(last) - 1, int(q * len(last)))]  # noqa: E731
                print(f"{partition} round {record.step}: accuracy {record.accuracy:.4f}, update norm p10 {quantile(0.1):.3f} "
                      f"median {quantile(0.5):.3f} p90 {quantile(0.9):.3f}, {record.seconds:.1f} s", flush=True)
            federated.reference_run(settings, on_round=report)


RESULT_SETTINGS = ("delta", "rounds", "workers", "clients_per_round", "optimizer", "lr", "batch_size", "local_epochs", "clip", "seed",
                   "round_test_limit", "tolerance")  # what a row depends on beside its partition and epsilon


def earlier_rows(args) -> dict[tuple[str, float | None], dict]:  # noqa: ANN001
    """--resume: the rows --out holds from an earlier run with the same settings, by (partition,
    target epsilon), so that a grid cut short goes on where it stopped."""
    if not args.resume or not args.out or not args.out.exists():
        return {}
    earlier = json.loads(args.out.read_text())
    if any(earlier["settings"].get(name) != getattr(args, name) for name in RESULT_SETTINGS):
        raise SystemExit(f"--resume: {args.out} was written with other settings ({', '.join(RESULT_SETTINGS)} must match)")
    rows = {(row["partition"], row["target_epsilon"]): row for row in earlier["rows"]}
    print(f"--resume: {len(rows)} rows from {args.out}: " + ", ".join(f"{p} {'no DP' if t is None else t}" for p, t in rows), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--partitions", nargs="+", default=["iid", "dirichlet:0.3"])
    parser.add_argument("--epsilons", type=float, nargs="+", default=[8.0, 4.0, 1.0])
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--workers", type=int, default=1000)
    parser.add_argument("--clients-per-round", type=int, default=100)
    parser.add_argument("--optimizer", default="sgd")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--clip", type=float, default=1.0, help="--dp-clip: the L2 norm each worker's model change is clipped to")
    parser.add_argument("--seed", type=int, default=2)
    parser.add_argument("--round-test-limit", type=int, default=2000, help="test samples each round is scored on (the final model: all of them)")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="the bisection's precision on z")
    parser.add_argument("--norms", type=int, default=0, help="only run this many rounds without DP and print the update norms")
    parser.add_argument("--progress", action="store_true", help="print every round's accuracy and seconds")
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here (after every run)")
    parser.add_argument("--resume", action="store_true", help="reuse the rows --out already holds (same settings): run only the missing cells")
    args = parser.parse_args()
    if args.norms:
        norms(args)
        return
    command = " ".join(shlex.quote(part) for part in [".venv/bin/python", "ci/bench_privacy.py", *sys.argv[1:]])
    noise = {target: noise_for(args, target) for target in args.epsilons}
    title = (f"Central DP (DP-FedAvg), fashion-mnist, cnn, {args.clients_per_round} of {args.workers} workers a round, {args.rounds} rounds, "
             f"{args.optimizer} lr {args.lr}, batch {args.batch_size}, {args.local_epochs} local epochs, clip {args.clip}, delta {args.delta:g}, seed {args.seed}")
    console = Console(width=200)
    done = earlier_rows(args)
    rows = []
    for partition in args.partitions:
        for target in [None, *args.epsilons]:
            if (partition, target) in done:
                rows.append(done[(partition, target)])
                continue
            rows.append(one_run(args, partition, target, noise.get(target)))
            row = rows[-1]
            print(f"done: {partition}, {'no DP' if target is None else f'epsilon {target:g}'}: accuracy {row['accuracy']:.4f}, {row['seconds']:.0f} s", flush=True)
            if args.out:  # with the earlier rows of cells outside this grid, so that --resume never loses one
                kept = [row for key, row in done.items() if key not in {(r["partition"], r["target_epsilon"]) for r in rows}]
                args.out.write_text(json.dumps({"command": command, "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                                                "rows": rows + kept}, indent=2))
    table = Table(title=title)
    for column in ("partition", "epsilon", "z", "accuracy", "best round accuracy*", "update norm median", "clipped", "s"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(row["partition"], "no DP" if row["noise_multiplier"] is None else f"{row['epsilon']:.3f} (target {row['target_epsilon']:g})",
                      "-" if row["noise_multiplier"] is None else f"{row['noise_multiplier']:.4f}", f"{row['accuracy']:.4f}" + (" (NaN model)" if row.get("finite") is False else ""),
                      f"{max(row['round_accuracy']):.4f}", f"{row['update_norm_median']:.3f}", f"{row['clipped']:.0%}", f"{row['seconds']:.0f}")
    console.print(table)
    console.print(f"accuracy: the final model on the whole test set; *best round accuracy: on the first {args.round_test_limit} test samples; "
                  f"clipped: the share of the updates (all rounds) whose norm was above the clip {args.clip}; s: the run's wall seconds on this machine")
    console.print(f"command: {command}", soft_wrap=True)


if __name__ == "__main__":
    main()
