"""The watch with a standby FedAvg server (fedavgServer.replicas 2, the chart's default): two
fedavg-server pods of one Job run side by side, the one holding the session's lock runs the rounds
and prints progress events, the other waits and prints none until it takes over. Against recorded
API responses (recorded_api.FakeCoreV1Api): a 3-node broker, the active server 7xk2p on
kind-worker, its standby m4q8d (made a second later) on kind-worker2.

- fl-ha-pods-running.json: both servers running; the standby's log holds only its standby line.
- fl-ha-pods-active-finished.json: the active server succeeded, the standby still runs (it takes
  the lock next, finds the run finished and exits).
- fl-ha-pods-active-restarted.json: the active server's container exited 4 after round 1 (its
  broker connection did not come back); OnFailure started it again in the same pod, where it now
  waits as the standby, while m4q8d took over (epoch 2) from the shared checkpoint.
- fl-ha-pods-failover-finished.json: m4q8d ran rounds 2 and 3 and succeeded."""

from __future__ import annotations

import json

import pytest

from splitfed.cluster import watch
from tests.cluster.conftest import recorded_json
from tests.cluster.recorded_api import Response
from tests.cluster.test_launch_watch import PODS, SELECTOR, a_watch, log_path

ACTIVE, STANDBY = "fl-splitfed-fedavg-server-7xk2p", "fl-splitfed-fedavg-server-m4q8d"
TAIL = {"tailLines": str(watch.LOG_TAIL)}


def servers(name: str) -> list[dict]:
    return [pod for pod in recorded_json(name)["items"] if pod["metadata"]["labels"]["app.kubernetes.io/component"] == "fedavg-server"]


def test_the_recorded_release_has_an_active_and_a_newer_standby_server():
    active, standby = servers("fl-ha-pods-running.json")
    assert (active["metadata"]["name"], standby["metadata"]["name"]) == (ACTIVE, STANDBY)
    assert standby["metadata"]["creationTimestamp"] > active["metadata"]["creationTimestamp"]
    assert active["spec"]["nodeName"] != standby["spec"]["nodeName"]  # the chart's anti-affinity
    claims = {pod["spec"]["volumes"][1]["persistentVolumeClaim"]["claimName"] for pod in (active, standby)}
    assert claims == {"fl-splitfed-fedavg-server-checkpoint"}  # one checkpoint volume for both


@pytest.mark.usefixtures("no_wait")
def test_the_watch_follows_the_active_server_not_the_newer_standby(api):
    api.add("GET", PODS, "fl-ha-pods-running.json", "fl-ha-pods-running.json", "fl-ha-pods-active-finished.json", **SELECTOR)
    api.add("GET", log_path(ACTIVE), "fl-ha-active-finished.log")  # the whole log, once it has succeeded
    api.add("GET", log_path(ACTIVE), "fl-ha-active-running.log", **TAIL)
    api.add("GET", log_path(STANDBY), "fl-ha-standby.log", **TAIL)
    follow, progress, notices = a_watch()

    assert follow.run() == recorded_json("fl-ha-result.json")
    assert [(p.event, p.done, p.total) for p in progress] == [("round", 1, 3), ("round", 2, 3), ("round", 3, 3)]
    assert [p.record["accuracy"] for p in progress] == [0.6512, 0.7734, 0.8021]
    assert notices == []
    # the newest pod is looked at first, and found to be a standby (no progress events)
    first_poll = [request.path for request in api.made("GET", "/log")][:2]
    assert first_poll == [log_path(STANDBY), log_path(ACTIVE)]
    # once the active server has succeeded, only its whole log is read, not the standby's
    assert api.made("GET", "/log")[-1].path == log_path(ACTIVE)
    assert api.made("GET", "/log")[-1].query == {"timestamps": "true"}
    assert all(request.query.get("tailLines") for request in api.made("GET", f"{STANDBY}/log"))


@pytest.mark.usefixtures("no_wait")
def test_the_watch_follows_the_standby_that_takes_over_to_the_result(api):
    api.add("GET", PODS, "fl-ha-pods-running.json", "fl-ha-pods-active-restarted.json", "fl-ha-pods-failover-finished.json", **SELECTOR)
    api.add("GET", log_path(ACTIVE), "fl-ha-active-running.log", "fl-ha-restarted-standby.log", **TAIL)
    api.add("GET", log_path(STANDBY), "fl-ha-standby-finished.log")  # its whole log, once it has succeeded
    api.add("GET", log_path(STANDBY), "fl-ha-standby.log", "fl-ha-standby-took-over.log", **TAIL)
    follow, progress, notices = a_watch()

    result = follow.run()

    assert result == recorded_json("fl-ha-failover-result.json")
    assert [p["step"] for p in result["history"]] == [1, 2, 3]  # round 1 came from the checkpoint
    # each round once: round 1 from the first server, rounds 2 and 3 from the one that took over;
    # the lines before the takeover (its standby line) and the restarted pod's are no progress
    assert [(p.event, p.done, p.total) for p in progress] == [("round", 1, 3), ("round", 2, 3), ("round", 3, 3)]
    assert [p.record["accuracy"] for p in progress] == [0.6512, 0.7734, 0.8021]
    # the first server's restart is a notice, not a failure: a standby took over
    assert notices == [f"fedavg-server pod {ACTIVE}: restarted (exit code 4, restart 1)"]
    last = api.made("GET", "/log")[-1]
    assert (last.path, last.query) == (log_path(STANDBY), {"timestamps": "true"})



def drained(name: str, standby: bool = True) -> Response:
    """The recorded pod list with the active server's pod as a drained node leaves it: Failed,
    its container terminated by SIGTERM (exit code 143); `standby` False: without the standby."""
    pods = recorded_json(name)
    pods["items"] = [pod for pod in pods["items"] if standby or pod["metadata"]["name"] != STANDBY]
    for pod in pods["items"]:
        if pod["metadata"]["name"] == ACTIVE:
            pod["status"]["phase"] = "Failed"
            status = pod["status"]["containerStatuses"][0]
            status["state"] = {"terminated": {"exitCode": 143, "reason": "Error", "startedAt": "2025-05-06T09:14:09Z", "finishedAt": "2025-05-06T09:14:41Z"}}
            status["ready"] = False
    return Response(200, json.dumps(pods).encode())


@pytest.mark.usefixtures("no_wait")
def test_a_drained_active_server_is_a_notice_while_its_standby_runs(api):
    api.add("GET", PODS, "fl-ha-pods-running.json", drained("fl-ha-pods-running.json"), **SELECTOR)
    api.add("GET", log_path(ACTIVE), "fl-ha-active-running.log", **TAIL)
    api.add("GET", log_path(STANDBY), "fl-ha-standby.log", **TAIL)
    follow, _, notices = a_watch()
    assert follow.step() is None and follow.step() is None  # the second look finds the active pod Failed
    assert notices == [f"fedavg-server pod {ACTIVE}: Error (exit code 143)"]


def test_a_drained_server_without_a_standby_ends_the_watch(api):
    api.add("GET", PODS, drained("fl-ha-pods-running.json", standby=False), **SELECTOR)
    api.add("GET", log_path(ACTIVE), "fl-ha-active-running.log", **TAIL)
    api.add("GET", "/api/v1/namespaces/ns1/events", "events-none.json")
    follow, _, _ = a_watch()
    with pytest.raises(watch.PodFailure, match="exit code 143"):
        follow.step()
