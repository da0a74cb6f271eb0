"""The decentralized roles in one process (memory transport): the tracker's membership rules and
what it refuses, peers' staleness weighting, runs of p2p and smpl end to end, hostile frames
in a peer's queue, the tracker running with torch unavailable, peers on their own data, and a
peer whose model or classes are not the run's refused."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import threading
import time
import uuid

import numpy as np
import pytest

from splitfed.errors import Refused
from splitfed.learning.peers import Received, mixing_weights, peer_context
from splitfed.learning.tasks import Task, fingerprint
from splitfed.learning.settings import HyperedgeSettings, P2PSettings, SMPLSettings
from splitfed.observability import metrics
from splitfed.protocol import Message
from splitfed.roles.declaration import Identity
from splitfed.roles.endpoint import Endpoint
from splitfed.roles.p2p import PeerDeployment, TrackerDeployment
from splitfed.roles.p2p.common import HEARTBEAT, LEAVE, MEMBERS, MODEL, P2P_PEER, REGISTER, REPORT, SMPL_PEER, TRACKER, peer_queue, tracker_queue
from splitfed.roles.p2p.peer import P2PPeer
from splitfed.roles.p2p.smpl import SMPLPeer
from splitfed.roles.p2p.tracker import Tracker
from splitfed.scenarios import launch
from splitfed.scenarios.p2p import P2P, SMPL, PeerRun
from splitfed.security import keys
from splitfed.transport import MemoryBroker, MemoryTransport
from tests.unit.test_tasks import write_parties

DIGITS = dict(dataset="digits", batch_size=32, lr=3e-3)


# -- staleness ------------------------------------------------------------------------------


def model(sender: str, sync: int, samples: int = 100) -> Received:
    return Received(sender, sync, samples, {"w": np.full(2, float(sync), np.float32)})


def test_stale_models_are_discounted_then_dropped_and_models_ahead_count_in_full():
    settings = P2PSettings(peers=4, max_staleness=2, staleness_discount=0.5)
    received = [model("a", 5), model("b", 4), model("c", 3), model("d", 2), model("e", 7)]
    weights, kept, dropped = mixing_weights(5, 200, received, settings)
    assert [m.sender for m in kept] == ["a", "b", "c", "e"] and [m.sender for m in dropped] == ["d"]
    assert weights == [200.0, 100.0, 50.0, 25.0, 100.0]


# -- the tracker ----------------------------------------------------------------------------


# A fingerprint as learning.tasks.fingerprint writes it; the tracker compares them and needs no torch.
FINGERPRINT = {"model": "0123456789abcdef", "tensors": 2, "parameters": 650, "classes": [str(label) for label in range(10)]}


class FakePeer:
    """A peer's side of the wire, driven by hand: its endpoint signs as `name`."""

    def __init__(self, broker: MemoryBroker, session: str, name: str, key_dir=None, fingerprint: dict = FINGERPRINT):
        signer = keys.load_private(key_dir / f"{name}.key", name) if key_dir else None
        self.endpoint = Endpoint(MemoryTransport(broker), session=session, role=P2P_PEER, inbox=peer_queue(session, name), name=name,
                                 signer=signer, ordered=False, timeout=5)
        self.incarnation = uuid.uuid4().hex
        self.tracker = tracker_queue(session)
        self.fingerprint = fingerprint

    def send(self, kind: str, **meta) -> None:
        self.endpoint.send(self.tracker, kind, incarnation=self.incarnation, **meta)

    def register(self, started: float | None = None) -> str:
        nonce = uuid.uuid4().hex
        self.send(REGISTER, started=started or time.time(), samples=100, planned=2, nonce=nonce, fingerprint=self.fingerprint)
        return nonce

    def members(self, wait: float = 30.0) -> Message | None:
        received = self.endpoint.receive((MEMBERS,), None, wait=wait)
        return received[0] if received else None


