"""The one launcher: a scenario's roles as threads in this process (memory or RabbitMQ) or as
`splitfed serve ROLE` OS processes configured by SPLITFED_* variables, with progress events,
result collection, fail-fast error reporting and queue clean-up written once for every scenario.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from splitfed import config
from splitfed.config import NAME, setting
from splitfed.observability import metrics
from splitfed.roles.declaration import Identity, Progress, ProgressSink, RoleSpec
from splitfed.roles.deployment import LOG_LEVELS
from splitfed.transport import (
    MEMORY, AmqpBroker, Broker, Connection, InMemory, MemoryBroker, MemoryTransport, Transport, connect, passed_as_file, warn_if_unencrypted,
)
from splitfed.transport.broker import NotAmqp

log = logging.getLogger(__name__)
PROCESSES_NEED_AMQP = "separate processes need a broker URL (amqp:// or amqps://)"
TransportFactory = Callable[[str], Transport]  # party name -> its own connection
POLL_SECONDS = 0.1  # how often the launcher looks at its roles while it waits for them


class ScenarioError(RuntimeError):
    """A role failed; the message carries what it said."""


def new_session() -> str:
    return uuid.uuid4().hex[:12]


@dataclass(kw_only=True)
class LocalRun:
    """Settings of a run in this process only."""

    out: Path | None = setting(None, "Write the results as JSON here.")
    plot: Path | None = setting(None, "Draw the training curves and traffic as a PNG here at the end (needs the plots extra).")
    log_level: str = setting("info", "Logging level.", choices=LOG_LEVELS)


@dataclass(kw_only=True)
class RunSettings(Connection, LocalRun):
    """How `splitfed run` deploys a scenario's roles."""

    broker: str = setting(MEMORY, "memory (every role in this process, no broker) or amqp(s)://user:pass@host:port/vhost, or several such URLs, comma-separated, of one cluster.", metavar="URL")
    launch: str | None = setting(None, "threads or processes (default: threads with memory, processes with a broker URL).", choices=("threads", "processes"))
    session: str | None = setting(None, "Session id: names the queues (default: a new random one).", pattern=NAME)
    timeout: float = setting(300.0, "Seconds any role waits for a peer before giving up.", min=0.1)
    key_list: Path | None = setting(None, "Key-list file; every party signs with PARTY.key from its folder (splitfed keys generate). None: unsafe mode.")
    metrics_port: int = setting(
        0, "Serve Prometheus metrics on 127.0.0.1: every role on this port with --launch threads; the Nth role (the lead first) on this port + N "
        "with --launch processes (0: off).", min=0, max=65535,
    )

    # The --broker value parsed, by `resolved`: what the launcher, its transports and the
    # clean-up use. Not a setting of its own.
    address: Broker | None = dataclasses.field(default=None, init=False, repr=False, compare=False)

    @property
    def broker_scheme(self) -> str:
        """memory, amqp or amqps: how the run's label names its broker (no credentials)."""
        if isinstance(self.address, AmqpBroker):  # resolved: perhaps read from --broker-file
            return "amqps" if self.address.encrypted else "amqp"
        return self.broker.split("://")[0]

    def resolved(self) -> RunSettings:
        """The same settings with the session, the launch mode and the parsed broker filled in;
        settings that cannot work are refused here, before anything connects or trains."""
        try:
            address = InMemory() if self.broker == MEMORY else self.amqp_broker("a run over RabbitMQ")
        except NotAmqp:
            if self.launch == "processes":
                raise ValueError(PROCESSES_NEED_AMQP) from None
            raise
        launch = self.launch or ("threads" if isinstance(address, InMemory) else "processes")
        if launch == "processes" and isinstance(address, InMemory):
            raise ValueError(PROCESSES_NEED_AMQP)
        resolved = dataclasses.replace(self, launch=launch, session=self.session or new_session())
        resolved.address = address
        return resolved

    def private_key(self, party: str) -> Path | None:
        """Where `splitfed keys generate` put `party`'s private key: beside the key list."""
        return self.key_list.parent / f"{party}.key" if self.key_list else None


