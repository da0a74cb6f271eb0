"""Peak memory (RSS high-water mark) of every splitfed role, and the Kubernetes request and
limit it suggests.

Runs the split scenario (through the relay) and the fedavg scenario at their defaults
(fashion-mnist, cnn, batch 64; one epoch, one round) as real `splitfed serve` processes
against RabbitMQ, each role in its own container from the images ci/images.sh builds
(--where container, the default) or as processes of this virtual environment (--where host).
Each role reports its own peak (/proc/self/status VmHWM) as it exits, so no sample can miss
the last spike. Not getrusage's ru_maxrss: a process keeps the peak its parent had before exec,
so a role started from this (torch-laden) interpreter would report this one's.

Usage: python ci/measure_memory.py [--where container|host] [--broker URL]
                                   [--image ROLE=IMAGE ...] [--margin 1.25]
"""

from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "services"))

from splitfed.learning.data import FASHION_MNIST_SYSTEM_DIR  # noqa: E402
from splitfed.learning.settings import FederatedSettings, SplitSettings  # noqa: E402
from splitfed.scenarios import fedavg, launch, split  # noqa: E402

VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
PEAK_LINE = "splitfed-peak-rss-kib"
# Run `splitfed serve ROLE` in this interpreter and say its peak RSS when it exits.
SERVE_AND_REPORT = f"""
import atexit, sys
def peak_kib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
atexit.register(lambda: print("{PEAK_LINE}", peak_kib(), file=sys.stderr, flush=True))
from splitfed.cli import app
sys.argv = ["splitfed", "serve", sys.argv[1]]
app()
"""
ROUND_TO_MIB = 32


@dataclass
class Measured:
    role: str
    name: str
    peak_mib: float | None  # None: the role failed
    log: str


def role_command(member: launch.Launch, run: launch.RunSettings, where: str, images: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """The command line and environment that start one role, the way a pod would."""
    member = member.with_deployment(torch_threads=member.threads) if hasattr(member.deployment, "torch_threads") else member
    env = launch.role_environment(member, run)
    if where == "host":
        return [sys.executable, "-c", SERVE_AND_REPORT, member.spec.name], {**env, "PYTHONPATH": str(ROOT / "services")}
    own = {key: value for key, value in env.items() if key.startswith("SPLITFED_") or key == "OMP_NUM_THREADS"}
    podman = ["podman"] if os.geteuid() == 0 else ["sudo", "podman"]
    data = f"{FASHION_MNIST_SYSTEM_DIR}:{FASHION_MNIST_SYSTEM_DIR}:ro"
    options = ["--rm", "--network", "host", "--read-only", "--tmpfs", "/tmp", "--no-healthcheck", "--volume", data]
    options += [arg for key, value in own.items() for arg in ("--env", f"{key}={value}")]
    image = images.get(member.spec.name, f"localhost/splitfed-{member.spec.name}:{VERSION}")
    return [*podman, "run", *options, "--entrypoint", "python", image, "-c", SERVE_AND_REPORT, member.spec.name], {
        **os.environ, "CONTAINERS_CONF": str(ROOT / "ci" / "containers.conf"),
    }


def measure(scenario: launch.Scenario, learning, run: launch.RunSettings, where: str, images: dict[str, str], timeout: float) -> list[Measured]:
    """Start every role of `scenario` at once and wait for all of them to exit."""
    run = run.resolved()
    with tempfile.TemporaryDirectory(prefix="splitfed-memory-") as folder:
        workdir = Path(folder)
        started: list[tuple[launch.Launch, subprocess.Popen, Path]] = []
        try:
            for member in scenario.plan(learning, run, workdir):
                command, env = role_command(member, run, where, images)
                log = workdir / f"{member.name}.log"
                with log.open("wb") as sink:
                    started.append((member, subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=sink), log))
            deadline = time.monotonic() + timeout
            for _, process, _ in started:
                process.wait(max(1.0, deadline - time.monotonic()))
        finally:
            for _, process, _ in started:
                if process.poll() is None:
                    process.kill()
                    process.wait()
            launch.delete_queues(launch.transport_factory(run), scenario.queues(learning, run))
        return [Measured(member.spec.name, member.name, peak_of(log.read_text(errors="replace")), log.read_text(errors="replace")) for member, _, log in started]


def peak_of(log: str) -> float | None:
    found = re.findall(rf"^{PEAK_LINE} (\d+)$", log, flags=re.MULTILINE)
    return int(found[-1]) / 1024 if found else None


def rounded_up(mib: float) -> int:
    return math.ceil(mib / ROUND_TO_MIB) * ROUND_TO_MIB


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--where", choices=("container", "host"), default="container")
    parser.add_argument("--broker", default="amqp://guest:guest@127.0.0.1:5672/%2F")
    parser.add_argument("--image", action="append", default=[], metavar="ROLE=IMAGE", help="run ROLE from IMAGE instead of localhost/splitfed-ROLE")
    parser.add_argument("--margin", type=float, default=1.25, help="limit = peak x MARGIN, rounded up to 32 Mi")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds a scenario may take")
    args = parser.parse_args()
    images = dict(pair.split("=", 1) for pair in args.image)

    results: list[Measured] = []
    for scenario, learning, run in (
        (split.SCENARIO, SplitSettings(epochs=1), split.SplitRun(broker=args.broker, via="relay")),
        (fedavg.SCENARIO, FederatedSettings(rounds=1), fedavg.FedAvgRun(broker=args.broker)),
    ):
        started = time.monotonic()
        results += measure(scenario, learning, run, args.where, images, args.timeout)
        print(f"{scenario.name}: {time.monotonic() - started:.0f} s", file=sys.stderr)

    print(f"\npeak RSS per role ({args.where}); request = peak, limit = peak x {args.margin:g}, both rounded up to {ROUND_TO_MIB} Mi")
    print(f"{'ROLE':<16} {'PROCESS':<16} {'PEAK_MIB':>9} {'REQUEST':>8} {'LIMIT':>8}")
    failed = [result for result in results if result.peak_mib is None]
    for result in results:
        if result.peak_mib is None:
            print(f"{result.role:<16} {result.name:<16} {'failed':>9}")
            continue
        print(f"{result.role:<16} {result.name:<16} {result.peak_mib:>9.0f} {rounded_up(result.peak_mib):>6}Mi {rounded_up(result.peak_mib * args.margin):>6}Mi")
    for result in failed:
        print(f"\n{result.name} failed; its log ends:\n" + "\n".join(result.log.splitlines()[-15:]), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
