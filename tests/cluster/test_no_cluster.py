"""Without a reachable cluster every cluster command fails within seconds with one clear line on
stderr and exit code 7: never a hang, never a traceback. Real processes, real kubernetes client:
KUBECONFIG names a missing file, or a config whose server is a closed port on 127.0.0.1."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.ports import free_port

COMMANDS = {
    "launch fedavg": ["launch", "fedavg", "--name", "fl", "--rounds", "2"],
    "launch split": ["launch", "split", "--name", "sp", "--epochs", "1"],
    "status": ["status"],
    "status -A": ["status", "-A"],
    "logs": ["logs", "fl"],
    "delete": ["delete", "fl"],
}


@pytest.fixture(scope="module")
def kubeconfigs(tmp_path_factory) -> dict[str, tuple[str, str]]:
    folder = tmp_path_factory.mktemp("kube")
    port = free_port()  # nothing listens on it
    refused = folder / "refused.yaml"
    refused.write_text(f"""apiVersion: v1
kind: Config
clusters: [{{name: c, cluster: {{server: "https://127.0.0.1:{port}"}}}}]
users: [{{name: u, user: {{token: t}}}}]
contexts: [{{name: x, context: {{cluster: c, user: u, namespace: ns1}}}}]
current-context: x
""")
    return {"missing file": (str(folder / "no-such-config"), "no usable kube config"),
            "closed port": (str(refused), f"at https://127.0.0.1:{port}: connection refused")}


def run(args: list[str], kubeconfig: str, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "KUBECONFIG": kubeconfig, "SPLITFED_HELM": sys.executable, **env}
    environ.pop("KUBERNETES_SERVICE_HOST", None)  # never the in-cluster config of a CI pod
    return subprocess.run([sys.executable, "-m", "splitfed", *args], capture_output=True, text=True, env=environ, timeout=120)


@pytest.mark.parametrize("config", ["missing file", "closed port"])
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_no_cluster_is_one_line(kubeconfigs, command, config):
    """Refused at the first connection check (its message says so), never retried with backoff."""
    kubeconfig, says = kubeconfigs[config]
    done = run(COMMANDS[command], kubeconfig)
    assert done.returncode == 7, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1, done.stderr  # one line
    assert done.stderr.startswith("error: no reachable Kubernetes cluster") and says in done.stderr, done.stderr
    assert done.stderr.rstrip().endswith("check KUBECONFIG / --kube-context")


def test_without_the_kubernetes_client_the_line_names_the_extra(kubeconfigs):
    code = "import sys; sys.modules['kubernetes'] = None; from splitfed.cli import main; sys.argv = ['splitfed', 'status']; main()"
    environ = {**os.environ, "KUBECONFIG": kubeconfigs["closed port"][0]}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environ, timeout=60)
    assert done.returncode == 7
    assert done.stderr.strip() == "error: the Kubernetes client is not installed: pip install 'splitfed[cluster]' (the kubernetes package)"


def test_without_helm_launch_says_so(kubeconfigs, tmp_path):
    done = run(COMMANDS["launch fedavg"], kubeconfigs["closed port"][0], SPLITFED_HELM=str(tmp_path / "no-helm"))
    assert done.returncode == 7
    assert done.stderr.strip() == f"error: SPLITFED_HELM={tmp_path / 'no-helm'}: no such program"
