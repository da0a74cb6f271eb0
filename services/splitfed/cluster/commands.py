"""`splitfed launch SCENARIO`, `status`, `logs` and `delete`: runs on Kubernetes through the Helm
chart. cli.py registers them with one call to `register`.

Exit codes (commandline.ExitCode), as elsewhere in the CLI: 2 bad input (an option, a values file,
a key folder, a release that already ran, no such release), 3 no result within --wait-timeout, 4 a
pod of the run failed (the reason, its events and last log lines follow the error line) or could
not be made (a FailedCreate event's message: a quota, an admission webhook), 7 no reachable
cluster, no helm, no kubernetes client, no chart, helm failed, a request the API server kept
failing through every retry (kube.request), or one it refused (the missing permission is named);
130 Ctrl-C (the run goes on)."""

from __future__ import annotations

import inspect
import json
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from splitfed.cluster import values as chart
from splitfed.cluster.helm import Helm, HelmError, ReleaseNotFound, find_chart
from splitfed.cluster.kube import LOG_TIMEOUT, ClusterError, Kube, connect, describe, from_client, request
from splitfed.cluster.watch import (INSTANCE, NOT_WATCHED, PART_OF, LogCursor, NoResult, PodFailure, Watch, WatchTimeout, diagnose, events_in,
                                    health, newest, prints_progress, progress_of, role_of, utcnow)
from splitfed.commandline import ExitCode, Failures, check_outputs, command, err, fail, finish, guard
from splitfed.scenarios.registry import SCENARIOS

MANAGED_BY = "app.kubernetes.io/managed-by"
LAUNCHER = "splitfed-launch"  # managed-by of the objects launch makes itself (the keys Secret)
STATUS_LOG_TAIL = 2000
CLUSTER_FAILURES: Failures = [
    ((ClusterError, HelmError), ExitCode.NO_CLUSTER),
    ((PodFailure, NoResult), ExitCode.RUN_FAILED),
    ((WatchTimeout,), ExitCode.TIMEOUT),
    ((ValueError,), ExitCode.BAD_INPUT),
]


def _say(text: str) -> None:
    """A line on stderr, as it is (no markup, no wrapping: commands are copied from it)."""
    err.print(text, markup=False, highlight=False, soft_wrap=True)


def _guard(fn: Callable[[], Any]) -> Any:
    """Cluster failures as one line (plus, for a failed pod, its events and last log lines); an
    error of the client's own says what the cluster answered."""
    try:
        return guard(fn, CLUSTER_FAILURES)
    except Exception as exc:
        if from_client(exc):
            raise fail(f"the cluster failed a request: {describe(exc)}", ExitCode.NO_CLUSTER) from None
        raise


def _connect(kube_context: str | None, namespace: str | None) -> Kube:
    return _guard(lambda: connect(kube_context, namespace))


def _text(*flags: str, help: str, **extra: Any) -> Any:  # noqa: A002
    return Annotated[Optional[str], typer.Option(*flags, help=help, show_default=False, **extra)]


NAMESPACE = _text("--namespace", "-n", help="Namespace (default: the kube context's, else default).")
KUBE_CONTEXT = _text("--kube-context", help="Kube config context (default: the current one).")


# -- launch -------------------------------------------------------------------------------------

# launch's own options, after the run options; their names must not be run options.
OWN = {
    "name": (_text("--name", help="Release name (default: SCENARIO-<6 hex>)."), None),
    "namespace": (NAMESPACE, None),
    "set_values": (Annotated[Optional[list[str]], typer.Option(
        "--set", help="helm --set KEY=VALUE (repeatable), over the generated values and -f files.", show_default=False)], None),
    "values_files": (Annotated[Optional[list[Path]], typer.Option(
        "--values", "-f", help="helm values file (repeatable), over the generated values.", show_default=False)], None),
    "detach": (Annotated[bool, typer.Option("--detach", help="Return once the release is installed; do not follow it.")], False),
    "wait_timeout": (Annotated[float, typer.Option(
        "--wait-timeout", min=0, help="Seconds to follow the run before giving up watching (0: until it ends); the run goes on.")], 0.0),
    "pending_timeout": (Annotated[float, typer.Option(
        "--pending-timeout", min=0, help="Seconds a pod may stay unschedulable (no GPU, no room) before launch calls it a failure.")], 300.0),
    "kube_context": (KUBE_CONTEXT, None),
    "chart_ref": (_text("--chart", envvar="SPLITFED_CHART",
                        help="The chart: a path or a chart reference (default: helm/splitfed of the repository this splitfed runs from)."), None),
    "dry_run": (Annotated[bool, typer.Option(
        "--dry-run", help="Render what would be installed (helm --dry-run=client) and print it; change nothing.")], False),
}


