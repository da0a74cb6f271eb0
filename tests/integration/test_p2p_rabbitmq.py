"""Decentralized runs over the real RabbitMQ, every party its own process: churn in p2p (a peer
killed mid-run is evicted and nobody stalls; a peer started mid-run catches up from a live peer's
model) and in SMPL (a peer killed inside a hyperedge holds its members up no longer than the
hyperedge timeout)."""

from __future__ import annotations

import dataclasses
import json
import signal
import time
from pathlib import Path

import pytest

from splitfed.learning.settings import P2PSettings, PeerSettings, SMPLSettings
from splitfed.roles.p2p.common import P2P_PEER, SMPL_PEER, TRACKER, session_queues
from splitfed.scenarios.launch import ProcessGroup
from splitfed.scenarios.p2p import PeerRun, planner
from splitfed.security import keys
from splitfed.transport.rabbitmq import RabbitTransport
from tests.conftest import HANG_GUARD

DIGITS = dict(dataset="digits", batch_size=16, lr=3e-3)
FASHION = dict(dataset="fashion-mnist", limit=8000, test_limit=1000, batch_size=32)  # epochs long enough to join a run under way
PEER_TIMEOUT = 10.0  # generous: a loaded machine can starve a training peer for seconds


class Session:
    """The processes of one decentralized run, started one by one so that a test can kill one
    and start another while the rest train; each peer's epochs are followed as they are reported."""

    def __init__(self, role: str, settings: PeerSettings, broker_url: str, session: str, workdir: Path, key_list: Path | None = None):
        self.role = role
        self.settings = settings
        self.run = PeerRun(broker=broker_url, session=session, timeout=60, key_list=key_list, peer_timeout=PEER_TIMEOUT).resolved()
        self.workdir = workdir
        self.launches = {item.name: item.with_deployment(out=workdir / f"{item.name}.json", progress_events=True)
                         for item in planner(role)(settings, self.run, workdir)}
        self.group = ProcessGroup(self.run, workdir)
        self.members = {}
        self.epochs: dict[str, list[dict]] = {}

    def start(self, *names: str, **changes) -> None:
        """Start these parties; `changes` to the learning settings of these alone (a joiner's epochs)."""
        for name in names:
            item = self.launches[name]
            if changes:
                item = dataclasses.replace(item, learning=dataclasses.replace(item.learning, **changes))
            self.members[name] = self.group.start(item)
            self.group.follow(self.members[name], lambda progress, name=name: self.follow(name, progress))

    def follow(self, name: str, progress) -> None:
        if progress.event == "epoch":
            self.epochs.setdefault(name, []).append(progress.record)

    def wait_for(self, name: str, epochs: int) -> None:
        """Until `name` has reported `epochs` epochs (or hyperedges)."""
        deadline = time.monotonic() + HANG_GUARD
        while len(self.epochs.get(name, [])) < epochs:
            assert time.monotonic() < deadline, f"{name} reported {len(self.epochs.get(name, []))} epochs in {HANG_GUARD} s"
            assert self.members[name].process.poll() is None, self.members[name].tail()
            time.sleep(0.02)

    def kill(self, name: str) -> None:
        self.members[name].process.send_signal(signal.SIGKILL)
        self.members[name].process.wait()

    def wait(self, *names: str) -> None:
        """Until each of `names` has exited with code 0 (ScenarioError if one failed or hangs)."""
        for name in names:
            self.group.wait(self.members[name], HANG_GUARD)

    def result(self, name: str) -> dict:
        return json.loads((self.workdir / f"{name}.json").read_text())

    def close(self) -> None:
        self.group.stop()
        with RabbitTransport(self.run.broker, name="cleanup") as transport:
            for queue in session_queues(self.run.session, self.role, self.settings.peers):
                transport.delete(queue)


@pytest.fixture
def sessions(broker_url, session, tmp_path):
    made = []

    def make(role: str, settings: PeerSettings, key_list: Path | None = None) -> Session:
        made.append(Session(role, settings, broker_url, session, tmp_path, key_list))
        return made[-1]

    yield make
    for run in made:
        run.close()


