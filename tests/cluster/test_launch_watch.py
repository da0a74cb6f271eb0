"""`splitfed launch` and its watch loop, against recorded API responses (no API server: see
recorded_api.FakeCoreV1Api): the real kubernetes client lists the release's pods, reads the lead's
log and events, and launch turns them into progress, a failure with its reason, or the results.
helm is the recording stand-in here; test_helm_dry_run runs the real one."""

from __future__ import annotations

import base64
import json
from datetime import datetime, timezone

import pytest

from splitfed.cluster import kube, watch
from splitfed.cluster.watch import PodFailure, Watch
from tests.cluster.conftest import invoke, recorded_json
from tests.cluster.recorded_api import Response, reply

PODS = "/api/v1/namespaces/ns1/pods"
EVENTS = "/api/v1/namespaces/ns1/events"
SELECTOR = {"labelSelector": "app.kubernetes.io/instance=fl"}
SERVER, W0, W1 = "fl-splitfed-fedavg-server-7xk2p", "fl-splitfed-fedavg-worker-0", "fl-splitfed-fedavg-worker-1"
CLIENT = "sp-splitfed-split-client-q9t4d"
EARLY = datetime(2025, 5, 6, 9, 15, 0, tzinfo=timezone.utc)  # 57 s after the pods were made
LATE = datetime(2025, 5, 6, 9, 20, 0, tzinfo=timezone.utc)  # 357 s after
FEDAVG = ["launch", "fedavg", "--name", "fl", "--workers", "2", "--partition", "iid", "--rounds", "2"]


def log_path(pod: str) -> str:
    return f"{PODS}/{pod}/log"


def a_watch(lead: str = "fedavg-server", release: str = "fl", now: datetime = EARLY, **options):
    progress, notices = [], []
    connected = kube.connect()
    follow = Watch(connected.core, connected.namespace, release, lead, progress.append, notices.append, clock=lambda: now, poll=0, **options)
    return follow, progress, notices


# -- the happy path -------------------------------------------------------------------------------


@pytest.mark.usefixtures("no_wait")
def test_launch_installs_follows_progress_and_writes_the_results(api, recording_helm, tmp_path):
    api.add("GET", PODS, "pods-none.json", "fl-pods-creating.json", "fl-pods-running.json", "fl-pods-running.json", "fl-pods-finished.json", **SELECTOR)
    api.add("GET", log_path(SERVER), "fl-server-finished.log")  # the whole log, once the Job's pod has succeeded
    api.add("GET", log_path(SERVER), reply("fl-server-log-creating.json", 400), "fl-server-running.log", tailLines=str(watch.LOG_TAIL))
    out = tmp_path / "fl.json"

    result = invoke(*FEDAVG, "--namespace", "ns1", "--out", out)

    assert result.exit_code == 0, result.stderr
    (call,) = recording_helm()
    assert call["argv"][:7] == ["upgrade", "--install", "fl", call["argv"][3], "--namespace", "ns1", "--create-namespace"]
    assert call["argv"][3].endswith("helm/splitfed")
    assert call["values"]["fedavgWorker"] == {"enabled": True, "replicas": 2}
    assert call["values"]["fedavg"] == {"settings": {"partition": "iid"}}
    assert call["values"]["fedavgServer"] == {"enabled": True, "settings": {"rounds": 2}}
    assert not any(call["values"][key]["enabled"] for key in ("relay", "splitClient", "splitServer"))
    # progress: each round once (the running log is read twice), from the recorded log's events
    assert result.stderr.count("round 1/2: test accuracy 0.6512") == 1
    assert result.stderr.count("round 2/2: test accuracy 0.7734") == 1
    # the results file: what the lead's result line holds, as `splitfed run` writes it
    written = json.loads(out.read_text())
    expected = recorded_json("fl-result.json")
    assert {key: written[key] for key in expected if key != "wall_seconds"} == {k: v for k, v in expected.items() if k != "wall_seconds"}
    assert written["scenario"] == "fedavg"
    assert written["config"]["workers"] == 2 and written["config"]["partition"] == "iid" and written["config"]["rounds"] == 2
    assert written["config"]["release"] == "fl" and written["config"]["namespace"] == "ns1" and written["config"]["launch"] == "kubernetes"
    assert "accuracy 0.7734" in result.stderr and "splitfed delete fl -n ns1" in result.stderr
    assert not api.made("DELETE")