@pytest.fixture
def tracked(tmp_path):
    """A signed tracker on its own thread, expecting two peers, and a way to make fake peers. Its
    peer timeout is longer than any test: a fake peer beats only when a test says so, and a
    loaded machine must not have one evicted in the middle; a test evicts a peer by backdating it."""
    session = "t-" + uuid.uuid4().hex[:8]
    key_list = keys.generate(tmp_path / "keys", [TRACKER, "p2p-peer-0", "p2p-peer-1", "p2p-peer-2"])
    broker = MemoryBroker()
    deployment = TrackerDeployment(session=session, key_list=key_list, private_key=tmp_path / "keys" / f"{TRACKER}.key", peer_timeout=300, expect_peers=2, timeout=20)
    tracker = Tracker(HyperedgeSettings(), deployment, MemoryTransport(broker), Identity.load(TRACKER, key_list, deployment.private_key))
    thread = launch.RoleThread("tracker", tracker.run)
    thread.start()
    yield tracker, session, (lambda name, signed=True: FakePeer(broker, session, name, tmp_path / "keys" if signed else None))
    thread.join(30)


def rejected(session: str, reason: str) -> float:
    return metrics.rejected_count(TRACKER, session, reason)


def test_tracker_lists_registers_and_evicts_a_silent_peer(tracked):
    tracker, session, peer = tracked
    a, b = peer("p2p-peer-0"), peer("p2p-peer-1")
    nonce = a.register()
    answer = a.members()
    assert answer.meta["ref"] == nonce and set(answer.meta["peers"]) == {"p2p-peer-0"}
    b.register()
    assert set(a.members().meta["peers"]) == {"p2p-peer-0", "p2p-peer-1"}  # a hears of b at once
    assert set(b.members().meta["peers"]) == {"p2p-peer-0", "p2p-peer-1"}
    tracker.members["p2p-peer-1"].last_seen -= tracker.peer_timeout  # b never beats: silent for the whole timeout now
    a.send(HEARTBEAT, epoch=1)  # the tracker takes it, finds its inbox drained, and evicts b (only)
    assert set(a.members().meta["peers"]) == {"p2p-peer-0"}  # the list after the eviction
    assert set(tracker.live()) == {"p2p-peer-0"}
    a.send(REPORT, epoch=1, accuracy_before=0.5, accuracy=0.6, loss=1.0, train_loss=1.1, averaged=0, staleness=0, seconds=1.0, test_samples=50)
    a.send(LEAVE)
    assert tracker_result(tracked)["evicted"] == ["p2p-peer-1"]


def tracker_result(tracked) -> dict:
    tracker, _, _ = tracked
    deadline = time.monotonic() + 60  # a hang guard: it finishes as soon as it handles the last leave
    while not tracker.finished:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return tracker.result()


def test_tracker_refuses_forged_replayed_and_malformed_messages(tracked):
    tracker, session, peer = tracked
    a = peer("p2p-peer-0")
    started = time.time()
    a.register(started)
    a.members()
    before = {reason: rejected(session, reason) for reason in ("unsigned", "replay", "evicted", "malformed", "duplicate", "unknown-key")}
    peer("p2p-peer-1", signed=False).register()  # no signature
    a.register(started)  # a replay of the register: started no later than the live incarnation's
    stranger = FakePeer(a.endpoint.transport.broker, session, "p2p-peer-0", None)
    stranger.endpoint.signer = a.endpoint.signer
    stranger.send(HEARTBEAT, epoch=1)  # signed by peer 0's key, but another incarnation: not live here
    assert stranger.members().meta["peers"]["p2p-peer-0"]["incarnation"] == a.incarnation  # told the list, nothing changed
    a.send(REPORT, epoch=1, accuracy_before=0.5, accuracy=2.0, loss=1.0, train_loss=1.0, averaged=0, staleness=0, seconds=1.0, test_samples=50)  # accuracy 2
    a.send(REPORT, epoch=1, accuracy_before=0.5, accuracy=0.6, loss=1.0, train_loss=1.0, averaged=0, staleness=0, seconds=1.0, test_samples=50)
    a.send(REPORT, epoch=1, accuracy_before=0.5, accuracy=0.6, loss=1.0, train_loss=1.0, averaged=0, staleness=0, seconds=1.0, test_samples=50)  # again
    a.endpoint.transport.publish(tracker_queue(session), b"\x00garbage")
    a.send(LEAVE)
    registered = peer("p2p-peer-1")
    registered.register()
    peer("p2p-peer-1").send(LEAVE)  # another incarnation of peer 1 than the one registered: refused
    deadline = time.monotonic() + 60  # a hang guard: the tracker takes them in order, the refused leave last
    while time.monotonic() < deadline and rejected(session, "evicted") < before["evicted"] + 2:
        time.sleep(0.05)
    assert rejected(session, "unsigned") == before["unsigned"] + 1
    assert rejected(session, "replay") == before["replay"] + 1
    assert rejected(session, "evicted") == before["evicted"] + 2
    assert rejected(session, "malformed") >= before["malformed"] + 1
    assert rejected(session, "duplicate") == before["duplicate"] + 1
    assert [record["accuracy"] for record in tracker.members["p2p-peer-0"].history] == [0.6]
    registered.send(LEAVE)  # the tracker ends: both peers registered, and both have left
    tracker_result(tracked)