def test_p2p_churn_a_killed_peer_is_evicted_and_a_late_peer_catches_up(sessions, tmp_path):
    """Peers 0-2 start, synchronising twice an epoch and waiting at most half a second for each
    other; peer 1 is SIGKILLed after its second epoch; peer 3 starts once peer 0 is past its
    second, for three epochs. The survivors finish (neither the dead peer nor the one not yet
    started holds them up past the wait: waiting for either for ever would hang past the hang
    guard), the tracker evicts peer 1 and never lists it again, and
    peer 3 starts from a live peer's model: after its first epoch it is within 5 points of the
    others at the same epoch (a blank model would be far below)."""
    settings = P2PSettings(**FASHION, peers=4, epochs=6, partition="iid", syncs_per_epoch=2, sync_wait=0.5)
    names = [TRACKER, *(f"{P2P_PEER}-{index}" for index in range(4))]
    run = sessions(P2P_PEER, settings, keys.generate(tmp_path / "keys", names))
    run.start(TRACKER, "p2p-peer-0", "p2p-peer-1", "p2p-peer-2")
    run.wait_for("p2p-peer-1", 2)
    run.kill("p2p-peer-1")
    run.wait_for("p2p-peer-0", 2)
    run.start("p2p-peer-3", epochs=3)
    run.wait(TRACKER, "p2p-peer-0", "p2p-peer-2", "p2p-peer-3")

    tracker = run.result(TRACKER)
    assert tracker["evicted"] == ["p2p-peer-1"]
    assert {name: peer["state"] for name, peer in tracker["peers"].items()} == {
        "p2p-peer-0": "left", "p2p-peer-1": "evicted", "p2p-peer-2": "left", "p2p-peer-3": "left"}
    for name in ("p2p-peer-0", "p2p-peer-2"):
        history = run.result(name)["history"]
        assert [record["epoch"] for record in history] == list(range(1, 7))
        assert all(record["accuracy_before"] is not None for record in history)
    joiner = run.result("p2p-peer-3")["history"]
    first = joiner[0]
    assert first["epoch"] > 1 and len(joiner) == 3, "the late peer started from scratch instead of a live peer's epoch"
    others = [record["accuracy"] for name in ("p2p-peer-0", "p2p-peer-2") for record in run.result(name)["history"] if record["epoch"] == first["epoch"]]
    assert others and all(abs(first["accuracy"] - accuracy) <= 0.05 for accuracy in others), (first, others)
    assert tracker["accuracy"] > 0.75  # chance is 0.1


def test_smpl_a_peer_killed_inside_a_hyperedge_blocks_nobody_past_the_timeout(sessions):
    """Hyperedges of 3 among 4 peers; peer 3 is killed once it has finished a hyperedge (it is in
    the next one by then, or soon asks for it). Its members close without it after
    --hyperedge-timeout (or as soon as the tracker evicts it), and every survivor finishes all its
    hyperepochs: a hyperedge that waited for it for ever would hold its members past the hang guard.
    The timeout is the peer timeout: a live member's change late by seconds on a loaded machine
    still counts, and the dead member's hyperedges wait no longer than its eviction anyway."""
    settings = SMPLSettings(**DIGITS, peers=4, hyperedge_size=3, hyperepochs=6, hyperedge_timeout=PEER_TIMEOUT, partition="iid")
    run = sessions(SMPL_PEER, settings)
    run.start(TRACKER, *(f"{SMPL_PEER}-{index}" for index in range(4)))
    run.wait_for("smpl-peer-3", 1)
    run.kill("smpl-peer-3")
    run.wait(TRACKER, "smpl-peer-0", "smpl-peer-1", "smpl-peer-2")
    tracker = run.result(TRACKER)
    assert tracker["evicted"] == ["smpl-peer-3"]
    for index in range(3):
        history = run.result(f"smpl-peer-{index}")["history"]
        assert len(history) == 6 and len({record["edge"] for record in history}) == 6
        assert all(record["averaged"] <= 2 for record in history)
        assert sum(record["averaged"] >= 1 for record in history) >= 3  # hyperedges shrink only once peers are gone
    assert tracker["accuracy"] > 0.6