def test_a_split_run_feeds_batches_and_epochs_and_ends_with_its_result(api):
    api.add("GET", PODS, "sp-pods-running.json", "sp-pods-finished.json", labelSelector="app.kubernetes.io/instance=sp")
    api.add("GET", log_path(CLIENT), "sp-client-finished.log")
    api.add("GET", log_path(CLIENT), "sp-client-running.log", tailLines=str(watch.LOG_TAIL))
    follow, progress, notices = a_watch("split-client", "sp")

    assert follow.run() == recorded_json("sp-result.json")
    assert [(p.event, p.done, p.total) for p in progress] == [
        ("batch", 469, 938), ("batch", 938, 938), ("epoch", 1, 2), ("batch", 469, 938), ("batch", 938, 938), ("epoch", 2, 2)]
    assert progress[2].record["accuracy"] == 0.8412
    assert notices == []
    log_reads = api.made("GET", "/log")
    assert log_reads[0].query == {"timestamps": "true", "tailLines": str(watch.LOG_TAIL)}
    assert log_reads[-1].query == {"timestamps": "true"}  # the whole log at the end: nothing is missed


def test_workers_restarted_after_the_run_are_not_a_failure(api):
    api.add("GET", PODS, "fl-pods-finished-workers-restarting.json", **SELECTOR)
    api.add("GET", log_path(SERVER), "fl-server-finished.log")
    follow, progress, _ = a_watch()
    assert follow.run() == recorded_json("fl-result.json")
    assert [p.done for p in progress] == [1, 2]


def test_a_lead_that_printed_no_result_is_said_so(api):
    api.add("GET", PODS, "fl-pods-finished.json", **SELECTOR)
    api.add("GET", log_path(SERVER), "fl-server-running.log")
    follow, _, _ = a_watch()
    with pytest.raises(watch.NoResult, match="no result line .*progress-events"):
        follow.run()


# -- each failure reason --------------------------------------------------------------------------

# reason -> (pods, the failing pod, its events, its log response, the first line, what else shows, previous container)
FAILURES = {
    "ImagePullBackOff": (
        "fl-pods-image-pull-backoff.json", SERVER, "fl-server-events.json", reply("fl-server-log-image-pull.json", 400),
        f'fedavg-server pod {SERVER}: ImagePullBackOff (Back-off pulling image "localhost/splitfed-fedavg-server:0.1.0")',
        ["localhost/splitfed-fedavg-server:0.1.0: not found", "(no log: 400 Bad Request: container \"fedavg-server\""], False),
    "ErrImagePull": (
        "fl-pods-err-image-pull.json", W1, "fl-worker-1-pull-events.json", reply("fl-worker-1-log-image-pull.json", 400),
        f"fedavg-worker pod {W1}: ErrImagePull (failed to pull and unpack image",
        ["event: Failed: Error: ErrImagePull", "dial tcp 127.0.0.1:443: connect: connection refused"], False),
    "CrashLoopBackOff": (
        "fl-pods-crash-loop.json", W1, "fl-worker-1-events.json", "fl-worker-1-previous.log",
        f"fedavg-worker pod {W1}: CrashLoopBackOff (exit code 4, 3 restarts)",
        ["event: BackOff: Back-off restarting failed container", "last log lines of the previous container:",
         "connection lost and not regained within 30s"], True),
    "OOMKilled": (
        "fl-pods-oom-killed.json", W0, "fl-worker-0-oom-events.json", "fl-worker-0-previous.log",
        f"fedavg-worker pod {W0}: OOMKilled (memory limit 640Mi, 1 restarts)",
        ["last log lines of the previous container:", "round 1: training on 24000 samples"], True),
    "CreateContainerConfigError": (
        "fl-pods-create-container-config-error.json", SERVER, "fl-server-config-events.json", reply("fl-server-log-config-error.json", 400),
        f'fedavg-server pod {SERVER}: CreateContainerConfigError (secret "fl-splitfed-broker" not found)',
        ['event: Failed: Error: secret "fl-splitfed-broker" not found'], False),
    "Pending for lack of GPUs": (
        "fl-pods-pending-gpu.json", W0, "fl-worker-0-gpu-events.json", Response(200, b"", "text/plain"),
        f"fedavg-worker pod {W0}: Pending for lack of GPUs (0/3 nodes are available: 1 node(s) had untolerated taint "
        "{node-role.kubernetes.io/control-plane: }, 2 Insufficient nvidia.com/gpu.",
        ["event: FailedScheduling: 0/3 nodes are available", "(its log is empty)"], False),
}