def test_the_tracker_runs_without_torch():
    """Its image has no torch: register, leave, and a register whose fingerprint is not the run's
    refused, with torch made unimportable."""
    code = """
import sys, time, uuid; sys.modules['torch'] = None
from splitfed.learning.settings import HyperedgeSettings
from splitfed.roles.endpoint import Endpoint
from splitfed.roles.p2p import TrackerDeployment
from splitfed.roles.p2p.common import tracker_queue, peer_queue
from splitfed.roles.p2p.tracker import Tracker
from splitfed.transport import MemoryBroker, MemoryTransport
broker = MemoryBroker()
tracker = Tracker(HyperedgeSettings(), TrackerDeployment(session='s', expect_peers=1, timeout=10), MemoryTransport(broker))
peer = Endpoint(MemoryTransport(broker), session='s', role='p2p-peer', inbox=peer_queue('s', 'p2p-peer-0'), name='p2p-peer-0', ordered=False)
me = uuid.uuid4().hex
other = Endpoint(MemoryTransport(broker), session='s', role='p2p-peer', inbox=peer_queue('s', 'p2p-peer-1'), name='p2p-peer-1', ordered=False)
fingerprint = {'model': 'ab', 'tensors': 1, 'parameters': 1, 'classes': ['a', 'b']}
peer.send(tracker_queue('s'), 'register', incarnation=me, started=time.time(), samples=10, planned=1, nonce='n', fingerprint=fingerprint)
other.send(tracker_queue('s'), 'register', incarnation=uuid.uuid4().hex, started=time.time(), samples=10, planned=1, nonce='m',
           fingerprint={**fingerprint, 'classes': ['b', 'a']})
peer.send(tracker_queue('s'), 'leave', incarnation=me)
result = tracker.run()
print(result['peers']['p2p-peer-0']['state'], result['refused'], other.receive(('refused',), None, wait=30)[0].meta['ref'])
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "left ['p2p-peer-1'] m"


# -- whole runs -----------------------------------------------------------------------------


def test_p2p_peers_record_accuracy_before_and_after_averaging():
    result = launch.run(P2P, P2PSettings(**DIGITS, peers=3, epochs=3), PeerRun())
    assert set(result["peers"]) == {f"{P2P_PEER}-{index}" for index in range(3)}
    for peer in result["peers"].values():
        assert peer["state"] == "left" and [record["epoch"] for record in peer["history"]] == [1, 2, 3]
        assert all(0 <= record["averaged"] <= 2 and record["accuracy_before"] is not None for record in peer["history"])
    assert sum(record["averaged"] for peer in result["peers"].values() for record in peer["history"]) > 0
    assert result["accuracy"] > 0.5 and result["spread"] is not None


def test_smpl_members_of_a_hyperedge_end_at_the_same_model():
    """Two peers, hyperedges of two, sparsity 0, no training while a hyperedge exchanges: after
    each synchronisation both hold exactly the mean of their trained models, so each hyperedge's
    two records score the same (float32 sums in another order: the loss to 1e-5)."""
    settings = SMPLSettings(**DIGITS, peers=2, hyperedge_size=2, hyperepochs=3, async_local=False)
    result = launch.run(SMPL, settings, PeerRun())
    records = [record for peer in result["peers"].values() for record in peer["history"]]
    by_edge: dict[str, list[dict]] = {}
    for record in records:
        by_edge.setdefault(record["edge"], []).append(record)
    assert len(by_edge) == 3 and all(len(pair) == 2 for pair in by_edge.values())
    for pair in by_edge.values():
        assert pair[0]["loss"] == pytest.approx(pair[1]["loss"], abs=1e-5)
        assert pair[0]["averaged"] == pair[1]["averaged"] == 1
    assert any(pair[0]["accuracy_before"] != pair[1]["accuracy_before"] for pair in by_edge.values())  # they did differ before


def test_hostile_frames_in_a_peers_queue_are_refused_and_the_run_finishes(tmp_path):
    """While a signed run trains, peer 0's queue gets garbage, a model from a party the tracker
    does not list, and a forged membership list; and from a listed peer (p2p-peer-7: it registers
    like any peer) a model of the wrong shapes, one of NaN weights and a replay of an epoch already
    taken. Each is refused under its reason and counted; every peer still finishes every epoch."""
    names = [TRACKER, *(f"{P2P_PEER}-{index}" for index in range(3))]
    key_list = keys.generate(tmp_path / "keys", [*names, "p2p-peer-7", "p2p-peer-8"])
    session = "h-" + uuid.uuid4().hex[:8]
    broker = MemoryBroker()
    inbox = peer_queue(session, "p2p-peer-0")
    settings = P2PSettings(**DIGITS, model="tiny", peers=3, epochs=30)
    task = Task(settings)
    context = peer_context(settings, P2P_PEER, 0)
    listed = FakePeer(broker, session, "p2p-peer-7", tmp_path / "keys", fingerprint(task.model(context), task.classes(context)))  # as the run's peers
    unlisted = FakePeer(broker, session, "p2p-peer-8", tmp_path / "keys")
    impostor = Endpoint(MemoryTransport(broker), session=session, role=P2P_PEER, inbox=peer_queue(session, "x"), name=TRACKER, ordered=False)
    tiny = {"1.weight": np.zeros((10, 64), np.float32), "1.bias": np.zeros(10, np.float32)}  # the tiny model on digits: flatten, linear

    def model_from(peer: FakePeer, tensors: dict, sync: int) -> None:
        peer.endpoint.send(inbox, MODEL, tensors, incarnation=peer.incarnation, sync=sync)

    def attack() -> None:
        listed.register()
        # Peer 0 lists peer 7 once it sends peer 7 its model (it sends to every peer it lists).
        assert listed.endpoint.receive((MODEL,), ("p2p-peer-0",), wait=60) is not None
        broker.queue(inbox).put(b"SF1\x01garbage")
        model_from(unlisted, tiny, 1)  # signed, but never registered: not a live peer
        impostor.send(inbox, MEMBERS, version=10**6, started=time.time(), peers={})  # the tracker's name, no signature
        model_from(listed, {"1.weight": np.zeros((10, 63), np.float32), "1.bias": np.zeros(10, np.float32)}, 1)
        model_from(listed, {name: np.full_like(value, np.nan) for name, value in tiny.items()}, 1)
        model_from(listed, tiny, 1)  # a good one: taken
        model_from(listed, tiny, 1)  # the same synchronisation again
        listed.send(LEAVE)

    reasons = ("malformed", "evicted", "unsigned", "shape", "nonfinite", "duplicate")
    before = {reason: metrics.rejected_count(P2P_PEER, session, reason) for reason in reasons}
    attacker = threading.Thread(target=attack)
    attacker.start()
    run = PeerRun(session=session, key_list=key_list)
    result = launch.run(P2P, settings, run, connect_as=lambda party: MemoryTransport(broker))
    attacker.join()
    for name in names[1:]:
        assert result["peers"][name]["state"] == "left" and len(result["peers"][name]["history"]) == 30
    counted = {reason: metrics.rejected_count(P2P_PEER, session, reason) - before[reason] for reason in reasons}
    assert counted == {"malformed": 1, "evicted": 1, "unsigned": 1, "shape": 1, "nonfinite": 1, "duplicate": 1}


# -- each peer's own data, and one fingerprint per run --------------------------------------

MLP = """
from torch import nn

