"""Starting roles: as threads in this process, or as `splitfed serve ROLE` OS processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from splitfed.transport import MemoryBroker, MemoryTransport, Transport, is_amqp


TransportFactory = Callable[[str], Transport]  # role name -> its own connection


def new_session() -> str:
    return uuid.uuid4().hex[:12]


def redact(url: str) -> str:
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.split('@', 1)[1]}"


def transport_factory(broker: str, options: dict) -> TransportFactory:
    if broker == "memory":
        shared = MemoryBroker()
        return lambda role: MemoryTransport(shared)
    if is_amqp(broker):
        from splitfed.transport.rabbitmq import RabbitTransport

        return lambda role: RabbitTransport.from_options(broker, role, options)
    raise ValueError(f"unknown broker {broker!r}: use memory, amqp://... or amqps://...")


def resolve_launch(broker: str, launch: str | None) -> str:
    """"threads" (the default for memory) or "processes" (the default for a broker URL)."""
    launch = launch or ("processes" if is_amqp(broker) else "threads")
    if launch == "processes" and not is_amqp(broker):
        raise ValueError("separate processes need a broker URL (amqp:// or amqps://)")
    return launch


def delete_queues(connect: TransportFactory, queues: list[str]) -> None:
    """Remove a finished session's queues (best effort: they also expire when abandoned)."""
    transport = connect("cleanup")
    try:
        for queue in queues:
            transport.delete(queue)
    finally:
        transport.close()


def identity(key_list: Path | None, party: str) -> dict:
    """A party's signer and trust list from a `splitfed keys generate` folder (PARTY.key beside
    the key list); none of either without a key list."""
    from splitfed.security.keys import KeyList, load_private

    if key_list is None:
        return {"signer": None, "trusted": None}
    return {"signer": load_private(key_list.parent / f"{party}.key", party), "trusted": KeyList.load(key_list)}


class ScenarioError(RuntimeError):
    """A role failed; the message carries what it said."""


class RoleThread(threading.Thread):
    """Runs one role's `run()` and keeps its result or exception."""

    def __init__(self, name: str, target: Callable[[], Any]):
        super().__init__(name=name, daemon=True)
        self._target_fn = target
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self._target_fn()
        except BaseException as exc:  # reported by join_all in the launching thread
            self.error = exc

    def outcome(self, timeout: float) -> Any:
        self.join(timeout)
        if self.is_alive():
            raise ScenarioError(f"{self.name} did not finish within {timeout:.0f}s")
        if self.error is not None:
            raise ScenarioError(f"{self.name} failed: {self.error}") from self.error
        return self.result


def env_for(options: dict[str, Any]) -> dict[str, str]:
    """Options as SPLITFED_* variables: how the Helm chart configures a service, too."""
    env = {}
    for key, value in options.items():
        if value is None:
            continue
        name = "SPLITFED_" + key.upper().replace("-", "_")
        env[name] = str(value).lower() if isinstance(value, bool) else str(value)
    return env


def threads_per_process(co_running: int) -> int:
    """Torch threads for each of `co_running` processes that compute at the same time."""
    return max(1, (os.cpu_count() or 1) // max(1, co_running))


@dataclass
class RoleProcess:
    role: str
    process: subprocess.Popen
    log_path: Path

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class ProcessGroup:
    """The OS processes of one run; killed together if anything fails."""

    def __init__(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="splitfed-"))
        self.members: list[RoleProcess] = []

    def start(self, role: str, options: dict[str, Any], threads: int, extra_args: list[str] | None = None, name: str | None = None) -> RoleProcess:
        name = name or role
        env = {**os.environ, **env_for(options), "OMP_NUM_THREADS": str(threads), "SPLITFED_TORCH_THREADS": str(threads)}
        log_path = self.workdir / f"{name}.log"
        process = subprocess.Popen(
            [sys.executable, "-m", "splitfed", "serve", role, *(extra_args or [])],
            env=env, stdout=subprocess.PIPE, stderr=log_path.open("wb"), text=True,
        )
        member = RoleProcess(name, process, log_path)
        self.members.append(member)
        return member

    def follow(self, member: RoleProcess, on_event: Callable[[dict], None]) -> None:
        """Pass the JSON progress events a role prints on stdout to `on_event`, until it exits."""
        for line in member.process.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            on_event(event)

    def wait(self, member: RoleProcess, timeout: float) -> None:
        try:
            code = member.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise ScenarioError(f"{member.role} did not finish within {timeout:.0f}s\n{member.tail()}") from None
        if code != 0:
            raise ScenarioError(f"{member.role} exited with code {code}:\n{member.tail()}")

    def stop(self) -> None:
        for member in self.members:
            if member.process.poll() is None:
                member.process.kill()
                member.process.wait()
