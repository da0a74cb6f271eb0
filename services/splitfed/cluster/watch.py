"""Following a run's pods: pure logic over the kubernetes client's objects (V1Pod, CoreV1Event,
log text), so that recorded API responses can drive it.

- `diagnose` maps a pod's container states and conditions to a Problem: ImagePullBackOff,
  ErrImagePull, InvalidImageName, CreateContainerConfigError, CreateContainerError,
  CrashLoopBackOff, OOMKilled (with the memory limit), a failed pod, and Pending for lack of GPUs
  (or other unschedulable pods) once it has waited --pending-timeout seconds. A restart and a
  short wait are notices, not failures.
- Progress travels in the lead role's log: `splitfed serve` prints progress events as JSON lines
  on stdout (the chart turns them on for the lead roles: the fedavg-server; the split-client of a
  one-client split run, the split-server of several clients; the p2p-tracker), and, last, a
  "result" event with the role's result. `LogCursor` reads the log with timestamps, so each line is taken once.
- `Watch.run` polls: the release's pods, then the lead's new log lines, until the result line.
  Each request is retried by `kube.request` (429, 5xx, dropped connections).
- A pod that is never made has no state to diagnose: a controller of the release (a Job, a
  StatefulSet, a Deployment's ReplicaSet) whose newest attempt to create one failed (a
  FailedCreate event: a quota exceeded, an admission webhook or policy that denied it) ends the
  watch with the event's message, where it would otherwise wait for ever.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from splitfed.cluster.kube import Forbidden, client, describe, request
from splitfed.roles.declaration import Progress

POLL_SECONDS = 2.0
LOG_TAIL = 500  # lines read per poll: a split-client prints one event per batch
LAST_LINES = 20  # log lines shown with a failure
COMPONENT = "app.kubernetes.io/component"
INSTANCE = "app.kubernetes.io/instance"
PART_OF = "app.kubernetes.io/part-of"
NOT_WATCHED = {"broker-test"}  # the helm test pod
PROGRESS_EVENTS_VARIABLE = "SPLITFED_PROGRESS_EVENTS"
IMAGE_OR_CONFIG = ("ImagePullBackOff", "ErrImagePull", "InvalidImageName", "CreateContainerConfigError", "CreateContainerError")
# The controllers that make the roles' pods, and how to read one: (API class, method).
CONTROLLERS = {"Job": ("BatchV1Api", "read_namespaced_job"), "StatefulSet": ("AppsV1Api", "read_namespaced_stateful_set"),
               "ReplicaSet": ("AppsV1Api", "read_namespaced_replica_set")}
CREATION = ("SuccessfulCreate", "FailedCreate")  # the reasons of a controller's events about making a pod
_sleep = time.sleep


class PodFailure(RuntimeError):
    """A pod of the run failed, or could not be made; the message is the reason, the pod or its
    controller, events and last log lines."""


class WatchTimeout(RuntimeError):
    pass


class NoResult(RuntimeError):
    pass


@dataclass(frozen=True)
class Problem:
    pod: str
    role: str
    reason: str  # OOMKilled, CrashLoopBackOff, ImagePullBackOff, ..., "Pending for lack of GPUs"
    detail: str
    fatal: bool
    previous: bool = False  # the interesting log is the previous container's

    def line(self) -> str:
        return f"{self.role} pod {self.pod}: {self.reason}" + (f" ({self.detail})" if self.detail else "")


def role_of(pod: Any) -> str:
    return (pod.metadata.labels or {}).get(COMPONENT, "?")


def prints_progress(pod: Any) -> bool | None:
    """Whether the pod's role container prints progress events (SPLITFED_PROGRESS_EVENTS, which
    the chart sets on a run's lead); None when the pod does not say (a value from elsewhere)."""
    containers = list(pod.spec.containers or []) if pod.spec else []
    for container in containers:
        if container.name != role_of(pod):
            continue
        for variable in container.env or []:
            if variable.name == PROGRESS_EVENTS_VARIABLE and variable.value is not None:
                return variable.value.strip().lower() in ("true", "1", "yes", "on")
    return None


def _limits(pod: Any) -> dict[str, dict[str, str]]:
    containers = list(pod.spec.containers or []) + list(pod.spec.init_containers or []) if pod.spec else []
    return {c.name: dict((c.resources.limits if c.resources else None) or {}) for c in containers}


