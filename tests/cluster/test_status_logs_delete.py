"""`splitfed status`, `logs` and `delete` against recorded API responses (no API server: see
recorded_api.FakeCoreV1Api, the stand-in for the API server, which cannot run here), with helm as
the recording stand-in for `delete`."""

from __future__ import annotations

import pytest

from splitfed.cluster.watch import parse_line
from tests.cluster.conftest import invoke
from tests.cluster.recorded_api import RECORDED

PODS = "/api/v1/namespaces/ns1/pods"
RUNS = {"labelSelector": "app.kubernetes.io/part-of=splitfed"}
FL = {"labelSelector": "app.kubernetes.io/part-of=splitfed,app.kubernetes.io/instance=fl"}
SERVER, W0, W1 = "fl-splitfed-fedavg-server-7xk2p", "fl-splitfed-fedavg-worker-0", "fl-splitfed-fedavg-worker-1"
CLIENT = "sp-splitfed-split-client-q9t4d"


def rows(stdout: str) -> dict[str, list[str]]:
    """The status table's rows by release (cells split on the table's borders)."""
    found = {}
    for line in stdout.splitlines():
        cells = [cell.strip() for cell in line.strip("│ ").split("│")]
        if len(cells) == 7 and cells[0] not in ("release", ""):
            found[cells[0]] = cells
    return found


def test_status_lists_each_run_with_scenario_progress_accuracy_and_pod_health(api):
    api.add("GET", PODS, "status-pods.json", **RUNS)
    api.add("GET", f"{PODS}/{SERVER}/log", "fl-server-round-3.log", tailLines="2000")
    api.add("GET", f"{PODS}/{CLIENT}/log", "sp-client-epoch-2.log", tailLines="2000")

    result = invoke("status")

    assert result.exit_code == 0, result.stderr
    table = rows(result.stdout)
    assert table["fl"] == ["fl", "ns1", "fedavg", "round 3/10", "0.7921", "4 running", "-"]
    assert table["sp"] == ["sp", "ns1", "split", "epoch 2 batch 312/938", "0.8412", "1 pending, 3 running",
                           "split-server: Pending for lack of GPUs"]


def test_status_of_one_run_lists_its_pods(api):
    api.add("GET", PODS, "sp-pods.json", labelSelector="app.kubernetes.io/part-of=splitfed,app.kubernetes.io/instance=sp")
    api.add("GET", f"{PODS}/{CLIENT}/log", "sp-client-epoch-2.log", tailLines="2000")
    result = invoke("status", "--name", "sp")
    assert result.exit_code == 0, result.stderr
    pods = [line for line in result.stdout.splitlines() if "sp-splitfed-" in line]
    assert any("split-server" in line and "Pending" in line and "Pending for lack of GPUs" in line for line in pods), result.stdout
    assert any(CLIENT in line and "Running" in line for line in pods)


def test_status_across_namespaces_and_with_no_runs(api):
    api.add("GET", "/api/v1/pods", "status-pods.json", **RUNS)
    api.add("GET", f"{PODS}/{SERVER}/log", "fl-server-round-3.log")
    api.add("GET", f"{PODS}/{CLIENT}/log", "sp-client-epoch-2.log")
    assert set(rows(invoke("status", "-A").stdout)) == {"fl", "sp"}

    api.add("GET", "/api/v1/namespaces/empty/pods", "pods-none.json")
    result = invoke("status", "-n", "empty")
    assert result.exit_code == 0 and "no splitfed runs in namespace empty" in result.stdout
    result = invoke("status", "-n", "empty", "--name", "gone")
    assert result.exit_code == 2 and "error: no run named gone in namespace empty" in result.stderr


def test_status_reads_the_pods_and_the_lead_logs_only(api):
    api.add("GET", PODS, "status-pods.json", **RUNS)
    api.add("GET", f"{PODS}/{SERVER}/log", "fl-server-round-3.log")
    api.add("GET", f"{PODS}/{CLIENT}/log", "sp-client-epoch-2.log")
    invoke("status")
    assert {(r.method, r.path) for r in api.requests} == {
        ("GET", "/version/"), ("GET", PODS), ("GET", f"{PODS}/{SERVER}/log"), ("GET", f"{PODS}/{CLIENT}/log")}


NN = {"labelSelector": "app.kubernetes.io/part-of=splitfed,app.kubernetes.io/instance=nn"}
NN_SERVER = "nn-splitfed-split-server-m4c7q"