@pytest.mark.parametrize("reason", sorted(FAILURES))
def test_each_pod_failure_is_surfaced_with_its_reason_events_and_last_log_lines(api, reason):
    pods, pod, events, log, first_line, shown, previous = FAILURES[reason]
    api.add("GET", PODS, pods, **SELECTOR)
    api.add("GET", EVENTS, events, fieldSelector=f"involvedObject.name={pod}")
    api.add("GET", log_path(pod), log, tailLines=str(watch.LAST_LINES))
    follow, _, _ = a_watch(now=LATE)  # LATE: past --pending-timeout for the GPU case

    with pytest.raises(PodFailure) as failure:
        follow.run()

    message = str(failure.value)
    assert message.splitlines()[0].startswith(first_line), message
    for text in shown:
        assert text in message, message
    (read,) = api.made("GET", f"{pod}/log")
    assert read.query.get("previous") == ("true" if previous else "false")


def test_a_pod_pending_for_gpus_is_a_notice_until_the_pending_timeout(api):
    api.add("GET", PODS, "fl-pods-pending-gpu.json", **SELECTOR)
    api.add("GET", log_path(SERVER), "fl-server-running.log", tailLines=str(watch.LOG_TAIL))
    follow, progress, notices = a_watch(now=EARLY, pending_timeout=300)
    assert follow.step() is None and follow.step() is None
    assert notices == [f"fedavg-worker pod {W0}: Pending for lack of GPUs ({notice_message()})",
                       f"fedavg-worker pod {W1}: Pending for lack of GPUs ({notice_message()})"]  # once each, not every poll
    assert [p.done for p in progress] == [1]


def notice_message() -> str:
    pods = recorded_json("fl-pods-pending-gpu.json")
    return pods["items"][1]["status"]["conditions"][0]["message"]


def test_a_pod_short_of_memory_is_unschedulable_not_short_of_gpus(api):
    api.add("GET", PODS, "fl-pods-pending-memory.json", **SELECTOR)
    api.add("GET", EVENTS, "events-none.json")
    api.add("GET", log_path(W1), Response(200, b"", "text/plain"))
    follow, _, _ = a_watch(now=LATE)
    with pytest.raises(PodFailure, match=f"fedavg-worker pod {W1}: Unschedulable .*Insufficient memory"):
        follow.run()


@pytest.mark.usefixtures("no_wait")
def test_launch_exits_4_with_the_reason_and_says_the_release_stays(api, recording_helm):
    api.add("GET", PODS, "pods-none.json", "fl-pods-oom-killed.json", **SELECTOR)
    api.add("GET", EVENTS, "fl-worker-0-oom-events.json")
    api.add("GET", log_path(W0), "fl-worker-0-previous.log")
    api.add("GET", log_path(SERVER), "fl-server-running.log")

    result = invoke(*FEDAVG)

    assert result.exit_code == 4
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: fedavg-worker pod {W0}: OOMKilled (memory limit 640Mi, 1 restarts)"]
    assert "round 1: training on 24000 samples" in result.stderr
    assert "the release stays installed: splitfed logs fl -n ns1; splitfed delete fl -n ns1" in result.stderr
    assert "Traceback" not in result.stderr
    assert [call["argv"][0] for call in recording_helm()] == ["upgrade"]


# -- Ctrl-C, --detach, refusals ---------------------------------------------------------------------


