"""Several split clients as separate processes over the real RabbitMQ: signed runs equal their
one-process reference, a client killed mid-epoch (splitfed-v2) or mid-turn (round-robin) does
not stall the run: the epoch closes, or the turn passes, without it, and the results say so; and
a client that comes back after it was given up goes on where the run has got to."""

from __future__ import annotations

import json
import re
import signal
import threading
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from splitfed.learning import clients as reference
from splitfed.learning.settings import SplitNNSettings
from splitfed.roles.split.common import SERVER, merged_state, session_queues
from splitfed.scenarios import splitnn
from splitfed.scenarios.launch import ProcessGroup
from splitfed.security import keys
from splitfed.transport.rabbitmq import RabbitTransport
from tests.conftest import HANG_GUARD

SMALL = dict(dataset="digits", batch_size=32, limit=900, test_limit=300)
# Generous: a live client starved of CPU for seconds on a loaded machine must not be given up
# with the one the test kills or stops (whose silence it waits out once a test).
CLIENT_TIMEOUT = 10.0


class Parties:
    """The processes of one splitnn run, each started on its own, with the clients' batches
    followed so that a test can signal one mid-epoch."""

    def __init__(self, settings: SplitNNSettings, broker_url: str, session: str, workdir: Path, key_list: Path | None = None):
        self.settings = settings
        self.run = splitnn.SplitNNRun(broker=broker_url, session=session, timeout=60, key_list=key_list).resolved()
        self.workdir = workdir
        self.launches = {item.name: item for item in splitnn.plan(settings, self.run, workdir)}
        for name, item in self.launches.items():
            if hasattr(item.deployment, "save"):
                self.launches[name] = item.with_deployment(save=workdir / f"{name}.safetensors", progress_events=True, out=workdir / f"{name}.json")
        self.group = ProcessGroup(self.run, workdir)
        self.members = {}
        self.batches: dict[str, int] = {}
        self.planned: dict[str, tuple[int, signal.Signals, threading.Event]] = {}  # name -> (batch, signal, that batch came)

    def start_all(self) -> None:
        for name, item in self.launches.items():
            self.members[name] = self.group.start(item)
            self.group.follow(self.members[name], lambda progress, name=name: self.count(name, progress))

    def count(self, name: str, progress) -> None:
        """On the thread that reads `name`'s progress, which sends a planned signal as soon as the
        batch comes: a test thread short of CPU cannot let the client train on past it."""
        if progress.event == "batch":
            self.batches[name] = self.batches.get(name, 0) + 1
            if name in self.planned:
                batch, signum, came = self.planned[name]
                if self.batches[name] >= batch and not came.is_set():
                    came.set()  # before the signal: a waiter never finds the client killed and the batch unseen
                    self.members[name].process.send_signal(signum)

    def signal_at(self, name: str, batch: int, signum: signal.Signals) -> None:
        """Plan `signum` for `name` once it reports its `batch`th batch (before start_all)."""
        self.planned[name] = (batch, signum, threading.Event())

    def until_signalled(self, name: str) -> None:
        deadline = time.monotonic() + HANG_GUARD
        while not self.planned[name][2].wait(0.05):
            assert time.monotonic() < deadline, f"{name} trained only {self.batches.get(name, 0)} batches"
            assert self.members[name].process.poll() is None, self.members[name].tail()

    def wait(self, *names: str) -> None:
        for name in names or list(self.members):
            self.group.wait(self.members[name], HANG_GUARD)

    def result(self, name: str) -> dict:
        return json.loads((self.workdir / f"{name}.json").read_text())

    def given_up(self) -> list[str]:
        """The clients the server gave up, one entry each time its log says so."""
        log = self.members[SERVER].log_path.read_text()
        return re.findall(r"split-server: (split-client-\d+) has been silent for \d+ s: given up", log)

    def layers(self, name: str) -> dict:
        return load_file(str(self.workdir / f"{name}.safetensors"))

    def close(self) -> None:
        self.group.stop()
        with RabbitTransport(self.run.broker, name="cleanup") as transport:
            for queue in session_queues(self.run.session, self.settings.clients):
                transport.delete(queue)


@pytest.fixture
def parties(broker_url, session, tmp_path):
    made = []

    def make(settings: SplitNNSettings, key_list: Path | None = None) -> Parties:
        made.append(Parties(settings, broker_url, session, tmp_path, key_list))
        return made[-1]

    yield make
    for run in made:
        run.close()