def test_status_of_a_splitnn_run_reads_the_server_which_leads_it(api):
    """split and splitnn run the same roles: the lead tells them apart, here the server, which
    prints the progress events (the three clients do not)."""
    api.add("GET", PODS, "nn-pods-running.json", **NN)
    api.add("GET", f"{PODS}/{NN_SERVER}/log", "nn-server-running.log", tailLines="2000")
    result = invoke("status", "--name", "nn")
    assert result.exit_code == 0, result.stderr
    assert rows(result.stdout)["nn"] == ["nn", "ns1", "splitnn", "epoch 1/2", "0.8237", "6 running", "-"]
    assert {r.path for r in api.made("GET", "/log")} == {f"{PODS}/{NN_SERVER}/log"}
    pods = [line for line in result.stdout.splitlines() if "nn-splitfed-split-client-" in line]
    assert len(pods) == 3


def test_logs_of_a_splitnn_run_default_to_the_server(api):
    api.add("GET", PODS, "nn-pods-finished.json", **NN)
    api.add("GET", f"{PODS}/{NN_SERVER}/log", "nn-server-finished.log")
    result = invoke("logs", "nn")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == (RECORDED / "nn-server-finished.log").read_text()


def test_the_lead_of_pods_that_do_not_say_follows_the_charts_choice():
    """Pods whose env does not say who prints progress events: one split client leads its run,
    the server leads several (the chart's splitfed.splitLead)."""
    from kubernetes.client import V1Container, V1EnvVar, V1ObjectMeta, V1Pod, V1PodSpec

    from splitfed.cluster.commands import _lead_pods

    def pod(role: str, name: str, progress: str | None = None) -> V1Pod:
        env = [V1EnvVar(name="SPLITFED_PROGRESS_EVENTS", value=progress)] if progress is not None else []
        return V1Pod(metadata=V1ObjectMeta(name=name, labels={"app.kubernetes.io/component": role}),
                     spec=V1PodSpec(containers=[V1Container(name=role, env=env)]))

    def leads(*pods: V1Pod) -> list[str]:
        return [p.metadata.name for p in _lead_pods(list(pods))]

    server, fed = pod("split-server", "server"), pod("split-fed", "fed")
    assert leads(pod("split-client", "c"), server, pod("relay", "relay")) == ["c"]
    assert leads(pod("split-client", "c0"), pod("split-client", "c1"), server, fed) == ["server"]
    assert leads(pod("split-client", "c", "true"), pod("split-server", "s", "false")) == ["c"]  # the env decides
    assert leads(pod("split-client", "c", "false"), server) == ["server"]  # a launch of splitnn with one client
    assert leads(pod("fedavg-server", "f"), pod("fedavg-worker", "w")) == ["f"]


def test_status_tells_a_p2p_run_from_an_smpl_run_by_their_peers():
    """Both lead with the p2p-tracker, whose log holds a progress event per peer report."""
    from types import SimpleNamespace

    from kubernetes.client import V1Container, V1EnvVar, V1ObjectMeta, V1Pod, V1PodSpec

    from splitfed.cluster.commands import _lead_pods, _run_state
    from splitfed.cluster.kube import Kube

    def pod(role: str, name: str, progress: str | None = None) -> V1Pod:
        env = [V1EnvVar(name="SPLITFED_PROGRESS_EVENTS", value=progress)] if progress is not None else []
        return V1Pod(metadata=V1ObjectMeta(name=name, labels={"app.kubernetes.io/component": role}),
                     spec=V1PodSpec(containers=[V1Container(name=role, env=env)]))

    report = '{"event": "round", "done": 5, "total": 12, "loss": 0.6, "record": {"step": 5, "accuracy": 0.81, "peer": "p2p-peer-1"}}'
    logs = {"tracker": f"2026-11-24T10:00:00Z p2p-tracker ready\n2026-11-24T10:01:00Z {report}\n"}
    kube = Kube(SimpleNamespace(read_namespaced_pod_log=lambda name, namespace, **_: logs[name]), "ns1", "https://stand-in", None)
    for peer, scenario in (("p2p-peer", "p2p"), ("smpl-peer", "smpl")):
        pods = [pod("p2p-tracker", "tracker", "true"), pod(peer, f"{peer}-0"), pod(peer, f"{peer}-1")]
        assert [p.metadata.name for p in _lead_pods(pods)] == ["tracker"]
        assert _run_state(kube, "ns1", pods) == (scenario, "round 5/12", "0.8100")


# -- logs ---------------------------------------------------------------------------------------


def test_logs_prints_the_lead_by_default(api):
    api.add("GET", PODS, "fl-pods-running.json", **FL)
    api.add("GET", f"{PODS}/{SERVER}/log", "fl-server-running.log")
    result = invoke("logs", "fl")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == (RECORDED / "fl-server-running.log").read_text()
    (read,) = api.made("GET", "/log")
    assert read.query == {"previous": "false", "tailLines": "100"}