def launch_command(scenario: str) -> Callable[..., None]:
    """`splitfed launch SCENARIO`: the run options of `splitfed run SCENARIO` (built as cli.py
    builds them, from the same declarations) plus launch's own."""
    options = chart.launch_options(scenario)
    clash = {option.name for option in options} & set(OWN)
    if clash:
        raise TypeError(f"launch {scenario}: own options {sorted(clash)} are also run options")
    own = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation) for name, (annotation, default) in OWN.items()]
    summary = f"Install a {scenario} run on Kubernetes (helm upgrade --install) and follow it to its results."
    return command(options, summary, lambda values, **own_values: launch(scenario, values, **own_values), own=own)


def _check_values(chart_path: str, values: dict, extra_files: list[Path], sets: list[str]) -> None:
    """Warnings, never refusals, from the values helm will use (the chart's defaults, then launch's,
    the -f files and --set, merged as helm merges them): a role asked for a GPU device that
    requests no GPU (chart.device_warnings), and a model that will not fit the memory limits
    (SIZING: splitfed.sizing's check_values, `splitfed size`'s estimates). A chart that is not a
    local folder, or a --set this cannot read, skips them with a notice, as does a check that fails."""
    defaults = Path(chart_path) / "values.yaml"
    overrides = chart.set_values(sets)
    if not defaults.is_file() or overrides is None:
        _say("notice: values not checked for GPU devices and memory limits: " + (
            "the chart is not a local folder" if overrides is not None else "a --set uses syntax launch does not read"))
        return
    import yaml  # PyYAML: a dependency of the kubernetes client
    from splitfed import sizing

    try:  # the checks must never stop a launch
        merged = chart.merged(yaml.safe_load(defaults.read_text()), values, *(yaml.safe_load(path.read_text()) for path in extra_files), overrides)
    except Exception as exc:
        _say(f"notice: values not checked for GPU devices and memory limits: {exc}")
        return
    for what, check in (("GPU devices", chart.device_warnings), ("memory limits against the model", sizing.check_values)):
        try:
            warnings = check(merged)
        except Exception as exc:
            _say(f"notice: {what} not checked: {exc}")
            continue
        for warning in warnings:
            _say(f"warning: {warning}")


def _already_ran(kube: Kube, release: str, lead: str) -> None:
    pods = kube.pods(f"{INSTANCE}={release}")
    if any(role_of(pod) == lead and pod.status.phase == "Succeeded" for pod in pods):
        raise ValueError(f"release {release} in namespace {kube.namespace} has already run to its end (splitfed status --name {release}): "
                         f"splitfed delete {release} first, or launch under another --name")


def _follow_hints(release: str, namespace: str) -> str:
    return (f"follow it with: splitfed status --name {release} -n {namespace}; splitfed logs {release} -n {namespace} --follow; "
            f"remove it with: splitfed delete {release} -n {namespace}")