def max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.mark.parametrize("schedule", ["splitfed-v1", "round-robin"])
def test_signed_processes_equal_the_reference(parties, tmp_path, schedule):
    settings = SplitNNSettings(**SMALL, epochs=2, clients=3, schedule=schedule, partition="classes:0-3,4-6,7-9")
    names = ["split-server", "split-client-0", "split-client-1", "split-client-2"] + (["split-fed"] if schedule == "splitfed-v1" else [])
    run = parties(settings, keys.generate(tmp_path / "keys", names))
    run.start_all()
    run.wait()
    parts, bodies = reference.reference_run(settings)
    for index, part in enumerate(parts):
        assert max_diff(run.layers(f"split-client-{index}"), merged_state([(part.head.state_dict(), 0)])) <= 1e-5
    assert max_diff(run.layers(SERVER), merged_state([(bodies[0].state_dict(), parts[0].cut_layer)])) <= 1e-5
    result = run.result(SERVER)
    assert [epoch["missing"] for epoch in result["history"]] == [[], []]
    assert all(isinstance(epoch["accuracy"], float) for epoch in result["history"])  # each epoch was evaluated


@pytest.mark.parametrize("schedule, periods", [("splitfed-v2", {}), ("splitfed-v2", {"syncs_per_epoch": 3}), ("splitfed-v1", {}), ("round-robin", {})])
def test_a_client_killed_mid_epoch_does_not_stall_the_run(parties, schedule, periods):
    """SIGKILL client 1 in the middle of its first epoch's share (its turn, in round-robin): after
    --client-timeout the epoch (or period) closes, or the turn passes, with the other two, every
    later one goes on without waiting for it (the server gives it up once, never waits out its
    silence again), and the server's results name it as missing."""
    settings = SplitNNSettings(**SMALL, epochs=2, clients=3, schedule=schedule, min_clients=2, client_timeout=CLIENT_TIMEOUT, **periods)
    run = parties(settings)
    run.signal_at("split-client-1", 3, signal.SIGKILL)
    run.start_all()
    run.until_signalled("split-client-1")
    run.wait(SERVER, "split-client-0", "split-client-2")
    assert run.given_up() == ["split-client-1"]
    result = run.result(SERVER)
    assert [epoch["missing"] for epoch in result["history"]] == [["split-client-1"]] * 2
    assert [epoch["included"] for epoch in result["history"]] == [["split-client-0", "split-client-2"]] * 2
    assert result["clients"]["split-client-1"]["gone"] is True
    assert result["history"][-1]["accuracy"] > 0.3  # chance is 0.1
    if schedule != "round-robin":  # the survivors continue from the same average
        assert max_diff(run.layers("split-client-0"), run.layers("split-client-2")) == 0


def test_a_client_given_up_and_heard_from_again_goes_on_where_the_run_is(parties):
    """SIGSTOP client 1 early in its first period; once client 0 trains past that period (it
    closed without client 1), SIGCONT it. Its late share is answered with where the run is; it
    goes on from the fed's newest layers, is waited for again, and ends the run with exactly the
    layers of the others and an exit code of 0."""
    settings = SplitNNSettings(**SMALL, epochs=4, clients=3, schedule="splitfed-v2", syncs_per_epoch=3, fed_lr=2.0, min_clients=2,
                               client_timeout=CLIENT_TIMEOUT)
    run = parties(settings)
    run.signal_at("split-client-1", 1, signal.SIGSTOP)
    run.start_all()
    late = run.members["split-client-1"].process
    first_period = len(reference.periods(list(range(10)), 3)[0])  # 300 samples in batches of 32: 10 batches
    run.until_signalled("split-client-1")
    deadline = time.monotonic() + HANG_GUARD
    try:
        while run.batches.get("split-client-0", 0) <= first_period:  # client 0 is in period 2: period 1 closed without client 1
            assert time.monotonic() < deadline, "period 1 never closed without the stopped client"
            time.sleep(0.01)
    finally:
        late.send_signal(signal.SIGCONT)
    run.wait()
    assert late.returncode == 0, run.members["split-client-1"].tail()
    assert run.given_up() == ["split-client-1"]
    assert "split-server: split-client-1 is heard from again" in run.members[SERVER].log_path.read_text()
    result = run.result(SERVER)
    assert result["history"][-1]["included"] == ["split-client-0", "split-client-1", "split-client-2"]
    assert result["clients"]["split-client-1"]["gone"] is False
    assert max_diff(run.layers("split-client-0"), run.layers("split-client-1")) == 0
    assert max_diff(run.layers("split-client-0"), run.layers("split-client-2")) == 0