def test_logs_of_a_role_with_several_pods_and_of_a_previous_container(api):
    api.add("GET", PODS, "fl-pods-crash-loop.json", **FL)
    api.add("GET", f"{PODS}/{W0}/log", "fl-worker-0-previous.log")
    api.add("GET", f"{PODS}/{W1}/log", "fl-worker-1-previous.log")
    result = invoke("logs", "fl", "--role", "fedavg-worker", "--previous", "--tail", "0")
    assert result.exit_code == 0, result.stderr
    assert f"==> {W0} (fedavg-worker) <==" in result.stdout and f"==> {W1} (fedavg-worker) <==" in result.stdout
    assert "connection lost and not regained within 30s" in result.stdout
    assert [r.query for r in api.made("GET", "/log")] == [{"previous": "true"}] * 2


def without_timestamps(name: str) -> str:
    """A log read with timestamps, as `logs` prints it: each line's text."""
    return "".join(parse_line(line)[1] + "\n" for line in (RECORDED / name).read_text().splitlines())


def test_logs_follow_streams_one_pod(api):
    api.add("GET", PODS, "fl-pods-running.json", **FL)
    api.add("GET", f"{PODS}/{SERVER}/log", "fl-server-finished.log", follow="true")
    result = invoke("logs", "fl", "--follow")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == without_timestamps("fl-server-finished.log")
    (read,) = api.made("GET", "/log")
    assert read.query == {"follow": "true", "previous": "false", "tailLines": "100", "timestamps": "true"}  # stamped, to resume a dropped stream

    result = invoke("logs", "fl", "--role", "fedavg-worker", "--follow")
    assert result.exit_code == 2 and "--follow follows one pod; 2 match: give --pod" in result.stderr


def test_logs_of_a_role_the_run_lacks(api):
    api.add("GET", PODS, "fl-pods-running.json", **FL)
    result = invoke("logs", "fl", "--role", "relay")
    assert result.exit_code == 2
    assert "no role relay of run fl in namespace ns1 (its roles: broker, fedavg-server, fedavg-worker" in result.stderr


# -- delete -------------------------------------------------------------------------------------

SECRETS = "/api/v1/namespaces/ns1/secrets"
CLAIMS = "/api/v1/namespaces/ns1/persistentvolumeclaims"
LAUNCHED = {"labelSelector": "app.kubernetes.io/instance=fl,app.kubernetes.io/managed-by=splitfed-launch"}


def test_delete_uninstalls_removes_the_keys_secret_and_keeps_the_broker_volume(api, recording_helm):
    api.add("GET", SECRETS, "fl-launch-secrets.json", **LAUNCHED)
    api.add("DELETE", f"{SECRETS}/fl-keys", "fl-secret-deleted.json")
    api.add("GET", CLAIMS, "fl-pvcs.json", labelSelector="app.kubernetes.io/instance=fl")

    result = invoke("delete", "fl")

    assert result.exit_code == 0, result.stderr
    assert [call["argv"] for call in recording_helm()] == [["uninstall", "fl", "--namespace", "ns1"]]
    assert [(r.method, r.path) for r in api.made("DELETE")] == [("DELETE", f"{SECRETS}/fl-keys")]
    assert "deleted release fl, 1 keys Secret in namespace ns1" in result.stderr
    assert "kept 1 volume claims (data-fl-splitfed-broker-0): splitfed delete fl --volumes removes them" in result.stderr


def test_delete_volumes_and_kube_context(api, recording_helm):
    api.add("GET", SECRETS, "secrets-none.json")
    api.add("GET", CLAIMS, "fl-pvcs.json")
    api.add("DELETE", f"{CLAIMS}/data-fl-splitfed-broker-0", "fl-pvc-deleted.json")
    result = invoke("delete", "fl", "--volumes", "--kube-context", "recorded")
    assert result.exit_code == 0, result.stderr
    assert recording_helm()[0]["argv"] == ["uninstall", "fl", "--namespace", "ns1", "--kube-context", "recorded"]
    assert [r.path for r in api.made("DELETE")] == [f"{CLAIMS}/data-fl-splitfed-broker-0"]


def test_delete_of_a_release_that_is_not_there(api, recording_helm, monkeypatch):
    monkeypatch.setenv("RECORDING_HELM_FAILS", "Error: uninstall: Release not loaded: gone: release: not found")
    api.add("GET", SECRETS, "secrets-none.json")
    api.add("GET", CLAIMS, "pvcs-none.json")
    result = invoke("delete", "gone")
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: no release gone in namespace ns1 (splitfed status lists the runs)"


@pytest.mark.parametrize("failure", ["Error: uninstall: Kubernetes cluster unreachable: the server has asked for the client to provide credentials"])
def test_a_helm_failure_is_one_line(api, recording_helm, monkeypatch, failure):
    monkeypatch.setenv("RECORDING_HELM_FAILS", failure)
    result = invoke("delete", "fl")
    assert result.exit_code == 7
    assert result.stderr.strip() == "error: helm uninstall failed: uninstall: Kubernetes cluster unreachable: the server has asked for the client to provide credentials"
