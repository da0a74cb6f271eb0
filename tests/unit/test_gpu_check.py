"""The GPU check (ci/gpu_check.sh, ci/gpu_wheels.sh, ci/bench_device.py) runs only on a lent GPU
machine, and its --cpu-only run takes minutes: here its scripts are held shellcheck clean and
valid, and the benchmark's commands parse."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.cluster.test_kind_script import shellcheck

CI = Path(__file__).resolve().parents[2] / "ci"


@pytest.mark.parametrize("script", ["gpu_check.sh", "gpu_wheels.sh"])
def test_the_gpu_check_scripts_are_shellcheck_clean(script):
    done = subprocess.run([shellcheck(), "-x", str(CI / script)], capture_output=True, text=True, cwd=CI.parent)
    assert done.returncode == 0, done.stdout
    assert subprocess.run(["bash", "-n", str(CI / script)]).returncode == 0


@pytest.mark.parametrize("command", ["scenarios", "throughput"])
def test_the_device_benchmark_commands_parse(command):
    done = subprocess.run([sys.executable, str(CI / "bench_device.py"), command, "--help"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "--out-dir" in done.stdout
