"""splitfed.sizing against the real roles: every role of a split run (through the relay) and of a
FedAvg run, as `splitfed serve` processes over RabbitMQ, at two sizes each, must peak within its
estimate's bounds.

The roles are started and measured by ci/measure_memory.py (--where host): each reports VmHWM
from /proc/self/status as it exits, not getrusage's ru_maxrss. A child that Python
spawns with vfork starts in its parent's address space, and Linux carries that address space's
high-water mark into the child's ru_maxrss across exec: from this pytest process, with torch
imported, the relay read 684 MiB where its own peak is 65 MiB. VmHWM belongs to the new address
space alone. (In containers the parent is the runtime, which is small.)

The two sizes: for FedAvg, the tiny and cnn models; tiny cannot be split (its client half would hold
no parameters), so the split roles run cnn cut at the default layer 9 (a (B, 128) activation) and at
layer 3 (after the first conv block: the server then runs a conv block and messages are 49 times
larger). Training uses the first 2000 samples, to stay short; evaluation the whole test set (20
batches of 500), where the peaks are. The estimate uses the torch build this virtualenv has.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from splitfed import sizing
from splitfed.learning.settings import FederatedSettings, SplitNNSettings
from splitfed.scenarios import fedavg, split

ROOT = Path(__file__).resolve().parents[2]
TORCH_BUILD = "cuda" if torch.version.cuda else "cpu"

CASES = {
    "split cnn cut 9": (split.SCENARIO, SplitNNSettings(model="cnn", epochs=1, limit=2000)),
    "split cnn cut 3": (split.SCENARIO, SplitNNSettings(model="cnn", epochs=1, limit=2000, cut_layer=3)),
    "fedavg tiny": (fedavg.SCENARIO, FederatedSettings(model="tiny", rounds=1, workers=2, partition="iid", limit=2000)),
    "fedavg cnn": (fedavg.SCENARIO, FederatedSettings(model="cnn", rounds=1, workers=2, partition="iid", limit=2000)),
}


@pytest.fixture(scope="module")
def measure_memory():
    spec = importlib.util.spec_from_file_location("measure_memory", ROOT / "ci" / "measure_memory.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    # A role started from this torch-laden interpreter must report its own peak, not ours.
    assert "VmHWM" in module.SERVE_AND_REPORT and "ru_maxrss" not in module.SERVE_AND_REPORT
    yield module
    sys.modules.pop(spec.name, None)


@pytest.mark.broker
@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", CASES)
def test_real_peaks_lie_within_the_estimate(case, measure_memory, broker_url):
    scenario, learning = CASES[case]
    run = split.SplitRun(broker=broker_url, via="relay") if scenario is split.SCENARIO else fedavg.FedAvgRun(broker=broker_url)
    measured = measure_memory.measure(scenario, learning, run, "host", {}, timeout=240)
    failed = [m for m in measured if m.peak_mib is None]
    assert not failed, "\n\n".join(f"{m.name} failed:\n" + "\n".join(m.log.splitlines()[-15:]) for m in failed)
    assert sorted({m.role for m in measured}) == sorted(("relay", "split-client", "split-server") if scenario is split.SCENARIO else ("fedavg-server", "fedavg-worker"))

    lines, outside = [f"{case}, torch {TORCH_BUILD} build: role, process, measured peak, low, estimate, high (MiB)"], []
    for m in measured:
        found = sizing.estimate(m.role, learning, torch_build=TORCH_BUILD)
        line = f"{m.role:<14} {m.name:<14} {m.peak_mib:7.0f} {found.low_mib:7.0f} {found.mib:7.0f} {found.high_mib:7.0f}"
        lines.append(line)
        if not found.low_mib <= m.peak_mib <= found.high_mib:
            outside.append(line)
    print("\n".join(lines))
    assert not outside, "outside the estimate's bounds:\n" + "\n".join(lines)