@dataclass(frozen=True)
class Launch:
    """One role of a run: which, under what name, with which settings."""

    spec: RoleSpec
    name: str  # its party name (threads, processes and logs are named after it)
    learning: Any
    deployment: Any
    threads: int = 1  # torch threads when it runs as its own process

    def with_deployment(self, **changes: Any) -> Launch:
        return dataclasses.replace(self, deployment=dataclasses.replace(self.deployment, **changes))


@dataclass(frozen=True)
class Scenario:
    """A scenario declared once: its settings, the roles it starts (the first is the lead, whose
    result is the run's result), the queues it leaves behind, and what it does at the end."""

    name: str
    summary: str
    learning: type
    run_settings: type
    plan: Callable[[Any, Any, Path], list[Launch]]  # (learning, run settings, work folder) -> roles
    queues: Callable[[Any, Any], list[str]]  # (learning, run settings) -> queues to delete at the end
    label: Callable[[Any, Any], str]  # for progress bars
    finish: Callable[[Any, Any, Path, dict], None] | None = None  # (learning, run settings, work folder, result)
    local: Callable[[Any, Any, ProgressSink | None], dict] | None = None  # a scenario with no roles: run here


def threads_per_process(co_running: int) -> int:
    """Torch threads for each of `co_running` processes that compute at the same time."""
    return max(1, (os.cpu_count() or 1) // max(1, co_running))


def run(scenario: Scenario, learning: Any, settings: Any, on_progress: ProgressSink | None = None, connect_as: TransportFactory | None = None) -> dict:
    """Run `scenario` to its end and return its results (the lead role's result, the wall time
    and the configuration). `connect_as` replaces the transports of a threads run (tests)."""
    started = time.perf_counter()
    if scenario.local is not None:
        result = scenario.local(learning, settings, on_progress)
        config_values = config.values_of(learning)
    else:
        settings = settings.resolved()
        warn_if_unencrypted(settings.address, settings.key_list is not None)
        connect_as = connect_as or transport_factory(settings)
        with tempfile.TemporaryDirectory(prefix="splitfed-") as folder:
            workdir = Path(folder)
            launches = with_metrics(scenario.plan(learning, settings, workdir), settings)
            check_tasks(launches)
            if settings.launch == "processes":
                result = run_processes(launches, settings, on_progress, settings.timeout, workdir)
            else:
                result = run_threads(launches, connect_as, on_progress, settings.timeout)
            delete_queues(connect_as, scenario.queues(learning, settings))
            if scenario.finish:
                scenario.finish(learning, settings, workdir, result)
        config_values = {**config.values_of(learning), "session": settings.session, "broker": str(settings.address), "launch": settings.launch,
                         "authenticated": settings.key_list is not None}
    return {"scenario": scenario.name, **result, "wall_seconds": time.perf_counter() - started, "config": config_values}


def check_tasks(launches: list[Launch]) -> None:
    """The parties' devices, tasks and data tried before any of them starts (learning.tasks.preflight)."""
    if devices := {launch.learning.device for launch in launches if launch.spec.torch and launch.learning is not None}:
        from splitfed.learning.device import resolve  # torch: only runs that train load it

        for device in sorted(devices):
            resolve(device)
    parties = [(launch.learning, launch.spec.context(launch.learning, launch.deployment)) for launch in launches
               if launch.spec.reads_data and launch.spec.needs_data(launch.learning)]
    if parties:
        from splitfed.learning.tasks import preflight  # torch: only runs that train load it

        preflight(parties)


def with_metrics(launches: list[Launch], settings: RunSettings) -> list[Launch]:
    """Roles in their own processes serve metrics on consecutive ports; roles in this process
    share its registry and one port."""
    if not settings.metrics_port:
        return launches
    if settings.launch == "threads":
        metrics.serve(settings.metrics_port, "127.0.0.1")
        return launches
    ports = [settings.metrics_port + n for n in range(len(launches))]
    if ports[-1] > 65535:
        raise ValueError(f"--metrics-port {settings.metrics_port} leaves no room for {len(launches)} roles below 65536")
    log.info("metrics: %s", ", ".join(f"{launch.name} on 127.0.0.1:{port}" for launch, port in zip(launches, ports)))
    return [launch.with_deployment(metrics_port=port, metrics_address="127.0.0.1") for launch, port in zip(launches, ports)]


def transport_factory(settings: RunSettings) -> TransportFactory:
    """Each party's own connection to the broker of `settings` (resolved)."""
    broker = settings.address
    if isinstance(broker, InMemory):
        shared = MemoryBroker()
        return lambda party: MemoryTransport(shared)
    return lambda party: connect(broker, settings, party)


def delete_queues(connect_as: TransportFactory, queues: list[str]) -> None:
    """Remove a finished session's queues (best effort: they also expire when abandoned)."""
    transport = connect_as("cleanup")
    try:
        for queue in queues:
            transport.delete(queue)
    finally:
        transport.close()


# -- threads ------------------------------------------------------------------------------


class RoleThread(threading.Thread):
    """Runs one role and keeps its result or exception."""

    def __init__(self, name: str, target: Callable[[], Any]):
        super().__init__(name=name, daemon=True)
        self._target_fn = target
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self._target_fn()
        except BaseException as exc:  # reported by the launching thread
            self.error = exc

    def outcome(self, timeout: float) -> Any:
        """The role's result once it has finished; ScenarioError if it failed or is still running."""
        self.join(timeout)
        if self.is_alive():
            raise ScenarioError(f"{self.name} did not finish within {timeout:.0f}s")
        if self.error is not None:
            raise ScenarioError(f"{self.name} failed: {self.error}") from self.error
        return self.result


def run_threads(launches: list[Launch], connect_as: TransportFactory, on_progress: ProgressSink | None, timeout: float) -> dict:
    """Every role in this process, each on its own thread and transport connection."""
    transports: list[Transport] = []
    threads: list[RoleThread] = []
    try:
        for index, launch in enumerate(launches):
            transport = connect_as(launch.name)
            transports.append(transport)
            identity = Identity.load(launch.name, launch.deployment.key_list, getattr(launch.deployment, "private_key", None))
            role = launch.spec.build(launch.learning, launch.deployment, transport, identity, on_progress if index == 0 else None)
            threads.append(RoleThread(launch.name, role.run))
        for thread in threads:
            thread.start()
        _wait(
            threads, timeout,
            done=lambda thread: not thread.is_alive(),
            failure=lambda thread: f"{thread.name} failed: {thread.error}" if thread.error else None,
        )
    finally:
        for transport in transports:
            transport.close()
    return threads[0].result


def _wait(members: list, timeout: float, done: Callable[[Any], bool], failure: Callable[[Any], str | None]) -> None:
    """Until every member is done. The first failure ends the wait at once (the other roles
    would only wait for it until their timeouts); once the lead is done, the others get
    `timeout` seconds to finish."""
    deadline: float | None = None
    while True:
        for member in members:
            if done(member) and (problem := failure(member)):
                raise ScenarioError(problem)
        if all(done(member) for member in members):
            return
        if deadline is None and done(members[0]):
            deadline = time.monotonic() + timeout
        if deadline is not None and time.monotonic() > deadline:
            late = ", ".join(str(getattr(m, "name", m)) for m in members if not done(m))
            raise ScenarioError(f"{late} did not finish within {timeout:.0f}s of the run's end")
        time.sleep(POLL_SECONDS)


# -- processes ----------------------------------------------------------------------------


@dataclass
class RoleProcess:
    name: str
    process: subprocess.Popen
    log_path: Path

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


# The roles of one run share this machine's cores and take turns (a split client waits for the
# server, which waits for the broker). An idle OpenMP thread of torch's (libgomp) spins 300,000
# times before it sleeps: through a whole round trip, holding a core the broker and the other
# party need. 10,000 still spans the gaps between one batch's operations. Measured on 2 cores,
# 5-client round-robin over RabbitMQ, in one A/B of 4 repetitions: 1.33x -> 1.28x centralized
# (medians), and per-batch round trips with no tail of slow hops. A user's GOMP_SPINCOUNT or
# OMP_WAIT_POLICY (which an explicit spin count would override) is left alone.
IDLE_SPINS = 10_000


def role_environment(launch: Launch, connection: Connection) -> dict[str, str]:
    """The process environment for one role: this one's, without SPLITFED_* variables meant for
    the launching command, plus exactly the variables the role declares (of `connection`, a run's
    settings among them, only the connection's)."""
    inherited = {key: value for key, value in os.environ.items() if not key.startswith(config.ENV_PREFIX)}
    learning = (launch.learning,) if launch.spec.learning else ()
    threads = {"OMP_NUM_THREADS": str(launch.threads)}
    if "GOMP_SPINCOUNT" not in inherited and "OMP_WAIT_POLICY" not in inherited:
        threads["GOMP_SPINCOUNT"] = str(IDLE_SPINS)
    broker = config.env_of(Connection, connection)
    if connection.broker_file is not None:  # the file names the broker: no URL in the environment, not even the default's guest password
        broker.pop(config.env_name("broker"))
    return {**inherited, **config.to_env(*learning, launch.deployment), **broker, **threads}


class ProcessGroup:
    """The OS processes of one run; killed together when anything fails."""

    def __init__(self, connection: Connection, workdir: Path | None = None) -> None:
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="splitfed-"))  # logs, the lead's result, the broker's credentials
        self.connection = passed_as_file(connection, self.workdir)  # the roles' environment names no password
        self.members: list[RoleProcess] = []

    def start(self, launch: Launch, name: str | None = None) -> RoleProcess:
        if hasattr(launch.deployment, "torch_threads"):
            launch = launch.with_deployment(torch_threads=launch.threads)
        name = name or launch.name
        log_path = self.workdir / f"{name}.log"
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", "splitfed", "serve", launch.spec.name], env=role_environment(launch, self.connection),
                stdout=subprocess.PIPE, stderr=log_file, text=True,
            )
        member = RoleProcess(name, process, log_path)
        self.members.append(member)
        return member

    def follow(self, member: RoleProcess, on_progress: ProgressSink | None) -> threading.Thread:
        """Pass the progress events a role prints on stdout to `on_progress`, until it exits."""

        def read() -> None:
            for line in member.process.stdout:
                try:
                    progress = Progress(**json.loads(line))
                except (ValueError, TypeError):
                    continue
                if on_progress:
                    on_progress(progress)

        reader = threading.Thread(target=read, name=f"follow-{member.name}", daemon=True)
        reader.start()
        return reader

    def wait(self, member: RoleProcess, timeout: float) -> None:
        try:
            code = member.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise ScenarioError(f"{member.name} did not finish within {timeout:.0f}s\n{member.tail()}") from None
        if code != 0:
            raise ScenarioError(f"{member.name} exited with code {code}:\n{member.tail()}")

    def stop(self) -> None:
        for member in self.members:
            if member.process.poll() is None:
                member.process.kill()
                member.process.wait()
            if member.process.stdout:
                member.process.stdout.close()


def run_processes(launches: list[Launch], connection: Connection, on_progress: ProgressSink | None, timeout: float, workdir: Path) -> dict:
    """Every role as its own `splitfed serve` process; the lead's result comes back as a file."""
    group = ProcessGroup(connection, workdir)
    result_path = group.workdir / "result.json"
    try:
        lead = group.start(launches[0].with_deployment(out=result_path, progress_events=True))
        for launch in launches[1:]:
            group.start(launch)
        reader = group.follow(lead, on_progress)
        _wait(
            group.members, timeout,
            done=lambda member: member.process.poll() is not None,
            failure=lambda member: f"{member.name} exited with code {member.process.returncode}:\n{member.tail()}" if member.process.returncode else None,
        )
        reader.join(timeout)
    finally:
        group.stop()
    return json.loads(result_path.read_text())