def model(context):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
"""


def own_data(tmp_path, role: str) -> dict:
    """A task with model() only, and a data folder of npz files for each of two peers."""
    task = tmp_path / "task.py"
    task.write_text(MLP)
    data = write_parties(tmp_path / "data", [f"{role}-{index}" for index in range(2)])
    return dict(task=str(task), dataset="npz", data_dir=data / "{party}", peers=2, batch_size=32)


def test_p2p_peers_train_and_score_on_their_own_data(tmp_path):
    result = launch.run(P2P, P2PSettings(**own_data(tmp_path, P2P_PEER), epochs=2), PeerRun())
    for name, peer in result["peers"].items():
        assert [record["test_samples"] for record in peer["history"]] == [30, 30]  # its own test data
        assert peer["accuracy"] == peer["history"][-1]["accuracy"] and peer["test_samples"] == 30 and peer["samples"] == 90
    assert result["accuracy"] == sum(peer["accuracy"] for peer in result["peers"].values()) / 2
    assert result["fingerprint"]["classes"] == [str(label) for label in range(10)] and result["refused"] == []


@pytest.mark.parametrize("role, settings_class, peer_class", [(P2P_PEER, P2PSettings, P2PPeer), (SMPL_PEER, SMPLSettings, SMPLPeer)])
def test_a_peer_whose_classes_are_not_the_runs_is_refused_and_stops(tmp_path, role, settings_class, peer_class):
    """The first register fixes the run's fingerprint; a peer given the classes in another order
    is refused at the tracker (counted, and left off the list) and stops with how they differ."""
    settings = settings_class(**own_data(tmp_path, role))
    task = Task(settings)
    first = peer_context(settings, role, 0)
    session = "f-" + uuid.uuid4().hex[:8]
    broker = MemoryBroker()
    tracker = Tracker(HyperedgeSettings(), TrackerDeployment(session=session, expect_peers=1, timeout=20), MemoryTransport(broker))
    thread = launch.RoleThread("tracker", tracker.run)
    thread.start()
    accepted = FakePeer(broker, session, "p2p-peer-0", fingerprint=fingerprint(task.model(first), task.classes(first)))
    accepted.register()
    assert accepted.members() is not None
    other_order = dataclasses.replace(settings, classes="9,8,7,6,5,4,3,2,1,0")
    refused = peer_class(other_order, PeerDeployment(session=session, peer_index=1, timeout=10), MemoryTransport(broker))
    with pytest.raises(Refused) as stopped:
        refused.run()
    name = f"{role}-1"
    assert str(stopped.value) == (f"the p2p-tracker refused {name}: its model and classes are not the run's: classes [9, 8, 7, 6, 5, 4, 3, 2, 1, 0] "
                                  f"against [0, 1, 2, 3, 4, 5, 6, 7, 8, 9] ({name}'s against the run's)")
    assert metrics.rejected_count(TRACKER, session, "fingerprint") == 1 and name not in tracker.members
    accepted.send(LEAVE)
    thread.join(20)
    assert tracker.result()["refused"] == [name]


def test_tracker_refuses_a_register_claiming_more_samples_than_its_key_allows(tmp_path):
    """Peers weight each other's models by the samples the tracker lists: a claim above the key
    list's max_samples is refused as `samples` and the claimant is not listed."""
    session = "t-" + uuid.uuid4().hex[:8]
    key_list = keys.generate(tmp_path / "keys", [TRACKER, "p2p-peer-0", "p2p-peer-1"], max_samples=50)
    broker = MemoryBroker()
    deployment = TrackerDeployment(session=session, key_list=key_list, private_key=tmp_path / "keys" / f"{TRACKER}.key", expect_peers=1, timeout=20)
    tracker = Tracker(HyperedgeSettings(), deployment, MemoryTransport(broker), Identity.load(TRACKER, key_list, deployment.private_key))
    thread = launch.RoleThread("tracker", tracker.run)
    thread.start()
    greedy, honest = (FakePeer(broker, session, name, tmp_path / "keys") for name in ("p2p-peer-0", "p2p-peer-1"))
    before = rejected(session, "samples")
    greedy.register()  # claims 100
    nonce = uuid.uuid4().hex
    honest.send(REGISTER, started=time.time(), samples=50, planned=1, nonce=nonce, fingerprint=FINGERPRINT)
    answer = honest.members()  # the tracker reads its inbox in order: the greedy register was handled first
    assert answer.meta["ref"] == nonce and set(answer.meta["peers"]) == {"p2p-peer-1"}
    assert answer.meta["peers"]["p2p-peer-1"]["samples"] == 50
    assert rejected(session, "samples") == before + 1
    honest.send(LEAVE)
    thread.join(30)
    assert tracker.finished and "p2p-peer-0" not in tracker.members