def launch(scenario: str, given: dict[str, Any], *, name: str | None, namespace: str | None, set_values: list[str] | None,
           values_files: list[Path] | None, detach: bool, wait_timeout: float, pending_timeout: float, kube_context: str | None,
           chart_ref: str | None, dry_run: bool) -> None:
    from splitfed.roles.service import configure_logging
    from splitfed.scenarios.progress import Reporter

    release = _guard(lambda: chart.check_release_name(name or f"{scenario}-{uuid.uuid4().hex[:6]}"))
    extra_files = list(values_files or [])
    sets = list(set_values or [])
    check_outputs(given.get("out"), plot=given.get("plot"))
    for path in extra_files:
        if not path.is_file():
            raise fail(f"--values {path}: no such file", ExitCode.BAD_INPUT)
    key_files = _guard(lambda: chart.key_files(scenario, given)) if given.get("key_list") else {}
    keys_secret = release + chart.KEYS_SECRET_SUFFIX if key_files else None
    # The values first: they read --task's file, whose absence is then the one error line.
    values = _guard(lambda: chart.chart_values(scenario, given, keys_secret=keys_secret))
    learning = _guard(lambda: chart.learning_config(scenario, given))
    chart_path = _guard(lambda: find_chart(chart_ref))
    helm = _guard(lambda: Helm(kube_context))
    configure_logging(given.get("log_level", "info"))
    kube = _connect(kube_context, namespace)
    lead = chart.CHART_SCENARIOS[scenario].lead
    _guard(lambda: _already_ran(kube, release, lead))
    _check_values(chart_path, values, extra_files, sets)
    with tempfile.TemporaryDirectory(prefix="splitfed-launch-") as folder:
        values_file = Path(folder) / "launch-values.yaml"
        values_file.write_text(json.dumps(values, indent=2) + "\n")  # JSON is YAML
        if key_files and not dry_run:  # the Secret the chart mounts the keys from, made anew each launch
            labels = {INSTANCE: release, MANAGED_BY: LAUNCHER, PART_OF: "splitfed"}
            _guard(lambda: kube.put_secret(keys_secret, labels, {key: path.read_bytes() for key, path in key_files.items()}))
        started = time.perf_counter()
        output = _guard(lambda: helm.upgrade_install(release, chart_path, kube.namespace, values_file, extra_files, sets, dry_run=dry_run))
    if dry_run:
        sys.stdout.write(output)
        _say(f"dry run: nothing installed{' (the keys Secret was not made)' if key_files else ''}")
        return
    session = given.get("session") or release
    _say(f"launched {scenario} as release {release} in namespace {kube.namespace} (session {session})")
    if detach:
        _say(_follow_hints(release, kube.namespace))
        return

    def follow() -> dict:
        with Reporter(f"{release} ({scenario})") as reporter:
            def notice(line: str) -> None:
                reporter.console.print(f"notice: {line}", markup=False, highlight=False)

            return Watch(kube.core, kube.namespace, release, lead, reporter, notice, pending_timeout=pending_timeout, wait_timeout=wait_timeout).run()

    try:
        record = _guard(follow)  # the bar is gone before an error is printed
    except KeyboardInterrupt:
        _say(f"stopped watching; the run goes on in the cluster: {_follow_hints(release, kube.namespace)}")
        raise typer.Exit(ExitCode.INTERRUPTED.value) from None
    except typer.Exit:
        _say(f"the release stays installed: splitfed logs {release} -n {kube.namespace}; splitfed delete {release} -n {kube.namespace}")
        raise
    result = {"scenario": scenario, **record, "wall_seconds": time.perf_counter() - started,
              "config": {**learning, "session": session, "launch": "kubernetes", "release": release, "namespace": kube.namespace,
                         "authenticated": bool(key_files)}}
    finish(result, given.get("out"), given.get("plot"))
    _say(f"the release stays installed (its workers and servers wait for a next run): splitfed delete {release} -n {kube.namespace}")


# -- status -------------------------------------------------------------------------------------


def _release_pods(kube: Kube, release: str | None, all_namespaces: bool) -> dict[tuple[str, str], list[Any]]:
    selector = f"{PART_OF}=splitfed" + (f",{INSTANCE}={release}" if release else "")
    groups: dict[tuple[str, str], list[Any]] = {}
    for pod in kube.pods(selector, all_namespaces):
        if role_of(pod) in NOT_WATCHED:
            continue
        groups.setdefault((pod.metadata.namespace, (pod.metadata.labels or {}).get(INSTANCE, "?")), []).append(pod)
    return groups


def _lead_pods(pods: list[Any]) -> list[Any]:
    """The pods that lead a release's run. split and splitnn run the same roles and differ in
    their lead (the client, the server), so a lead role's pod counts if it prints the progress
    events (the chart turns them on for the lead only); pods that do not say follow the chart's
    own choice for their number of clients."""
    candidates = [pod for pod in pods if role_of(pod) in chart.LEADS]
    printing = [pod for pod in candidates if prints_progress(pod)]
    if printing:
        return printing
    silent = {role_of(pod) for pod in candidates if prints_progress(pod) is False}
    candidates = [pod for pod in candidates if role_of(pod) not in silent]
    split_roles = {"split-client", "split-server"}
    if split_roles <= {role_of(pod) for pod in candidates}:
        lead = chart.split_lead(sum(1 for pod in pods if role_of(pod) == "split-client"))
        candidates = [pod for pod in candidates if role_of(pod) not in split_roles or role_of(pod) == lead]
    return candidates


def _run_state(kube: Kube, namespace: str, pods: list[Any]) -> tuple[str, str, str]:
    """(scenario, progress, accuracy) of one release, from its lead's log. ClusterError if the
    log cannot be read (refused, or the API kept failing)."""
    leads = _lead_pods(pods)
    if not leads:
        return "-", "-", "-"
    lead = newest(leads)
    scenario = chart.scenario_of(role_of(lead), {role_of(pod) for pod in pods})
    try:
        log = kube.log(lead.metadata.name, namespace, tail_lines=STATUS_LOG_TAIL)
    except Exception as exc:
        if getattr(exc, "status", None) in (400, 404):  # not started yet, or gone since it was listed
            return scenario, "starting", "-"
        raise
    where, accuracy = progress_of(events_in(log))
    return scenario, where, "-" if accuracy is None else f"{accuracy:.4f}"