def diagnose(pod: Any, now: datetime, pending_timeout: float, gpu_resource: str = "nvidia.com/gpu") -> Problem | None:
    """What is wrong with `pod`, if anything (fatal: the run cannot go on as it is)."""
    name, role, status = pod.metadata.name, role_of(pod), pod.status
    limits = _limits(pod)
    statuses = list(status.init_container_statuses or []) + list(status.container_statuses or [])
    notice = None
    for container in statuses:
        state, last = container.state, container.last_state
        waiting = state.waiting if state else None
        terminated = state.terminated if state else None
        last_terminated = last.terminated if last else None
        memory = limits.get(container.name, {}).get("memory", "none")
        if terminated and terminated.reason == "OOMKilled":
            return Problem(name, role, "OOMKilled", f"memory limit {memory}", True)
        if last_terminated and last_terminated.reason == "OOMKilled":
            return Problem(name, role, "OOMKilled", f"memory limit {memory}, {container.restart_count} restarts", True, previous=True)
        if waiting and waiting.reason in IMAGE_OR_CONFIG:
            return Problem(name, role, waiting.reason, waiting.message or container.image or "", True)
        if waiting and waiting.reason == "CrashLoopBackOff":
            if last_terminated and last_terminated.exit_code == 0:
                continue  # it finished and its StatefulSet restarted it (a worker after the run, a serving session's peer)
            code = last_terminated.exit_code if last_terminated else "?"
            return Problem(name, role, "CrashLoopBackOff", f"exit code {code}, {container.restart_count} restarts", True, previous=True)
        if terminated and terminated.exit_code and status.phase == "Failed":
            return Problem(name, role, terminated.reason or "Error", f"exit code {terminated.exit_code}", True)
        if last_terminated and last_terminated.exit_code and notice is None:
            notice = Problem(name, role, "restarted", f"exit code {last_terminated.exit_code}, restart {container.restart_count}", False, previous=True)
    if status.phase == "Failed":
        reason = status.reason or "Failed"
        return Problem(name, role, reason, status.message or "", reason != "Evicted")
    if status.phase == "Pending":
        for condition in status.conditions or []:
            if condition.type == "PodScheduled" and condition.status == "False" and condition.reason == "Unschedulable":
                message = condition.message or ""
                wants_gpu = any(gpu_resource in mine for mine in limits.values()) or gpu_resource in message
                since = condition.last_transition_time
                waited = (now - since).total_seconds() if since else 0.0
                return Problem(name, role, "Pending for lack of GPUs" if wants_gpu else "Unschedulable", message, waited >= pending_timeout)
    return notice


# -- logs -------------------------------------------------------------------------------------

_STAMPED = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?Z (.*)$")


def parse_line(line: str) -> tuple[tuple[str, int] | None, str]:
    """(timestamp as (seconds, nanoseconds), text) of a log line read with timestamps=True."""
    if found := _STAMPED.match(line):
        seconds, fraction, text = found.groups()
        return (seconds, int((fraction or "0").ljust(9, "0"))), text
    return None, line


def event_of(text: str) -> Progress | None:
    """The progress event a log line holds, if it is one (other lines are the role's logging)."""
    text = text.strip()
    if not text.startswith("{"):
        return None
    try:
        fields = json.loads(text)
        return Progress(**fields) if isinstance(fields, dict) and isinstance(fields.get("event"), str) else None
    except (ValueError, TypeError):
        return None


def events_in(log: str) -> list[Progress]:
    return [event for line in log.splitlines() if (event := event_of(parse_line(line)[1]))]


def result_in(log: str) -> dict | None:
    """The lead's result: the record of the last result event in its log."""
    results = [event.record for event in events_in(log) if event.event == "result" and isinstance(event.record, dict)]
    return results[-1] if results else None


@dataclass
class LogCursor:
    """Takes each line of a log once, across reads of its tail with timestamps."""

    last: tuple[str, int] = ("", -1)
    at_last: set[str] = field(default_factory=set)

    def new(self, log: str) -> list[str]:
        fresh = []
        for line in log.splitlines():
            stamp, text = parse_line(line)
            if stamp is None or stamp < self.last or (stamp == self.last and line in self.at_last):
                continue
            if stamp > self.last:
                self.last, self.at_last = stamp, set()
            self.at_last.add(line)
            fresh.append(text)
        return fresh


# -- what status shows --------------------------------------------------------------------------


def progress_of(events: Iterable[Progress]) -> tuple[str, float | None]:
    """(where the run is, test accuracy so far) from the lead's progress events."""
    text, accuracy, epoch = "starting", None, None
    for event in events:
        record = event.record or {}
        if event.event in ("round", "epoch"):
            text = f"{event.event} {event.done}/{event.total}"
            accuracy = record.get("accuracy", accuracy)
            epoch = event.done
        elif event.event == "batch":
            text = f"epoch {(epoch or 0) + 1} batch {event.done}/{event.total}"
        elif event.event == "result":
            history = record.get("history") or []
            text = f"done ({len(history)} {'rounds' if 'contributors' in record else 'epochs'})"
            accuracy = record.get("accuracy", accuracy)
    return text, accuracy


