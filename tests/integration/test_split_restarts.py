"""Split learning when a party restarts, and when frames of an earlier run are replayed.

The relay keeps no state, so a killed relay's successor goes on and the run still equals
centralized training. A split half cannot resume (its layers and optimiser live in its process),
so a restart fails the run at once with a clear error, never a silent stall. Frames recorded in
an earlier run of the same session are refused as `replay` by every party."""

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from splitfed.learning.settings import SplitSettings
from splitfed.observability.metrics import rejected_count
from splitfed.protocol import decode
from splitfed.roles.split.common import CLIENT, RELAY, SERVER, session_queues
from splitfed.scenarios import launch, split
from splitfed.scenarios.launch import ProcessGroup
from splitfed.scenarios.split import SplitRun
from splitfed.security import keys
from splitfed.transport.rabbitmq import RabbitTransport
from tests.conftest import HANG_GUARD, max_param_diff

SETTINGS = SplitSettings(dataset="digits", epochs=1, batch_size=32)


class Halves:
    """The processes of one split run over RabbitMQ, started one by one, with the client's
    progress followed so a test can act in the middle of the epoch."""

    def __init__(self, broker_url: str, session: str, workdir: Path, via: str):
        self.run = SplitRun(broker=broker_url, session=session, via=via, timeout=60, save_model=workdir / "model.safetensors").resolved()
        self.workdir = workdir
        plan = split.plan(SETTINGS, self.run, workdir)
        self.launches = {item.name: item for item in plan}
        self.launches[CLIENT] = self.launches[CLIENT].with_deployment(progress_events=True, out=workdir / "client.json")
        self.group = ProcessGroup(self.run, workdir)
        self.batches = 0
        self.pause_at: int | None = None  # the batch at which the client is stopped
        self.paused = threading.Event()
        self.members = {}

    def start(self, role: str, name: str | None = None):
        member = self.group.start(self.launches[role], name=name or role)
        self.members[name or role] = member
        if role == CLIENT:
            self.group.follow(member, self.count_batch)
        return member

    def count_batch(self, progress) -> None:
        """On the thread that reads the client's progress, which stops it as soon as it reports
        batch `pause_at`: a test thread short of CPU cannot let it train on to the epoch's end."""
        if progress.event == "batch":
            self.batches = progress.done
            if self.pause_at is not None and progress.done >= self.pause_at and not self.paused.is_set():
                os.kill(self.members[CLIENT].process.pid, signal.SIGSTOP)
                self.paused.set()

    def pause_client_after(self, batches: int) -> None:
        """Stop the client (SIGSTOP) once it has trained `batches` batches: whatever a test does
        next happens mid-epoch, however fast the machine."""
        self.pause_at = batches
        deadline = time.monotonic() + HANG_GUARD
        while not self.paused.wait(0.05):
            assert time.monotonic() < deadline, f"the client trained only {self.batches} batches"
            assert self.members[CLIENT].process.poll() is None, self.members[CLIENT].tail()
        assert self.batches < 45, "the epoch was over before the client could be paused"

    def resume_client(self) -> None:
        os.kill(self.members[CLIENT].process.pid, signal.SIGCONT)

    def kill(self, name: str) -> None:
        self.members[name].process.kill()
        self.members[name].process.wait()

    def close(self) -> None:
        self.group.stop()
        with RabbitTransport(self.run.broker, name="cleanup") as transport:
            for queue in session_queues(self.run.session):
                transport.delete(queue)


@pytest.fixture
def halves(broker_url, session, tmp_path, request):
    run = Halves(broker_url, session, tmp_path, request.param)
    yield run
    run.close()


@pytest.mark.parametrize("halves", ["relay"], indirect=True)
def test_a_killed_relay_is_replaced_and_the_run_equals_centralized(halves, digits_baseline):
    """SIGKILL the relay mid-epoch, with the client's next activations on their way: a new relay
    picks them up (the old one's unacked frames come back to it) and the run ends exactly as
    centralized training, the halves dropping anything forwarded twice."""
    _, baseline_model = digits_baseline
    server, client, relay = halves.start(SERVER), halves.start(CLIENT), halves.start(RELAY)
    halves.pause_client_after(10)
    halves.kill(RELAY)
    halves.resume_client()
    replacement = halves.start(RELAY, name="relay-restarted")
    for member in (client, server, replacement):
        halves.group.wait(member, HANG_GUARD)
    assert relay.process.returncode == -signal.SIGKILL
    split.merge_parts(SETTINGS, halves.run, halves.workdir, {})
    assert max_param_diff(baseline_model, halves.workdir / "model.safetensors") <= 1e-5


