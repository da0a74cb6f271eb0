"""The device check of ci/gpu_check.sh: every scenario on each device and precision against the
CPU, and the speed of training on each device. Both print markdown tables and write them, with
their figures as JSON, to --out-dir as they go, so that a check cut short keeps what it
measured. After --seconds neither starts another run, and the scenarios' runs still going are
stopped: the runs left count as failures.

    python ci/bench_device.py scenarios [--devices cpu,cuda] [--limit 4000] [--test-limit 2000] [--jobs N] [--out-dir DIR]
        Every scenario over the in-memory transport, each run a `splitfed run SCENARIO` process
        of its own (--jobs at a time), on every device in fp32 and in bf16 (split and splitnn
        then send bf16 on the wire too). A run's test accuracy is compared with the CPU's in the
        same precision, and a CPU run in bf16 with the CPU in fp32: within --fp32-tolerance points
        when both are fp32, else --bf16-tolerance; p2p and smpl within --async-tolerance, since
        their peers never wait for one another and two runs on one CPU already differ (smpl by up
        to 5.5 points with 2000 samples, on a 2-core machine). Exit code 1 when a run fails or
        differs by more.

    python ci/bench_device.py throughput [--devices cpu,cuda] [--samples cuda:resnet18=5000 ...] [--out-dir DIR]
        Training samples per second, centralized and split learning in one process (the
        in-memory transport, straight between the halves), for cnn and resnet18 on 28x28 inputs
        (Fashion-MNIST) and on 32x32 ones: three channels of seeded random pixels and labels, the
        shape of CIFAR-10, which these machines do not have (the speed is a real one, the
        accuracy is chance). Every run trains 2 epochs of N samples and evaluates N/8 after each;
        the table shows the second epoch (the first also pays for the first calls: cuDNN's and
        oneDNN's choices, the allocators' first blocks). Split sends its activations in the run's
        precision. Then split learning's bytes per training batch on the wire in fp32 and bf16
        (the parties compute in fp32), from the traffic counters of one-epoch runs of N - 64 and
        N samples (one batch apart, the same test samples: on a GPU the whole test set), on the
        GPU when there is one, with the larger run's test accuracy. Exit code 1 when a run fails
        or bf16 comes to more than 0.55 of fp32's bytes. Issue 27's goals (split within 1.3x of
        centralized's epoch time for resnet18 on the GPU; bf16 on the wire within 0.5 points of
        fp32) are reported, not enforced: they are measurements, not correctness.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

SCENARIOS = {
    # The options beyond the shared ones: small runs, each party with enough data to learn from.
    "centralized": ["--epochs", "1"],
    "split": ["--epochs", "1"],
    "splitnn": ["--clients", "2", "--schedule", "round-robin", "--epochs", "1"],
    "fedavg": ["--workers", "2", "--partition", "iid", "--rounds", "2"],
    "p2p": ["--peers", "2", "--epochs", "1"],
    "smpl": ["--peers", "3", "--hyperepochs", "1"],
}
ASYNCHRONOUS = {"p2p", "smpl"}
SENDS_ACTIVATIONS = {"split", "splitnn"}  # the scenarios that take --wire-dtype
PRECISIONS = ("fp32", "bf16")
MODELS = ("cnn", "resnet18")
BATCH = 64  # the default --batch-size, which every run here keeps
DEFAULT_SAMPLES = {"cpu:cnn": 2000, "cpu:resnet18": 128, "cuda:cnn": 20000, "cuda:resnet18": 10000}
INPUTS = {"28x28": "Fashion-MNIST, 1 channel", "32x32": "random pixels, 3 channels"}
SPLIT_GOAL = 1.3  # issue 27: split within 1.3x of centralized's epoch time, resnet18 on the GPU
WIRE_BYTES_AT_MOST = 0.55  # bf16 halves the tensors; the frames' headers stay
WIRE_ACCURACY_GOAL = 0.005  # issue 27: bf16 on the wire within 0.5 points of fp32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    scenarios = commands.add_parser("scenarios", help="every scenario on every device and precision against the CPU")
    scenarios.add_argument("--limit", type=int, default=4000, help="training samples of every run")
    scenarios.add_argument("--test-limit", type=int, default=2000, help="test samples of every run")
    scenarios.add_argument("--fp32-tolerance", type=float, default=1.5, help="accuracy points between two fp32 runs")
    scenarios.add_argument("--bf16-tolerance", type=float, default=3.0, help="accuracy points when either run is in bf16")
    scenarios.add_argument("--async-tolerance", type=float, default=8.0, help="accuracy points for p2p and smpl, in any precision")
    scenarios.add_argument("--timeout", type=float, default=240, help="seconds one run may take")
    scenarios.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 1) // 4), help="runs at a time (default: one per 4 CPUs)")
    scenarios.add_argument("--only", nargs="*", choices=SCENARIOS, help="these scenarios alone")
    throughput = commands.add_parser("throughput", help="samples per second and bytes per batch")
    throughput.add_argument("--samples", nargs="*", default=[], metavar="DEVICE:MODEL=N",
                            help=f"training samples per epoch (defaults: {' '.join(f'{k}={v}' for k, v in DEFAULT_SAMPLES.items())})")
    for command in (scenarios, throughput):
        command.add_argument("--seconds", type=float, help="the time this may take: after it no run starts (the runs left are failures)")
        command.add_argument("--devices", help="comma-separated, cpu first (default: cpu, and cuda when torch sees a GPU)")
        command.add_argument("--data-dir", help="the Fashion-MNIST IDX folder (default: splitfed's own search)")
        command.add_argument("--out-dir", default="results/gpu-check", help="where the tables and figures go")
    args = parser.parse_args()

    devices = args.devices.split(",") if args.devices else default_devices()
    if devices[0] != "cpu":
        parser.error("--devices: the CPU comes first, as every other device is compared with it")
    if args.command == "throughput":
        args.samples = DEFAULT_SAMPLES | parse_samples(args.samples, parser)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"devices: {', '.join(devices)}", flush=True)
    args.deadline = time.monotonic() + (args.seconds if args.seconds is not None else float("inf"))
    failed = check_scenarios(args, devices, out_dir) if args.command == "scenarios" else measure_throughput(args, devices, out_dir)
    sys.exit(1 if failed else 0)


def default_devices() -> list[str]:
    import torch

    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


# -- every scenario against the CPU ----------------------------------------------------------------


def check_scenarios(args: argparse.Namespace, devices: list[str], out_dir: Path) -> list[str]:
    """Runs every scenario in every (device, precision), --jobs at a time, and rewrites the table
    as each run ends; returns the failures, one line each."""
    plan = [(scenario, device, precision) for scenario in args.only or SCENARIOS for device in devices for precision in PRECISIONS]
    results: dict[tuple[str, str, str], dict] = {}
    report = Report(out_dir, "scenarios", f"Every scenario over the in-memory transport: {args.limit} training and {args.test_limit} test samples of Fashion-MNIST")
    # The runs share the cores: each gets its part of them for torch's threads.
    env = os.environ | {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // args.jobs))}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch, ThreadPoolExecutor(args.jobs) as pool:
        running = {pool.submit(run_scenario, scenario_command(args, key, scratch), args, env): key for key in plan}
        for finished in as_completed(running):
            results[running[finished]] = finished.result()
            rows = compared(plan, results, args)
            report.write(scenario_table(rows), {"rows": rows, "failures": failures_of(rows), "settings": settings_of(args)})
            row = next(row for row in rows if (row["scenario"], row["device"], row["precision"]) == running[finished])
            print(f"  {row['scenario']:11} {row['device']:5} {row['precision']}: {row_summary(row)}", flush=True)
    failures = failures_of(compared(plan, results, args))
    report.show(failures)
    return failures


def scenario_command(args: argparse.Namespace, key: tuple[str, str, str], scratch: str) -> list[str]:
    scenario, device, precision = key
    command = [sys.executable, "-m", "splitfed", "run", scenario, *SCENARIOS[scenario], "--limit", str(args.limit), "--test-limit", str(args.test_limit),
               "--log-level", "warning", "--device", device, "--precision", precision, "--out", f"{scratch}/{scenario}-{device}-{precision}.json"]
    if scenario in SENDS_ACTIVATIONS:
        command += ["--wire-dtype", precision]
    if args.data_dir:
        command += ["--data-dir", args.data_dir]
    return command


def run_scenario(command: list[str], args: argparse.Namespace, env: dict[str, str]) -> dict:
    out = Path(command[command.index("--out") + 1])
    timeout = min(args.timeout, args.deadline - time.monotonic())
    if timeout <= 0:
        return {"ok": False, "problem": "not run: out of time (--seconds)", "seconds": 0.0}
    started = time.perf_counter()
    try:
        finished = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"ok": False, "problem": f"still running after {timeout:.0f} s", "seconds": timeout}
    seconds = time.perf_counter() - started
    if finished.returncode != 0 or not out.is_file():
        last = (finished.stderr.strip().splitlines() or ["no output"])[-1]
        return {"ok": False, "problem": f"exit code {finished.returncode}: {last}", "seconds": seconds}
    result = json.loads(out.read_text())
    return {"ok": True, "problem": "", "seconds": seconds, "accuracy": result["accuracy"], "loss": result["loss"]}


def compared(plan: list[tuple[str, str, str]], results: dict[tuple[str, str, str], dict], args: argparse.Namespace) -> list[dict]:
    """The finished runs in plan order, each against its reference when that has finished: the
    CPU in the same precision, and for the CPU in bf16 the CPU in fp32."""
    rows = []
    for key in plan:
        if key not in results:
            continue
        scenario, device, precision = key
        row = dict(results[key], scenario=scenario, device=device, precision=precision, wire=precision if scenario in SENDS_ACTIVATIONS else "")
        against = ("cpu", precision) if device != "cpu" else ("cpu", "fp32") if precision != "fp32" else None
        if against:
            row["against"], row["tolerance"] = " ".join(against), tolerance(args, scenario, precision, against[1])
            reference = results.get((scenario, *against))
            if reference is not None and row["ok"] and reference["ok"]:
                row["difference"] = 100 * (row["accuracy"] - reference["accuracy"])
                if abs(row["difference"]) > row["tolerance"]:
                    row["ok"] = False
                    row["problem"] = (f"accuracy {100 * row['accuracy']:.2f}% against {100 * reference['accuracy']:.2f}% on {row['against']}: "
                                      f"more than {row['tolerance']:g} points apart")
        rows.append(row)
    return rows


def settings_of(args: argparse.Namespace) -> dict:
    return {name: value for name, value in vars(args).items() if name != "deadline"}  # the deadline is this process's clock


def failures_of(rows: list[dict]) -> list[str]:
    return [f"{row['scenario']} on {row['device']} in {row['precision']}: {row['problem']}" for row in rows if not row["ok"]]


def tolerance(args: argparse.Namespace, scenario: str, precision: str, reference_precision: str) -> float:
    if scenario in ASYNCHRONOUS:
        return args.async_tolerance
    return args.fp32_tolerance if precision == reference_precision == "fp32" else args.bf16_tolerance


def row_summary(row: dict) -> str:
    if "accuracy" not in row:
        return f"FAILED: {row['problem']}"
    against = f", {row['difference']:+.2f} points against {row['against']}" if "difference" in row else ""
    return f"accuracy {100 * row['accuracy']:.2f}%{against} ({row['seconds']:.1f} s){'' if row['ok'] else '  FAILED'}"


def scenario_table(rows: list[dict]) -> str:
    header = ["scenario", "device", "precision", "wire", "accuracy %", "loss", "against", "Δ points", "tolerance", "s", "ok"]
    lines = []
    for row in rows:
        measured = "accuracy" in row
        lines.append([
            row["scenario"], row["device"], row["precision"], row["wire"] or "-",
            f"{100 * row['accuracy']:.2f}" if measured else "-", f"{row['loss']:.4f}" if measured else "-",
            row.get("against", "(reference)"), f"{row['difference']:+.2f}" if "difference" in row else "-",
            f"±{row['tolerance']:g}" if "tolerance" in row else "-", f"{row['seconds']:.1f}",
            "yes" if row["ok"] else f"NO: {row['problem']}",
        ])
    return markdown(header, lines)


# -- throughput and the wire -----------------------------------------------------------------------


def measure_throughput(args: argparse.Namespace, devices: list[str], out_dir: Path) -> list[str]:
    import logging

    import splitfed

    # Errors only: every split run here warns that it has no key list, which would bury the table.
    logging.getLogger().setLevel(logging.ERROR)
    samples = args.samples
    rows: list[dict] = []
    wire: list[dict] = []
    failures: list[str] = []
    report = Report(out_dir, "throughput", "Training throughput: 2 epochs of N samples each, the second's figures")

    def save() -> None:
        report.write(throughput_table(rows) + "\n\n" + wire_table(wire) + "\n\n" + goals(rows, wire),
                     {"rows": rows, "wire": wire, "failures": failures, "settings": settings_of(args)})

    def attempt(label: str, run: Callable[[], dict]) -> dict | None:
        if time.monotonic() > args.deadline:
            failures.append(f"{label}: not run: out of time (--seconds)")
            return None
        try:
            return run()
        except Exception as exc:  # a row that fails is reported and the others still run
            failures.append(f"{label}: {type(exc).__name__}: {exc}")
            print(f"  {label}: FAILED: {type(exc).__name__}: {exc}", flush=True)
            return None

    with tempfile.TemporaryDirectory(prefix="bench-device-") as scratch:
        largest = max(samples[f"{device}:{model}"] for device in devices for model in MODELS)
        data = {"28x28": {"dataset": "fashion-mnist", "data_dir": args.data_dir},
                "32x32": {"dataset": "npz", "data_dir": random_images(Path(scratch), largest)}}
        for device in reversed(devices):  # the GPU's rows first: the ones a lent machine is for
            for precision in ("fp32", "bf16") if device != "cpu" else ("fp32",):
                for model in MODELS:
                    for shape, source in data.items():
                        n = samples[f"{device}:{model}"]
                        settings = source | {"model": model, "limit": n, "test_limit": max(1, n // 8), "epochs": 2, "device": device, "precision": precision}
                        for mode, extra in (("centralized", {}), ("split", {"via": "direct", "wire_dtype": precision})):
                            label = f"{mode} {model} {shape} on {device} in {precision}"
                            result = attempt(label, lambda: splitfed.run(mode, **settings, **extra))
                            if result is None:
                                continue
                            seconds = result["history"][-1]["seconds"]
                            rows.append({"device": device, "precision": precision, "model": model, "input": shape, "mode": mode,
                                         "samples": n, "seconds": seconds, "samples_per_second": n / seconds, "accuracy": result["accuracy"]})
                            print(f"  {label}: {n / seconds:.0f} samples/s", flush=True)
                            save()
        device = devices[-1]
        for model in MODELS:
            n = samples[f"{device}:{model}"]
            wire_test_limit = None if device != "cpu" else max(1, n // 8)  # on a GPU the whole test set, for the accuracy goal
            for dtype in PRECISIONS:
                label = f"split {model} on {device}, {dtype} on the wire"
                runs = [attempt(f"{label}, {limit} samples", lambda limit=limit: splitfed.run(
                    "split", model=model, dataset="fashion-mnist", data_dir=args.data_dir, limit=limit, test_limit=wire_test_limit,
                    epochs=1, device=device, via="direct", wire_dtype=dtype)) for limit in (n - BATCH, n)]
                if None in runs:
                    continue
                fewer, more = runs
                wire.append({"device": device, "model": model, "wire": dtype, "samples": n,
                             "bytes_per_batch": more["traffic"]["bytes"] - fewer["traffic"]["bytes"], "accuracy": more["accuracy"]})
                print(f"  {label}: {wire[-1]['bytes_per_batch']} bytes per batch", flush=True)
                save()
        for model in MODELS:
            by_dtype = {row["wire"]: row for row in wire if row["model"] == model}
            if len(by_dtype) == 2 and by_dtype["bf16"]["bytes_per_batch"] > WIRE_BYTES_AT_MOST * by_dtype["fp32"]["bytes_per_batch"]:
                failures.append(f"{model}: bf16 on the wire takes {by_dtype['bf16']['bytes_per_batch']} bytes per batch, "
                                f"fp32 {by_dtype['fp32']['bytes_per_batch']}: more than {WIRE_BYTES_AT_MOST} of it")
        save()
    report.show(failures)
    return failures


def parse_samples(items: list[str], parser: argparse.ArgumentParser) -> dict[str, int]:
    parsed = {}
    for item in items:
        key, _, value = item.partition("=")
        if key not in DEFAULT_SAMPLES or not value.isdigit() or int(value) <= BATCH:
            parser.error(f"--samples {item}: expected DEVICE:MODEL=N with DEVICE:MODEL one of {', '.join(DEFAULT_SAMPLES)} and N > {BATCH}")
        parsed[key] = int(value)
    return parsed


def random_images(folder: Path, count: int) -> str:
    """train.npz and test.npz of `count` and count/8 seeded random 3x32x32 uint8 images, 10 classes."""
    import numpy as np

    generator = np.random.default_rng(0)
    for part, n in (("train", count), ("test", max(1, count // 8))):
        np.savez(folder / f"{part}.npz", x=generator.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8),
                 y=generator.integers(0, 10, n), classes=np.array([str(label) for label in range(10)]))
    return str(folder)


def key_of(row: dict) -> tuple:
    return row["device"], row["precision"], row["model"], row["input"]


def centralized_seconds(rows: list[dict]) -> dict[tuple, float]:
    return {key_of(row): row["seconds"] for row in rows if row["mode"] == "centralized"}


def throughput_table(rows: list[dict]) -> str:
    centralized = centralized_seconds(rows)
    lines = []
    for row in rows:
        baseline = centralized.get(key_of(row))
        ratio = f"{row['seconds'] / baseline:.2f}x" if row["mode"] == "split" and baseline else "-"
        lines.append([row["device"], row["precision"], row["model"], f"{row['input']} ({INPUTS[row['input']]})", row["mode"],
                      str(row["samples"]), f"{row['seconds']:.2f}", f"{row['samples_per_second']:.0f}", ratio])
    return markdown(["device", "precision", "model", "input", "mode", "samples", "s/epoch", "samples/s", "split/centralized"], lines)


def wire_table(wire: list[dict]) -> str:
    fp32 = {row["model"]: row for row in wire if row["wire"] == "fp32"}
    lines = []
    for row in wire:
        base = fp32.get(row["model"])
        lines.append([row["device"], row["model"], row["wire"], str(row["bytes_per_batch"]),
                      f"{row['bytes_per_batch'] / base['bytes_per_batch']:.3f}" if base else "-",
                      str(row["samples"]), f"{100 * row['accuracy']:.2f}",
                      f"{100 * (row['accuracy'] - base['accuracy']):+.2f}" if base else "-"])
    return markdown(["device", "split model", "wire", "bytes/batch", "of fp32", "samples (1 epoch)", "accuracy %", "Δ points"], lines)


def goals(rows: list[dict], wire: list[dict]) -> str:
    """Issue 27's numbers, as measured here."""
    said = []
    for row in rows:
        baseline = centralized_seconds(rows).get(key_of(row))
        if row["device"] != "cpu" and row["model"] == "resnet18" and row["mode"] == "split" and row["precision"] == "fp32" and baseline:
            ratio = row["seconds"] / baseline
            said.append(f"- resnet18 {row['input']} on {row['device']}: split {ratio:.2f}x centralized's epoch time "
                        f"(goal: at most {SPLIT_GOAL}x: {'met' if ratio <= SPLIT_GOAL else 'NOT met'})")
    for model in MODELS:
        by_dtype = {row["wire"]: row for row in wire if row["model"] == model}
        if len(by_dtype) == 2:
            fp32, bf16 = by_dtype["fp32"], by_dtype["bf16"]
            points = 100 * abs(bf16["accuracy"] - fp32["accuracy"])
            said.append(f"- {model}: bf16 on the wire {bf16['bytes_per_batch']} bytes per batch against {fp32['bytes_per_batch']} "
                        f"({bf16['bytes_per_batch'] / fp32['bytes_per_batch']:.3f}); accuracy {points:.2f} points apart after one epoch of "
                        f"{fp32['samples']} samples (goal: within {100 * WIRE_ACCURACY_GOAL:g}: {'met' if points <= 100 * WIRE_ACCURACY_GOAL else 'NOT met'})")
    return "\n".join(said)


# -- output ----------------------------------------------------------------------------------------


class Report:
    """A table as markdown (NAME.md) and its figures as JSON (NAME.json) in `out_dir`, rewritten
    whenever a run ends."""

    def __init__(self, out_dir: Path, name: str, title: str) -> None:
        self.markdown_path, self.json_path, self.title = out_dir / f"{name}.md", out_dir / f"{name}.json", title
        self.text = ""

    def write(self, body: str, figures: dict) -> None:
        import torch

        machine = f"torch {torch.__version__}" + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU")
        self.text = f"{self.title} ({machine}, {os.cpu_count()} CPUs)\n\n{body}\n"
        self.markdown_path.write_text(self.text)
        self.json_path.write_text(json.dumps(figures, indent=2, default=str))

    def show(self, failures: list[str]) -> None:
        print("\n" + self.text, flush=True)
        for failure in failures:
            print(f"FAILED: {failure}", flush=True)


def markdown(header: list[str], lines: list[list[str]]) -> str:
    return "\n".join("| " + " | ".join(cells) + " |" for cells in [header, ["---"] * len(header), *lines])


if __name__ == "__main__":
    main()