def _out() -> Console:
    console = Console()
    return console if console.is_terminal else Console(width=240, soft_wrap=True)


def status(
    name: Annotated[Optional[str], typer.Option("--name", help="Only this run (release); also lists its pods.", show_default=False)] = None,
    namespace: NAMESPACE = None,
    all_namespaces: Annotated[bool, typer.Option("--all-namespaces", "-A", help="Runs in every namespace.")] = False,
    kube_context: KUBE_CONTEXT = None,
) -> None:
    """List splitfed runs (releases) on the cluster: scenario, round or epoch, accuracy so far, pod health."""
    kube = _connect(kube_context, namespace)
    groups = _guard(lambda: _release_pods(kube, name, all_namespaces))
    where = "any namespace" if all_namespaces else f"namespace {kube.namespace}"
    if not groups:
        if name:
            raise fail(f"no run named {name} in {where} (splitfed status lists the runs)", ExitCode.BAD_INPUT)
        _out().print(f"no splitfed runs in {where}", highlight=False)
        return
    now = utcnow()
    table = Table(title="splitfed runs")
    for column in ("release", "namespace", "scenario", "progress", "accuracy", "pods", "problems"):
        table.add_column(column)
    unread: list[ClusterError] = []  # logs refused or failed: the rest of the table still shows
    for (space, release), pods in sorted(groups.items()):
        try:
            scenario, progress, accuracy = _run_state(kube, space, pods)
        except ClusterError as exc:
            unread.append(exc)
            scenario, progress, accuracy = "?", "unknown (log unread)", "?"
        counts, problems = health(pods, now)
        table.add_row(release, space, scenario, progress, accuracy, counts, "\n".join(problems) or "-")
    out = _out()
    out.print(table)
    if name:
        detail = Table(title=f"pods of {name}")
        for column in ("pod", "role", "phase", "restarts", "problem"):
            detail.add_column(column)
        for pod in sorted(next(iter(groups.values())), key=lambda pod: pod.metadata.name):
            restarts = sum(status.restart_count or 0 for status in pod.status.container_statuses or [])
            problem = diagnose(pod, now, pending_timeout=0)
            detail.add_row(pod.metadata.name, role_of(pod), pod.status.phase or "?", str(restarts), problem.line().split(": ", 1)[1] if problem else "-")
        out.print(detail)
    if unread:
        raise fail(str(unread[0]) + (f" (and {len(unread) - 1} more releases' logs)" if len(unread) > 1 else ""), ExitCode.NO_CLUSTER)


# -- logs ---------------------------------------------------------------------------------------


def logs(
    name: Annotated[str, typer.Argument(metavar="NAME", help="The run (release).", show_default=False)],
    role: Annotated[Optional[str], typer.Option("--role", help="This role's pods (default: the lead's: fedavg-server, split-client, or split-server among several clients, p2p-tracker).", show_default=False)] = None,
    pod: Annotated[Optional[str], typer.Option("--pod", help="This pod only.", show_default=False)] = None,
    tail: Annotated[int, typer.Option("--tail", min=0, help="Last lines per pod (0: all).")] = 100,
    follow: Annotated[bool, typer.Option("--follow", help="Keep printing new lines (one pod) until it ends or Ctrl-C.")] = False,
    previous: Annotated[bool, typer.Option("--previous", help="The previous container's log (after a crash or restart).")] = False,
    namespace: NAMESPACE = None,
    kube_context: KUBE_CONTEXT = None,
) -> None:
    """Print the logs of a run's pods (progress events are the JSON lines; the last is the result)."""
    kube = _connect(kube_context, namespace)
    pods = sorted(_guard(lambda: _release_pods(kube, name, False)).get((kube.namespace, name), []), key=lambda p: p.metadata.name)
    if pod:
        chosen = [p for p in pods if p.metadata.name == pod]
    elif role:
        chosen = [p for p in pods if role_of(p) == role]
    else:
        chosen = _lead_pods(pods) or pods
    if not chosen:
        which = f"pod {pod}" if pod else f"role {role}" if role else "pods"
        roles = ", ".join(sorted({role_of(p) for p in pods})) or "none"
        raise fail(f"no {which} of run {name} in namespace {kube.namespace} (its roles: {roles}; splitfed status lists the runs)", ExitCode.BAD_INPUT)
    options = {"previous": previous, **({"tail_lines": tail} if tail else {})}
    if follow:
        if len(chosen) != 1:
            raise fail(f"--follow follows one pod; {len(chosen)} match: give --pod ({', '.join(p.metadata.name for p in chosen)})", ExitCode.BAD_INPUT)
        _guard(lambda: _follow(kube, chosen[0].metadata.name, options))
        return
    for index, chosen_pod in enumerate(chosen):
        text = _guard(lambda p=chosen_pod: kube.log(p.metadata.name, timeout=LOG_TIMEOUT, **options))
        if len(chosen) > 1:
            sys.stdout.write(("\n" if index else "") + f"==> {chosen_pod.metadata.name} ({role_of(chosen_pod)}) <==\n")
        sys.stdout.write(text if text.endswith("\n") or not text else text + "\n")
    sys.stdout.flush()