def health(pods: list[Any], now: datetime) -> tuple[str, list[str]]:
    """('3 running, 1 succeeded', ['split-server: Pending for lack of GPUs']) for a release's pods."""
    phases: dict[str, int] = {}
    problems = []
    for pod in pods:
        phase = (pod.status.phase or "Unknown").lower()
        phases[phase] = phases.get(phase, 0) + 1
        if problem := diagnose(pod, now, pending_timeout=0):
            problems.append(f"{problem.role}: {problem.reason}")
    return ", ".join(f"{count} {phase}" for phase, count in sorted(phases.items())), problems


# -- the watch loop -----------------------------------------------------------------------------


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _age_key(pod: Any) -> tuple:
    return pod.metadata.creation_timestamp or datetime.min.replace(tzinfo=timezone.utc), pod.metadata.name


def newest(pods: list[Any]) -> Any:
    """The pod made last (by name among pods made in the same second)."""
    return max(pods, key=_age_key)


@dataclass
class Watch:
    """Follows one release until its lead prints its result; raises PodFailure, WatchTimeout."""

    core: Any  # kubernetes.client.CoreV1Api
    namespace: str
    release: str
    lead: str
    on_progress: Callable[[Progress], None]
    on_notice: Callable[[str], None]
    pending_timeout: float = 300.0
    wait_timeout: float = 0.0  # 0: until the run ends
    poll: float = POLL_SECONDS
    request_timeout: Any = (5.0, 30.0)
    clock: Callable[[], datetime] = utcnow
    noticed: set = field(default_factory=set)
    cursor: LogCursor = field(default_factory=LogCursor)
    checks_refusals: bool = True  # until the events or controllers turn out unreadable (403)

    def pods(self) -> list[Any]:
        listed = request(f"list the pods of release {self.release} in namespace {self.namespace}", self.core.list_namespaced_pod, self.namespace,
                         label_selector=f"{INSTANCE}={self.release}", _request_timeout=self.request_timeout)
        return [pod for pod in listed.items if role_of(pod) not in NOT_WATCHED]

    def log(self, pod: Any, **options: Any) -> str:
        return request(f"read the log of pod {pod.metadata.name} in namespace {self.namespace}", self.core.read_namespaced_pod_log,
                       pod.metadata.name, self.namespace, _request_timeout=self.request_timeout, **options)

    def events(self, selector: str) -> list[Any]:
        """The namespace's events that match the field selector."""
        return request(f"list the events ({selector}) in namespace {self.namespace}", self.core.list_namespaced_event, self.namespace,
                       field_selector=selector, _request_timeout=self.request_timeout).items

    def run(self) -> dict:
        started = time.monotonic()
        while (result := self.step()) is None:
            if self.wait_timeout and time.monotonic() - started > self.wait_timeout:
                raise WatchTimeout(f"{self.release}: no result within --wait-timeout {self.wait_timeout:g}s; the run goes on")
            _sleep(self.poll)
        return result

    def step(self) -> dict | None:
        """One look at the release: its result once the lead has printed it, else None."""
        pods = self.pods()
        now = self.clock()
        for pod in pods:
            problem = diagnose(pod, now, self.pending_timeout)
            if problem is None:
                continue
            if problem.fatal and not self.taken_over(pod, pods, problem):
                raise PodFailure(self.explain(pod, problem))
            key = (problem.pod, problem.reason, problem.detail if problem.reason == "restarted" else "")
            if key not in self.noticed:
                self.noticed.add(key)
                self.on_notice(problem.line())
        if self.checks_refusals:
            try:
                self.refused()
            except Forbidden as exc:  # the run can go on; only this check cannot
                self.checks_refusals = False
                self.on_notice(f"not watching for pods the cluster refuses to make: {exc}")
        leads = [pod for pod in pods if role_of(pod) == self.lead]
        if not leads:
            return None
        finished = [pod for pod in leads if pod.status.phase == "Succeeded"]
        followed = self.following(finished[:1] or leads, whole=bool(finished))
        if followed is None:
            return None
        lead, log = followed
        result = None
        for text in self.cursor.new(log):
            if (event := event_of(text)) is None:
                continue
            if event.event == "result" and isinstance(event.record, dict):
                result = event.record
            else:
                self.on_progress(event)
        if result is None and finished:
            raise NoResult(f"{self.lead} pod {lead.metadata.name} finished, but its log holds no result line "
                           f"(is progress-events turned off in its settings?)")
        return result

    def taken_over(self, pod: Any, pods: list[Any], problem: Problem) -> bool:
        """A lead pod that ended badly (a drained node's pod is Failed with exit code 143) while
        another lead pod runs: that one is its standby and takes over, so the run goes on. Not
        for what would stop the standby too (no memory, a wrong image or configuration)."""
        if role_of(pod) != self.lead or problem.reason == "OOMKilled" or problem.reason in IMAGE_OR_CONFIG:
            return False
        return any(other is not pod and role_of(other) == self.lead and other.status.phase == "Running" for other in pods)

    def following(self, leads: list[Any], whole: bool) -> tuple[Any, str] | None:
        """The lead to follow and its log (the whole log, or its tail): with a standby server
        beside the active one, the newest whose log holds progress events, since a standby
        prints none until it takes over; None while no lead's container has started."""
        from kubernetes.client import ApiException

        logs = []
        for pod in sorted(leads, key=_age_key, reverse=True):  # the newest first
            try:
                logs.append((pod, self.log(pod, timestamps=True, **({} if whole else {"tail_lines": LOG_TAIL}))))
            except ApiException as exc:
                if exc.status not in (400, 404):  # 400: its container has not started yet; 404: the pod is gone
                    raise
            if len(leads) == 1:
                break
        active = [(pod, log) for pod, log in logs if any(event_of(parse_line(line)[1]) for line in log.splitlines())]
        return (active or logs or [None])[0]

    def explain(self, pod: Any, problem: Problem) -> str:
        """The problem's line, the pod's warning events and its last log lines."""
        lines = [problem.line()]
        lines += [f"  event: {message}" for message in self.warnings(pod)]
        try:
            tail = self.log(pod, tail_lines=LAST_LINES, previous=problem.previous)
            shown = [f"    {line}" for line in tail.splitlines()[-LAST_LINES:]]
            lines.append(f"  last log lines{' of the previous container' if problem.previous else ''}:" if shown else "  (its log is empty)")
            lines += shown
        except Exception as exc:  # no log yet (an image never pulled), or none kept
            lines.append(f"  (no log: {describe(exc)})")
        return "\n".join(lines)

    def warnings(self, pod: Any, most: int = 3) -> list[str]:
        try:
            listed = self.events(f"involvedObject.name={pod.metadata.name}")
        except Exception:  # events are a help, not a need
            return []
        warnings = [event for event in listed if event.type == "Warning"]
        warnings.sort(key=_when)
        messages: list[str] = []
        for event in reversed(warnings):
            text = f"{event.reason}: {event.message}"
            if text not in messages:
                messages.append(text)
        return messages[:most][::-1]

    def refused(self) -> None:
        """Raise PodFailure if a controller of the release failed to make a pod in its newest
        attempt (see the module's docstring); a refusal it has since got past (a quota freed as
        another run's pods ended) is over."""
        refusals = [event for event in self.events("reason=FailedCreate") if event.reason == "FailedCreate"]
        made = {event.involved_object.uid: event.involved_object for event in refusals if event.involved_object.kind in CONTROLLERS}
        for uid, made_by in made.items():
            controller = self.controller(made_by.kind, made_by.name)
            if controller is None or controller.metadata.uid != uid or (controller.metadata.labels or {}).get(INSTANCE) != self.release:
                continue  # another release's, or one deleted since
            history = [event for event in self.events(f"involvedObject.uid={uid}") if event.reason in CREATION]
            newest = max(history, key=lambda event: (_when(event), event.reason == "FailedCreate"), default=None)
            if newest is not None and newest.reason == "FailedCreate":
                role = (controller.metadata.labels or {}).get(COMPONENT, "?")
                raise PodFailure(f"{role} {made_by.kind} {made_by.name} cannot make its pods (FailedCreate): {newest.message}")

    def controller(self, kind: str, name: str) -> Any | None:
        """The Job, StatefulSet or ReplicaSet `name`, or None if it is gone."""
        kubernetes = client()
        api_class, method = CONTROLLERS[kind]
        api = getattr(kubernetes.client, api_class)(self.core.api_client)
        try:
            return request(f"read {kind} {name} in namespace {self.namespace}", getattr(api, method), name, self.namespace,
                           _request_timeout=self.request_timeout)
        except kubernetes.client.ApiException as exc:
            if exc.status == 404:
                return None
            raise


def _when(event: Any) -> datetime:
    """When an event last happened (a legacy event's lastTimestamp, a new one's eventTime)."""
    return event.last_timestamp or event.event_time or event.first_timestamp or datetime.min.replace(tzinfo=timezone.utc)