def test_ctrl_c_stops_watching_not_the_run(api, recording_helm, monkeypatch):
    api.add("GET", PODS, "pods-none.json", "fl-pods-running.json", **SELECTOR)
    api.add("GET", log_path(SERVER), "fl-server-running.log")

    def interrupted(seconds: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(watch, "_sleep", interrupted)
    result = invoke(*FEDAVG)

    assert result.exit_code == 130
    assert "stopped watching; the run goes on in the cluster: follow it with: splitfed status --name fl -n ns1" in result.stderr
    assert "splitfed logs fl -n ns1 --follow" in result.stderr
    assert [call["argv"][0] for call in recording_helm()] == ["upgrade"]  # no helm uninstall
    assert not api.made("DELETE")


def test_detach_returns_after_install_and_makes_the_keys_secret(api, recording_helm, tmp_path):
    assert invoke("keys", "generate", "--workers", "2", "--out", tmp_path / "keys").exit_code == 0
    api.add("GET", PODS, "pods-none.json", **SELECTOR)
    api.add("POST", "/api/v1/namespaces/ns1/secrets", reply("fl-secret-created.json", 201))

    result = invoke(*FEDAVG, "--detach", "--key-list", tmp_path / "keys" / "key-list.json")

    assert result.exit_code == 0, result.stderr
    (made,) = api.made("POST", "/secrets")
    secret = json.loads(made.body)
    assert secret["metadata"]["name"] == "fl-keys"
    assert secret["metadata"]["labels"] == {"app.kubernetes.io/instance": "fl", "app.kubernetes.io/managed-by": "splitfed-launch",
                                            "app.kubernetes.io/part-of": "splitfed"}
    assert sorted(secret["data"]) == ["fedavg-server.key", "key-list.json", "worker-0.key", "worker-1.key"]
    assert base64.b64decode(secret["data"]["key-list.json"]) == (tmp_path / "keys" / "key-list.json").read_bytes()
    (call,) = recording_helm()
    assert call["values"]["keys"] == {"existingSecret": "fl-keys", "keyListKey": "key-list.json"}
    assert "launched fedavg as release fl in namespace ns1 (session fl)" in result.stderr
    assert len([r for r in api.requests if r.path == PODS]) == 1  # the check before installing; no watch


def test_a_missing_private_key_stops_launch_before_anything_is_made(api, recording_helm, tmp_path):
    assert invoke("keys", "generate", "--workers", "1", "--out", tmp_path / "keys").exit_code == 0
    result = invoke(*FEDAVG, "--key-list", tmp_path / "keys" / "key-list.json")
    assert result.exit_code == 2
    assert "worker-1.key missing beside it" in result.stderr
    assert recording_helm() == [] and not api.made("POST")


def test_a_release_that_already_ran_is_not_launched_again(api, recording_helm):
    api.add("GET", PODS, "fl-pods-finished.json", **SELECTOR)
    result = invoke(*FEDAVG)
    assert result.exit_code == 2
    assert "release fl in namespace ns1 has already run to its end" in result.stderr
    assert recording_helm() == []


@pytest.mark.usefixtures("no_wait")
def test_wait_timeout_gives_up_watching_with_exit_3(api, recording_helm):
    api.add("GET", PODS, "pods-none.json", "fl-pods-running.json", **SELECTOR)
    api.add("GET", log_path(SERVER), "fl-server-running.log")
    result = invoke(*FEDAVG, "--wait-timeout", "0.001")
    assert result.exit_code == 3
    assert "no result within --wait-timeout 0.001s; the run goes on" in result.stderr
    assert [call["argv"][0] for call in recording_helm()] == ["upgrade"]


def test_bad_options_fail_before_the_cluster_is_asked(api, recording_helm):
    for args, says in ((["--name", "Not_A_Name"], "--name 'Not_A_Name'"), (["--lr", "fast"], "--lr 'fast': not a number"),
                       (["--partition", "classes:0-4,5-9", "--workers", "3"], "2 groups of classes for 3 workers"),
                       (["-f", "/missing/values.yaml"], "--values /missing/values.yaml: no such file")):
        result = invoke("launch", "fedavg", *args)
        assert result.exit_code == 2, (args, result.stderr)
        assert says in result.stderr
    assert recording_helm() == [] and api.requests == []


def test_launch_warns_when_the_model_will_not_fit_the_memory_limit(api, recording_helm):
    """splitfed.sizing's estimate against the values helm will use (the chart's, launch's, --set)."""
    api.add("GET", PODS, "pods-none.json", **SELECTOR)
    result = invoke(*FEDAVG, "--detach", "--set", "fedavgWorker.resources.limits.memory=64Mi")
    assert result.exit_code == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and warnings[0].startswith("warning: fedavg-worker: memory limit 64Mi"), result.stderr
    assert len(recording_helm()) == 1  # a warning, not a refusal

    result = invoke(*FEDAVG, "--detach")
    assert "warning:" not in result.stderr  # the chart's limits fit its default model


# -- splitnn: several split clients, the server leads -----------------------------------------------

NN_SERVER = "nn-splitfed-split-server-m4c7q"


@pytest.mark.usefixtures("no_wait")
def test_a_splitnn_launch_follows_the_server_to_its_result(api, recording_helm, tmp_path):
    """Among several clients the split-server is the lead: launch follows its log (its epoch
    events, then its result), not the clients'."""
    api.add("GET", PODS, "pods-none.json", "nn-pods-running.json", "nn-pods-finished.json", labelSelector="app.kubernetes.io/instance=nn")
    api.add("GET", log_path(NN_SERVER), "nn-server-finished.log")
    api.add("GET", log_path(NN_SERVER), "nn-server-running.log", tailLines=str(watch.LOG_TAIL))
    out = tmp_path / "nn.json"

    result = invoke("launch", "splitnn", "--name", "nn", "--namespace", "ns1", "--clients", "3", "--schedule", "splitfed-v2",
                    "--epochs", "2", "--out", out)

    assert result.exit_code == 0, result.stderr
    (call,) = recording_helm()
    chosen = call["values"]
    assert chosen["splitClient"] == {"enabled": True, "replicas": 3, "settings": {"progress-events": False}}
    assert chosen["splitServer"] == {"enabled": True, "settings": {"progress-events": True}}
    assert chosen["splitFed"] == {"enabled": True} and chosen["relay"] == {"enabled": False}
    assert chosen["split"] == {"settings": {"schedule": "splitfed-v2", "epochs": 2}}
    assert result.stderr.count("epoch 1/2: test accuracy 0.8237") == 1
    assert result.stderr.count("epoch 2/2: test accuracy 0.8519") == 1
    written = json.loads(out.read_text())
    expected = recorded_json("nn-result.json")
    assert {key: written[key] for key in expected} == expected
    assert written["scenario"] == "splitnn"
    assert written["config"]["clients"] == 3 and written["config"]["schedule"] == "splitfed-v2"
    # only the server's log was read: the clients print no progress events
    assert {request.path for request in api.made("GET", "/log")} == {log_path(NN_SERVER)}


def test_a_splitnn_release_that_already_ran_is_not_launched_again(api, recording_helm):
    api.add("GET", PODS, "nn-pods-finished.json", labelSelector="app.kubernetes.io/instance=nn")
    result = invoke("launch", "splitnn", "--name", "nn", "--clients", "3")
    assert result.exit_code == 2
    assert "release nn in namespace ns1 has already run to its end" in result.stderr
    assert recording_helm() == []


def test_a_splitnn_launch_needs_every_partys_key(api, recording_helm, tmp_path):
    keys = tmp_path / "keys"
    assert invoke("keys", "generate", "--no-server", "--party", "split-server", "--party", "split-fed", "--party", "split-client-0",
                  "--party", "split-client-1", "--out", keys).exit_code == 0
    result = invoke("launch", "splitnn", "--name", "nn", "--clients", "3", "--key-list", keys / "key-list.json")
    assert result.exit_code == 2
    assert "split-client-2.key missing beside it" in result.stderr
    assert recording_helm() == [] and not api.made("POST")
