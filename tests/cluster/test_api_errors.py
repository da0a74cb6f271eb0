"""API errors, against recorded API responses (recorded_api.FakeCoreV1Api: no API server runs
here): a refusal (403 on a pod's log, on events), a busy or failing API server in the middle of a
watch (429 from API Priority and Fairness, 503 from an API server shutting down, 500 from a
kubelet that did not answer), a connection dropped partway through an answer or a log stream, and
controllers that cannot make their pods (FailedCreate events: a quota, an admission webhook, a
LimitRange). kube.request retries with its backoff; the `backoff` fixture records the pauses it
would make instead of waiting them."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from splitfed.cluster import kube
from splitfed.cluster.watch import PodFailure
from tests.cluster.conftest import invoke, recorded_json
from tests.cluster.recorded_api import RECORDED, dropped, reply
from tests.cluster.test_launch_watch import EVENTS, FEDAVG, PODS, SELECTOR, SERVER, a_watch, log_path
from tests.cluster.test_status_logs_delete import FL, RUNS, rows, without_timestamps

TAIL = {"tailLines": "500"}
LOG_REFUSED = (f'error: the Kubernetes API refused to read the log of pod {SERVER} in namespace ns1: User "jane" lacks the permission '
               "get pods/log in namespace ns1; grant it with a Role and RoleBinding")
STAYS = "the release stays installed: splitfed logs fl -n ns1; splitfed delete fl -n ns1"


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def pod_lists(api) -> list:
    """The requests that listed the pods (not those of a pod's log, which share the path's start)."""
    return [request for request in api.requests if request.path == PODS]


# -- 403: the missing permission, named ------------------------------------------------------------


@pytest.mark.parametrize("follow", [False, True], ids=["logs", "logs --follow"])
def test_logs_refused_names_the_missing_permission(api, backoff, follow):
    api.add("GET", PODS, "fl-pods-running.json", **FL)
    api.add("GET", log_path(SERVER), reply("fl-server-log-forbidden.json", 403))

    result = invoke("logs", "fl", *(["--follow"] if follow else []))

    assert result.exit_code == 7
    assert result.stderr.strip() == (LOG_REFUSED.replace("to read the log", "to follow the log") if follow else LOG_REFUSED)
    assert len(api.made("GET", "/log")) == 1 and backoff == []  # a refusal is not asked again


@pytest.mark.usefixtures("no_wait")
def test_launch_whose_lead_log_is_refused_exits_7_naming_the_permission(api, recording_helm, backoff):
    api.add("GET", PODS, "pods-none.json", "fl-pods-running.json", **SELECTOR)
    api.add("GET", log_path(SERVER), reply("fl-server-log-forbidden.json", 403))

    result = invoke(*FEDAVG)

    assert result.exit_code == 7
    assert error_lines(result.stderr) == [LOG_REFUSED]
    assert STAYS in result.stderr and "Traceback" not in result.stderr
    assert len(api.made("GET", "/log")) == 1 and backoff == []


def test_status_shows_the_runs_and_names_the_log_it_may_not_read(api):
    api.add("GET", PODS, "status-pods.json", **RUNS)
    api.add("GET", log_path(SERVER), reply("fl-server-log-forbidden.json", 403))
    api.add("GET", log_path("sp-splitfed-split-client-q9t4d"), "sp-client-epoch-2.log")

    result = invoke("status")

    assert result.exit_code == 7
    table = rows(result.stdout)
    assert table["fl"] == ["fl", "ns1", "?", "unknown (log unread)", "?", "4 running", "-"]
    assert table["sp"][3:5] == ["epoch 2 batch 312/938", "0.8412"]  # the other release as ever
    assert error_lines(result.stderr) == [LOG_REFUSED]


def test_without_access_to_events_the_watch_goes_on_and_says_what_it_cannot_see(api):
    api.add("GET", EVENTS, reply("events-forbidden.json", 403), fieldSelector="reason=FailedCreate")
    api.add("GET", PODS, "fl-pods-running.json", "fl-pods-finished.json", **SELECTOR)
    api.add("GET", log_path(SERVER), "fl-server-finished.log")
    api.add("GET", log_path(SERVER), "fl-server-running.log", **TAIL)
    follow, _, notices = a_watch()

    assert follow.run() == recorded_json("fl-result.json")
    assert notices == ["not watching for pods the cluster refuses to make: the Kubernetes API refused to list the events "
                       '(reason=FailedCreate) in namespace ns1: User "jane" lacks the permission list events in namespace ns1; '
                       "grant it with a Role and RoleBinding"]
    assert len(api.made("GET", "/events")) == 1  # not asked again at the next poll


# -- 429 and 5xx in the middle of a watch: retried with backoff --------------------------------------


@pytest.mark.usefixtures("no_wait")
def test_a_busy_or_failing_api_server_mid_watch_is_asked_again(api, recording_helm, backoff, tmp_path):
    # launch's own check, then poll 1: throttled, then creating; poll 2: shutting down, then running; ...
    api.add("GET", PODS, "pods-none.json", "too-many-requests.http", "fl-pods-creating.json", "apiserver-shutting-down.http",
            "fl-pods-running.json", "fl-pods-running.json", "fl-pods-finished.json", **SELECTOR)
    api.add("GET", log_path(SERVER), "fl-server-finished.log")
    # poll 1: not started; poll 2: the kubelet does not answer twice, then the log; poll 3: the log
    api.add("GET", log_path(SERVER), reply("fl-server-log-creating.json", 400), reply("fl-server-log-kubelet-refused.json", 500),
            reply("fl-server-log-kubelet-refused.json", 500), "fl-server-running.log", **TAIL)
    out = tmp_path / "fl.json"

    result = invoke(*FEDAVG, "--out", out)

    assert result.exit_code == 0, result.stderr
    assert backoff == [4.0, 1.0, 1.0, 2.0]  # Retry-After 4 (throttled), Retry-After 1 (shutting down), then 1 s doubling
    assert len(pod_lists(api)) == 7
    assert [r.query.get("tailLines") for r in api.made("GET", "/log")] == ["500"] * 5 + [None]
    assert result.stderr.count("round 1/2: test accuracy 0.6512") == 1
    assert json.loads(out.read_text())["accuracy"] == recorded_json("fl-result.json")["accuracy"]


LOG_WHAT = f"read the log of pod {SERVER} in namespace ns1"
PODS_WHAT = "list the pods of release fl in namespace ns1"
KUBELET = (f'500 Internal Server Error: Get "https://172.18.0.3:10250/containerLogs/ns1/{SERVER}/fedavg-server?tailLines=500&timestamps=true": '
           "dial tcp 172.18.0.3:10250: connect: connection refused")
KEEPS_FAILING = {  # the failing answer, on which route, the request named, the pauses, the last error
    "429 throttled": ("too-many-requests.http", "pods", PODS_WHAT, [4.0] * 5, "429 Too Many Requests: Too many requests, please try again later."),
    "503 shutting down": ("apiserver-shutting-down.http", "pods", PODS_WHAT, [1.0] * 5, "503 Service Unavailable: apiserver is shutting down"),
    "500 from the kubelet": (reply("fl-server-log-kubelet-refused.json", 500), "log", LOG_WHAT, [1.0, 2.0, 4.0, 8.0, 16.0], KUBELET),
    "dropped connections": (dropped("fl-pods-running.json", 1500), "pods", PODS_WHAT, [1.0, 2.0, 4.0, 8.0, 16.0], "connection broken"),
}


@pytest.mark.usefixtures("no_wait")
@pytest.mark.parametrize("case", sorted(KEEPS_FAILING))
def test_a_request_that_keeps_failing_ends_launch_with_one_line_naming_the_error(api, recording_helm, backoff, case):
    failing, route, what, pauses, last = KEEPS_FAILING[case]
    if route == "pods":
        api.add("GET", PODS, "pods-none.json", failing, **SELECTOR)
    else:
        api.add("GET", PODS, "pods-none.json", "fl-pods-running.json", **SELECTOR)
        api.add("GET", log_path(SERVER), failing, **TAIL)

    result = invoke(*FEDAVG)

    assert result.exit_code == 7
    assert error_lines(result.stderr) == [f"error: the Kubernetes API failed to {what} 6 times in a row; the last error: {last}"]
    assert STAYS in result.stderr and "Traceback" not in result.stderr
    assert backoff == pauses
    tries = pod_lists(api) if route == "pods" else api.made("GET", "/log")
    assert len(tries) == kube.BACKOFF.attempts + (1 if route == "pods" else 0)  # the pods: after launch's own check


def test_retry_after_is_honoured_up_to_the_longest_pause():
    asked = SimpleNamespace(headers={"Retry-After": "120"})
    assert kube.BACKOFF.delay(1, asked) == kube.BACKOFF.longest == 60.0
    assert kube.BACKOFF.delay(3, SimpleNamespace(headers={"Retry-After": "7"})) == 7.0
    assert kube.BACKOFF.delay(3, SimpleNamespace(headers=None)) == 4.0


# -- a dropped connection: asked again, a log stream resumed -----------------------------------------


@pytest.mark.usefixtures("no_wait")
def test_a_poll_whose_connection_drops_is_asked_again(api, recording_helm, backoff):
    api.add("GET", PODS, "pods-none.json", dropped("fl-pods-running.json", 1500), "fl-pods-finished.json", **SELECTOR)
    api.add("GET", log_path(SERVER), "fl-server-finished.log")

    result = invoke(*FEDAVG)

    assert result.exit_code == 0, result.stderr
    assert backoff == [1.0]
    assert len(pod_lists(api)) == 3


def test_logs_follow_resumes_a_dropped_stream_printing_each_line_once(api, backoff):
    log = (RECORDED / "fl-server-finished.log").read_bytes()
    cut = len(b"".join(log.splitlines(keepends=True)[:4])) + 20  # four lines and part of the fifth
    api.add("GET", PODS, "fl-pods-running.json", **FL)
    api.add("GET", log_path(SERVER), dropped("fl-server-finished.log", cut), "fl-server-finished.log", follow="true")

    result = invoke("logs", "fl", "--follow")

    assert result.exit_code == 0, result.stderr
    assert result.stdout == without_timestamps("fl-server-finished.log")
    first, resumed = api.made("GET", "/log")
    assert first.query == {"follow": "true", "previous": "false", "tailLines": "100", "timestamps": "true"}
    assert resumed.query == {"follow": "true", "previous": "false", "timestamps": "true"}  # the whole log, the cursor skips what was printed
    assert backoff == [1.0]


# -- FailedCreate: a controller that cannot make its pods ends the launch -----------------------------

JOB = "/apis/batch/v1/namespaces/ns1/jobs/fl-splitfed-fedavg-server"
QUOTA = "exceeded quota: compute-resources, requested: limits.memory=608Mi, used: limits.memory=3712Mi, limited: limits.memory=4Gi"
REFUSED = {  # launch arguments, the pods, the controller (path, object), its events, the error line
    "Job over its quota": (
        FEDAVG, "fl-pods-server-not-made.json", JOB, "fl-server-job-refused.json", "fl-server-job-quota-events.json",
        "fedavg-server Job fl-splitfed-fedavg-server cannot make its pods (FailedCreate): "
        f'Error creating: pods "fl-splitfed-fedavg-server-8kq2w" is forbidden: {QUOTA}'),
    "Job denied by an admission webhook": (
        FEDAVG, "fl-pods-server-not-made.json", JOB, "fl-server-job-refused.json", "fl-server-job-webhook-events.json",
        "fedavg-server Job fl-splitfed-fedavg-server cannot make its pods (FailedCreate): "
        'Error creating: admission webhook "validation.gatekeeper.sh" denied the request: [allowed-repos] container <fedavg-server> '
        'has an invalid image repo <localhost/splitfed-fedavg-server:0.1.0>, allowed repos are ["registry.example.com/"]'),
    "StatefulSet over its quota": (
        FEDAVG, "fl-pods-worker-1-not-made.json", "/apis/apps/v1/namespaces/ns1/statefulsets/fl-splitfed-fedavg-worker",
        "fl-worker-statefulset.json", "fl-worker-statefulset-quota-events.json",
        "fedavg-worker StatefulSet fl-splitfed-fedavg-worker cannot make its pods (FailedCreate): create Pod fl-splitfed-fedavg-worker-1 "
        'in StatefulSet fl-splitfed-fedavg-worker failed error: pods "fl-splitfed-fedavg-worker-1" is forbidden: exceeded quota: '
        "compute-resources, requested: limits.memory=640Mi, used: limits.memory=3680Mi, limited: limits.memory=4Gi"),
    "ReplicaSet over a LimitRange": (
        ["launch", "split", "--name", "sp"], "sp-pods-relay-not-made.json", "/apis/apps/v1/namespaces/ns1/replicasets/sp-splitfed-relay-7c9d5b6f4",
        "sp-relay-replicaset.json", "sp-relay-limit-range-events.json",
        "relay ReplicaSet sp-splitfed-relay-7c9d5b6f4 cannot make its pods (FailedCreate): Error creating: pods "
        '"sp-splitfed-relay-7c9d5b6f4-r2x8p" is forbidden: maximum memory usage per Container is 64Mi, but limit is 96Mi'),
}


@pytest.mark.usefixtures("no_wait")
@pytest.mark.parametrize("case", sorted(REFUSED))
def test_a_controller_that_cannot_make_its_pods_ends_launch_with_the_events_message(api, recording_helm, case):
    args, pods, path, controller, events, line = REFUSED[case]
    release = args[args.index("--name") + 1]
    api.add("GET", PODS, "pods-none.json", pods, labelSelector=f"app.kubernetes.io/instance={release}")
    api.add("GET", EVENTS, events)  # the namespace's FailedCreate events, and then the controller's own
    api.add("GET", path, controller)

    result = invoke(*args, "--wait-timeout", "5")  # were the refusal missed, the watch would wait for the pods for ever

    assert result.exit_code == 4
    assert error_lines(result.stderr) == [f"error: {line}"]
    assert f"the release stays installed: splitfed logs {release} -n ns1" in result.stderr
    uid = recorded_json(controller)["metadata"]["uid"]
    assert [r.query["fieldSelector"] for r in api.made("GET", "/events")] == ["reason=FailedCreate", f"involvedObject.uid={uid}"]
    assert len(api.made("GET", path)) == 1
    assert api.made("GET", "/log") == []  # stopped before the lead's log


def test_a_refusal_the_controller_has_got_past_does_not_stop_the_watch(api):
    """Refused while another run's pods held the quota, the Job made its pod once they had gone:
    its newest creation event is a success."""
    api.add("GET", PODS, "fl-pods-running.json", "fl-pods-finished.json", **SELECTOR)
    api.add("GET", EVENTS, "fl-server-job-made-after-refusal-events.json")
    api.add("GET", JOB, "fl-server-job-running.json")
    api.add("GET", log_path(SERVER), "fl-server-finished.log")
    api.add("GET", log_path(SERVER), "fl-server-running.log", **TAIL)
    follow, progress, notices = a_watch()

    assert follow.run() == recorded_json("fl-result.json")
    assert [p.done for p in progress] == [1, 2] and notices == []
    assert len(api.made("GET", JOB)) == 2  # looked at each poll


def test_another_releases_refusal_is_not_this_ones(api):
    """A FailedCreate in the namespace whose Job belongs to release fl does not stop a watch of sp."""
    api.add("GET", "/api/v1/namespaces/ns1/pods", "sp-pods-running.json", "sp-pods-finished.json", labelSelector="app.kubernetes.io/instance=sp")
    api.add("GET", EVENTS, "fl-server-job-quota-events.json")
    api.add("GET", JOB, "fl-server-job-refused.json")
    client = "sp-splitfed-split-client-q9t4d"
    api.add("GET", log_path(client), "sp-client-finished.log")
    api.add("GET", log_path(client), "sp-client-running.log", **TAIL)
    follow, _, _ = a_watch("split-client", "sp")

    assert follow.run() == recorded_json("sp-result.json")
    assert {r.query["fieldSelector"] for r in api.made("GET", "/events")} == {"reason=FailedCreate"}  # never fl's Job's own events


def test_a_refused_job_is_a_pod_failure_of_the_watch(api):
    api.add("GET", PODS, "fl-pods-server-not-made.json", **SELECTOR)
    api.add("GET", EVENTS, "fl-server-job-quota-events.json")
    api.add("GET", JOB, "fl-server-job-refused.json")
    follow, _, _ = a_watch(wait_timeout=5)
    with pytest.raises(PodFailure, match=f"fedavg-server Job fl-splitfed-fedavg-server cannot make its pods \\(FailedCreate\\): .*{QUOTA}"):
        follow.run()