def _follow(kube: Kube, pod: str, options: dict[str, Any]) -> None:
    """Print the pod's log as it grows, until its container ends. The lines come with timestamps,
    so a stream that breaks off (a dropped connection) is resumed: kube.request opens it again,
    as it retries any request, and once lines were printed, for the whole log, of which LogCursor
    prints only the lines after them (the client offers no sinceTime, and sinceSeconds would set
    this machine's clock against the node's)."""
    cursor = LogCursor()

    def stream() -> None:
        reopened = {key: value for key, value in options.items() if key != "tail_lines"} if cursor.at_last else options
        with kube.log_stream(pod, timestamps=True, **reopened) as lines:
            for line in lines:
                for text in cursor.new(line):
                    sys.stdout.write(text + "\n")
                    sys.stdout.flush()

    try:
        request(f"follow the log of pod {pod} in namespace {kube.namespace}", stream)
    except KeyboardInterrupt:
        raise typer.Exit(ExitCode.INTERRUPTED.value) from None


# -- delete -------------------------------------------------------------------------------------


def delete(
    name: Annotated[str, typer.Argument(metavar="NAME", help="The run (release).", show_default=False)],
    volumes: Annotated[bool, typer.Option("--volumes", help="Also delete the volume claims helm leaves behind (the chart's RabbitMQ data, "
                                                             "and the parties' data claims of data.perParty.volumeClaimTemplate).")] = False,
    namespace: NAMESPACE = None,
    kube_context: KUBE_CONTEXT = None,
) -> None:
    """Uninstall a run (helm uninstall), with the keys Secret launch made for it."""
    helm = _guard(lambda: Helm(kube_context))
    kube = _connect(kube_context, namespace)
    space = kube.namespace
    def uninstall() -> bool:
        try:
            helm.uninstall(name, space)
            return True
        except ReleaseNotFound:  # the keys Secret or volume claims may still be there
            return False

    found = _guard(uninstall)
    secrets = _guard(lambda: kube.secrets(f"{INSTANCE}={name},{MANAGED_BY}={LAUNCHER}"))
    for secret in secrets:
        _guard(lambda secret=secret: kube.delete_secret(secret.metadata.name))
    claims = _guard(lambda: kube.volume_claims(f"{INSTANCE}={name}"))
    if volumes:
        for claim in claims:
            _guard(lambda claim=claim: kube.delete_volume_claim(claim.metadata.name))
    if not found and not secrets and not (volumes and claims):
        raise fail(f"no release {name} in namespace {space} (splitfed status lists the runs)", ExitCode.BAD_INPUT)
    done = [f"release {name}" if found else None, f"{len(secrets)} keys Secret" if secrets else None,
            f"{len(claims)} volume claims" if volumes and claims else None]
    _say(f"deleted {', '.join(d for d in done if d)} in namespace {space}")
    if claims and not volumes:
        _say(f"kept {len(claims)} volume claims ({', '.join(c.metadata.name for c in claims)}): splitfed delete {name} --volumes removes them")


# -- registration -------------------------------------------------------------------------------


def register(app: typer.Typer) -> None:
    """Add `launch SCENARIO`, `status`, `logs` and `delete` to the CLI."""
    launch_app = typer.Typer(
        help="Run a scenario on Kubernetes: the options of `splitfed run SCENARIO` (less those naming this machine's files "
             "or broker) become chart values; helm upgrade --install; then follow the pods to the results.",
        no_args_is_help=True,
    )
    for scenario in chart.launchable():
        summary = SCENARIOS[scenario].summary
        launch_app.command(scenario, help=f"{summary} On Kubernetes, through the Helm chart.")(launch_command(scenario))
    app.add_typer(launch_app, name="launch")
    app.command("status")(status)
    app.command("logs")(logs)
    app.command("delete")(delete)