@pytest.mark.parametrize("halves", ["direct"], indirect=True)
def test_a_restarted_server_makes_the_client_fail_at_once_with_a_clear_error(halves):
    """The split-server dies mid-epoch and a new one starts: it does not know the client's run,
    answers its next message with `abort`, and the client exits with code 5 saying so: the abort,
    not its 60 s timeout, which would end it with code 3 and another message."""
    halves.start(SERVER)
    client = halves.start(CLIENT)
    halves.pause_client_after(10)
    halves.kill(SERVER)
    replacement = halves.start(SERVER, name="server-restarted")
    halves.resume_client()
    assert client.process.wait(timeout=HANG_GUARD) == 5, client.tail()
    assert "the split-server ended run" in client.tail() and "does not know run" in client.tail()
    assert replacement.process.poll() is None  # it waits for a client of its own


@pytest.mark.parametrize("halves", ["direct"], indirect=True)
def test_a_restarted_client_is_refused_with_a_clear_error(halves):
    """The split-client dies mid-epoch and a new one starts: its hello is answered ok=false (the
    server's run has begun, and a fresh client cannot rejoin it) and it exits with code 5."""
    server = halves.start(SERVER)
    halves.start(CLIENT)
    halves.pause_client_after(10)
    halves.kill(CLIENT)
    second = halves.start(CLIENT, name="client-restarted")
    assert second.process.wait(timeout=HANG_GUARD) == 5, second.tail()
    assert "a restarted client cannot rejoin it" in second.tail()
    assert server.process.poll() is None  # the run of the first client is untouched: no hello ends it


class Recorder(RabbitTransport):
    """A party's real connection that keeps a copy of every frame it publishes (what someone
    listening on the broker records)."""

    frames: list[tuple[str, bytes]] = []

    def publish(self, queue, body, *, persistent=False, must_exist=False):
        Recorder.frames.append((queue, body))
        super().publish(queue, body, persistent=persistent, must_exist=must_exist)


class Replayer(RabbitTransport):
    """A party's real connection, and an attacker beside it: before each numbered frame the party
    sends, it publishes the frame of the earlier run with the same sender and sequence number to
    every queue that frame went to (the relay's, and the recipient's, where the relay forwarded
    it). Unnumbered handshakes (seq 0) wait in the queues from the start instead: replayed at
    every handshake, they would feed on each other through the relay."""

    recorded: dict[tuple[str, int], set[tuple[str, bytes]]] = {}

    def publish(self, queue, body, *, persistent=False, must_exist=False):
        message = decode(body)
        for old_queue, old_body in Replayer.recorded.get((message.sender, message.seq), ()) if message.seq else ():
            super().publish(old_queue, old_body)
        super().publish(queue, body, persistent=persistent, must_exist=must_exist)


def test_frames_of_an_earlier_run_are_refused_as_replay_by_every_party(broker_url, session, digits_baseline, tmp_path):
    """Run one signed split session through the relay, recording every frame; run it again with
    the same session and keys while each recorded frame is replayed just before its counterpart
    of the new run (the same sender and sequence number, validly signed). The relay and both
    halves refuse them as `replay` (the hellos, which open a run, are answered but the answers
    go unheeded) and the second run equals centralized training."""
    _, baseline_model = digits_baseline
    key_list = keys.generate(tmp_path / "keys", ["split-client", "split-server"])

    def run_once(transport: type, model: Path) -> dict:
        run = SplitRun(broker=broker_url, launch="threads", session=session, via="relay", timeout=60, save_model=model, key_list=key_list)
        return launch.run(split.SCENARIO, SETTINGS, run, connect_as=lambda role: transport(broker_url, name=f"{role}-{session}"))

    Recorder.frames = []
    run_once(Recorder, tmp_path / "first.safetensors")
    Replayer.recorded = {}
    for queue, body in Recorder.frames:
        message = decode(body)
        Replayer.recorded.setdefault((message.sender, message.seq), set()).add((queue, body))
    assert len(Replayer.recorded) > 90
    with RabbitTransport(broker_url, name=f"replayer-{session}") as replayer:
        for queue, body in Replayer.recorded.pop((CLIENT, 0)) | Replayer.recorded.pop((SERVER, 0)):
            replayer.declare(queue)
            replayer.publish(queue, body)
    result = run_once(Replayer, tmp_path / "second.safetensors")
    assert max_param_diff(baseline_model, tmp_path / "second.safetensors") <= 1e-5
    assert result["history"][-1]["accuracy"] > 0.5
    for role in (RELAY, SERVER, CLIENT):
        assert rejected_count(role, session, "replay") >= 40, role
