"""Every role under attack over the real RabbitMQ, in real signed runs of each family (every
party in this process, each on its own connection). Before the first numbered message any party
sends to an inbox, the attacker, who has guest access to the broker, a key of its own and one
key it stole from that message's sender, puts into the same inbox:

  malformed   bytes that are no frame
  unsigned    the message with its signature stripped
  forged      the message signed by the attacker's own key ("signature")
  other run   (before a sender's second numbered message to the inbox that names a run: the
              first may be what tells the receiver the run) the message re-bound to another
              run with the stolen key ("replay")
  non-finite  the message with a NaN in its first float tensor, or an infinity in its metadata,
              signed with the stolen key
  wrong shape the message with its first float tensor a column short, signed with the stolen key
  flood       first chunks of messages never finished: garbage, forged headers, and messages
              announcing more chunks than the inbox's limit allows
and after the genuine message, the same frame again ("duplicate", a replay inside the run). The
first handshake (unnumbered: a hello, a join, a register) sent to each inbox is replayed too: the
split-server and the fedavg-server know its nonce, the split-fed its server's start time, the
tracker its peer's incarnation ("replay"); a split-client refuses an answer to a hello it did not
just send ("kind").

Each role refuses what reaches it, counts each refusal under its reason, and the run ends as a
clean one would: every epoch, round or hyperedge trained, accuracy above chance. Messages of a
role's own limit and one chunk over it are tests/integration/test_role_message_limits.py's."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import struct
import threading
import uuid
from pathlib import Path

import numpy as np
import pika
import pytest
from prometheus_client import REGISTRY

from splitfed.learning.settings import FederatedSettings, P2PSettings, SMPLSettings, SplitNNSettings, SplitSettings
from splitfed.observability.metrics import rejected_count
from splitfed.protocol import Message, decode, encode, encode_body, signed_bytes
from splitfed.protocol.codec import MAGIC
from splitfed.roles.p2p.common import DELTA, HYPEREDGE, P2P_PEER, SMPL_PEER, START, TRACKER, peer_role
from splitfed.roles.fedavg import worker_ids
from splitfed.scenarios import fedavg, p2p, split, splitnn
from splitfed.scenarios.launch import Launch, run_threads
from splitfed.security import keys
from splitfed.transport.chunks import CHUNK_COUNT, CHUNK_ID, CHUNK_INDEX
from splitfed.transport.rabbitmq import RabbitTransport
from tests.integration.test_role_message_limits import run_settings

FLOOD = 8  # first chunks of each sort


def inbox_role(session: str, queue: str) -> str:
    """The role whose inbox `queue` is: splitfed.SESSION.ROLE[.ID], a peer's ROLE-N."""
    name = queue.removeprefix(f"splitfed.{session}.").split(".")[0]
    return peer_role(name) or name


def float_tensor(message: Message) -> str | None:
    return next((name for name, array in message.tensors.items() if array.dtype == np.float32 and array.size > 1), None)


class Attacker:
    """Shared by every party of one run: in each inbox, the first numbered message, the first
    that carries a float tensor and the first that names a run (not its sender's first) are
    attacked, each once."""

    def __init__(self, broker_url: str, session: str, key_dir: Path):
        self.broker_url, self.session, self.key_dir = broker_url, session, key_dir
        self.stolen: dict[str, keys.Signer] = {}
        self.attacked: dict[str, set[str]] = {}  # inbox -> what was done to it: "any", "run", "tensors"
        self.numbered: dict[tuple[str, str], int] = {}  # (inbox, sender) -> numbered messages sent
        self.lock = threading.Lock()
        self.connection = pika.BlockingConnection(pika.URLParameters(broker_url))
        self.channel = self.connection.channel()
        # Confirmed: each publish returns once the broker has queued it, so what the attacker sends
        # before a party's frame (on another connection) is in the inbox before it.
        self.channel.confirm_delivery()

    def close(self) -> None:
        self.connection.close()

    def connect(self, party: str) -> RabbitTransport:
        return Attacked(self, party)

    def roles_attacked(self) -> dict[str, set[str]]:
        roles: dict[str, set[str]] = {}
        for queue, done in self.attacked.items():
            roles.setdefault(inbox_role(self.session, queue), set()).update(done)
        return roles

    def signer_of(self, sender: str) -> keys.Signer:
        if sender not in self.stolen:
            self.stolen[sender] = keys.load_private(self.key_dir / f"{sender}.key", sender)
        return self.stolen[sender]

    def before(self, queue: str, frame: bytes) -> bool:
        """Attack `queue` ahead of `frame`, if it is the one to attack; whether it was (then the
        genuine frame is sent again after itself)."""
        message = decode(frame)
        if message.seq == 0:  # a handshake (unnumbered): the first to each inbox is replayed
            with self.lock:
                done = self.attacked.setdefault(queue, set())
                first = "handshake" not in done
                done.add("handshake")
            return first
        tensor = float_tensor(message)
        with self.lock:
            done = self.attacked.setdefault(queue, set())
            sent = self.numbered[queue, message.sender] = self.numbered.get((queue, message.sender), 0) + 1
            first, with_tensor = "any" not in done, tensor is not None and "tensors" not in done
            other_run = sent >= 2 and "run" in message.meta and "run" not in done
            done.update({"any"} | ({"tensors"} if tensor else set()) | ({"run"} if other_run else set()))
        if other_run:
            self.publish(queue, self.signed(dataclasses.replace(message, meta={**message.meta, "run": uuid.uuid4().hex})))
        if first:
            self.publish(queue, b"\x00" * 64)  # malformed
            self.publish(queue, encode(dataclasses.replace(message, sig=None, digest=None)))  # unsigned
            self.publish(queue, self.signed(message, keys.Signer(message.sender, keys.Ed25519PrivateKey.generate())))  # forged
            self.publish(queue, self.infinite_meta(message))
            self.flood(queue, message)
        if with_tensor:
            nan = {name: array.copy() for name, array in message.tensors.items()}
            nan[tensor].flat[0] = np.nan
            self.publish(queue, self.signed(dataclasses.replace(message, tensors=nan)))
            self.publish(queue, self.signed(dataclasses.replace(message, tensors={**message.tensors, tensor: narrower(message.tensors[tensor])})))
        return first

    def after(self, queue: str, frame: bytes) -> None:
        """Called once `frame` is in `queue`."""

    def signed(self, message: Message, signer: keys.Signer | None = None) -> bytes:
        """`message` signed by `signer` (the stolen key of its sender by default)."""
        body = encode_body(message.tensors)
        message = dataclasses.replace(message, sig=None, digest=None)
        message.sig = (signer or self.signer_of(message.sender)).sign(signed_bytes(message, body))
        return encode(message, body)

    def infinite_meta(self, message: Message) -> bytes:
        """The message with an infinity in its metadata, which JSON can only carry as a number too
        large for a float (1e999): encode() itself would refuse to write it."""
        header = {**message.header(), "meta": {**message.meta, "loss": "INFINITY"}}
        raw = json.dumps(header, sort_keys=True, separators=(",", ":")).replace('"INFINITY"', "1e999").encode()
        return MAGIC + struct.pack(">I", len(raw)) + raw + encode_body(message.tensors)

    def flood(self, queue: str, message: Message) -> None:
        forged_header = self.signed(message, keys.Signer(message.sender, keys.Ed25519PrivateKey.generate()))
        for index in range(FLOOD):
            for sort, (body, count) in {"garbage": (b"\x00" * 1024, 1), "forged": (forged_header, 1), "huge": (forged_header, 10**6)}.items():
                headers = {CHUNK_ID: f"flood-{sort}-{index}", CHUNK_INDEX: 0, CHUNK_COUNT: count}
                self.publish(queue, body, headers)

    def publish(self, queue: str, body: bytes, headers: dict | None = None) -> None:
        with self.lock:
            self.channel.basic_publish("", queue, body, pika.BasicProperties(headers=headers))


def narrower(array: np.ndarray) -> np.ndarray:
    return array[..., :-1] if array.shape[-1] > 1 else array.reshape(-1)[:-1]


class Attacked(RabbitTransport):
    """A party's real connection; the attacker sees what it sends."""

    def __init__(self, attacker: Attacker, party: str):
        super().__init__(attacker.broker_url, name=f"{party}-{attacker.session}")
        self.attacker = attacker

    def publish(self, queue, body, *, persistent=False, must_exist=False):
        again = self.attacker.before(queue, body)
        super().publish(queue, body, persistent=persistent, must_exist=must_exist)
        if again:
            super().publish(queue, body)
        self.attacker.after(queue, body)


@pytest.fixture
def attack(broker_url, session, tmp_path):
    made = []

    def run(launches: list[Launch], key_dir: Path, kind: type[Attacker] = Attacker, **extra) -> tuple[dict, Attacker]:
        attacker = kind(broker_url, session, key_dir, **extra)
        made.append(attacker)
        return run_threads(launches, attacker.connect, None, 120), attacker

    yield run
    for attacker in made:
        attacker.close()


# What every role refuses of what reaches it, at least this many times (a clean run refuses
# nothing): its inboxes are flooded (each first chunk refused as it comes, none kept), and the
# first message to each is sent unsigned, forged and with an infinity in its metadata. Then what
# only some do, below: the relay keeps no sequence, follows no run and holds no model (a wrong
# shape passes it, for the half it forwards to refuse); a fedavg-worker takes a model it has
# already answered and does nothing with it; the p2p roles follow no run.
EVERY = {"malformed": FLOOD + 1, "signature": FLOOD + 1, "oversized": FLOOD, "unsigned": 1, "nonfinite": 1}


def refusals(role: str, session: str) -> dict[str, int]:
    """Every reason `role` refused something for in `session`, with its count."""
    return {sample.labels["reason"]: int(sample.value) for metric in REGISTRY.collect() if metric.name == "splitfed_messages_rejected"
            for sample in metric.samples if sample.name.endswith("_total") and sample.labels.get("role") == role and sample.labels.get("session") == session}


def assert_refused(session: str, attacker: Attacker, expected: dict[str, dict[str, int]]) -> None:
    """Each role refused each reason at least as often as `expected` says (besides EVERY, and a
    wrong shape wherever a role holding a model was sent a float tensor), and kept no partial."""
    attacked = attacker.roles_attacked()
    assert set(attacked) == set(expected), attacked
    for role, reasons in expected.items():
        wanted = {**EVERY, **reasons, **({"shape": 1} if "tensors" in attacked[role] and role != "relay" else {})}
        counts = refusals(role, session)
        print(role, counts)
        short = {reason: counts.get(reason, 0) for reason, least in wanted.items() if counts.get(reason, 0) < least}
        assert not short, f"{role} refused fewer than {wanted}: {short}"
        assert counts.get("partials", 0) == 0 and counts.get("expired", 0) == 0, role


SPLIT = dict(dataset="digits", batch_size=32, test_limit=128)


def test_a_split_run_through_the_relay(attack, broker_url, session, tmp_path):
    key_list = keys.generate(tmp_path / "keys", ["split-client", "split-server"])
    settings = SplitSettings(**SPLIT, epochs=2)
    result, attacker = attack(split.plan(settings, run_settings(split.SplitRun, broker_url, session, key_list=key_list, via="relay"), tmp_path), key_list.parent)
    assert len(result["history"]) == 2 and result["accuracy"] > 0.5
    assert_refused(session, attacker, {
        "split-server": {"replay": 2, "duplicate": 1},  # a message of another run, a client's hello again
        "split-client": {"replay": 1, "duplicate": 1, "kind": 1},  # a message of another run; the server's answer to its hello again
        "relay": {},
    })


def test_a_splitfed_run_and_its_fed(attack, broker_url, session, tmp_path):
    key_list = keys.generate(tmp_path / "keys", ["split-server", "split-client-0", "split-client-1", "split-fed"])
    settings = SplitNNSettings(**SPLIT, epochs=2, clients=2, schedule="splitfed-v2")
    result, attacker = attack(splitnn.plan(settings, run_settings(splitnn.SplitNNRun, broker_url, session, key_list=key_list), tmp_path), key_list.parent)
    assert [epoch["missing"] for epoch in result["history"]] == [[], []] and result["history"][-1]["accuracy"] > 0.5
    assert_refused(session, attacker, {
        "split-server": {"replay": 2, "duplicate": 1},
        "split-client": {"replay": 1, "duplicate": 1, "kind": 1},
        "split-fed": {"replay": 2, "duplicate": 1},  # a message of another run, the server's hello again
    })


@pytest.mark.parametrize("secure_aggregation", ["none", "secagg+"])
def test_a_fedavg_run(attack, broker_url, session, tmp_path, secure_aggregation):
    """With secagg+ the server's first numbered message is a worker's keys (its inbox never sees a
    float tensor), and the workers' the attempt's forwarded keys."""
    workers = worker_ids(2 if secure_aggregation == "none" else 3)
    key_list = keys.generate(tmp_path / "keys", ["fedavg-server", *workers])
    settings = FederatedSettings(dataset="digits", workers=len(workers), partition="iid", rounds=2, test_limit=128, secure_aggregation=secure_aggregation)
    run = run_settings(fedavg.FedAvgRun, broker_url, session, key_list=key_list, checkpoint_dir=tmp_path / "checkpoints")
    result, attacker = attack(fedavg.plan(settings, run, tmp_path), key_list.parent)
    assert result["contributors"] == {"1": workers, "2": workers} and result["accuracy"] > 0.5
    # The server's inbox is attacked at a join, whose copy it counts as a replay (its nonce was seen).
    assert_refused(session, attacker, {"fedavg-server": {"replay": 2}, "fedavg-worker": {"replay": 1}})


PEERS = dict(dataset="digits", partition="iid", test_limit=128, batch_size=16, lr=3e-3)


@pytest.mark.parametrize("role, settings", [
    (P2P_PEER, P2PSettings(**PEERS, peers=2, epochs=2, sync_wait=30.0)),
    (SMPL_PEER, SMPLSettings(**PEERS, peers=3, hyperedge_size=3, hyperepochs=2, sparsity=0.5)),
], ids=[P2P_PEER, SMPL_PEER])
def test_a_decentralized_run_and_its_tracker(attack, broker_url, session, tmp_path, role, settings):
    key_list = keys.generate(tmp_path / "keys", [TRACKER, *(f"{role}-{index}" for index in range(settings.peers))])
    result, attacker = attack(p2p.planner(role)(settings, run_settings(p2p.PeerRun, broker_url, session, key_list=key_list), tmp_path), key_list.parent)
    assert all(len(peer["history"]) == 2 for peer in result["peers"].values()), result
    assert result["accuracy"] > 0.5
    assert_refused(session, attacker, {TRACKER: {"replay": 1}, role: {"duplicate": 1}})  # the tracker: a register again


class SMPLAttacker(Attacker):
    """Also SMPL's own: before the first start model each peer is sent, one from a member that is
    not the hyperedge's source (signed with that member's stolen key), and the same right after
    the tracker tells a peer of a later hyperedge it is not the source of (so it comes before
    the source's or after it, while the peer knows the hyperedge); before the first change,
    one whose indices run past the tensor; and before a sender's change for a later hyperedge,
    its change for the first again (recorded: a replay of a hyperedge that has ended there, or
    that it has already heard from the sender)."""

    def __init__(self, *args, peers: list[str]):
        super().__init__(*args)
        self.peers = peers
        self.recorded: dict[tuple[str, str], tuple[str, bytes]] = {}  # (inbox, sender) -> (hyperedge, its first change)
        self.smpl_attacked: dict[str, set[str]] = {}
        self.incarnations: dict[str, str] = {}  # peer -> the incarnation its messages name (a peer's sent with its every message)
        self.start_model: Message | None = None  # the first start model any peer sent
        self.impostors: list[tuple[str, str]] = []  # (hyperedge, the member its start model claimed to come from)

    def before(self, queue: str, frame: bytes) -> bool:
        message = decode(frame)
        if "incarnation" in message.meta:
            self.incarnations[message.sender] = message.meta["incarnation"]
        done = self.smpl_attacked.setdefault(queue, set())
        if message.kind == START and START not in done:
            done.add(START)
            receiver = queue.removeprefix(f"splitfed.{self.session}.")
            impostor = next(peer for peer in self.peers if peer not in (message.sender, receiver))
            self.start_model = self.start_model or message
            self.impostor_start(queue, message.meta["edge"], source=message.sender)
        if message.kind == DELTA:
            edge, recorded = self.recorded.setdefault((queue, message.sender), (message.meta["edge"], frame))
            if edge != message.meta["edge"] and "replay" not in done:
                done.add("replay")
                self.publish(queue, recorded)
            indices = next((name for name in message.tensors if name.endswith("/indices")), None)
            if indices is not None and "indices" not in done:
                done.add("indices")
                past = message.tensors[indices].copy()
                past[-1] = 10**9
                self.publish(queue, self.signed(dataclasses.replace(message, tensors={**message.tensors, indices: past})))
        return super().before(queue, frame)

    def after(self, queue: str, frame: bytes) -> None:
        message = decode(frame)
        if message.kind == HYPEREDGE and self.start_model is not None and message.meta["source"] != queue.removeprefix(f"splitfed.{self.session}."):
            self.impostor_start(queue, message.meta["edge"], source=message.meta["source"])

    def impostor_start(self, queue: str, edge: str, source: str) -> None:
        """A start model for `edge` from a member that is not its source (every peer is in every
        hyperedge here), signed with that member's stolen key."""
        receiver = queue.removeprefix(f"splitfed.{self.session}.")
        impostor = next(peer for peer in self.peers if peer not in (source, receiver))
        meta = {**self.start_model.meta, "edge": edge, "incarnation": self.incarnations[impostor]}
        self.publish(queue, self.signed(dataclasses.replace(self.start_model, sender=impostor, meta=meta)))
        self.impostors.append((edge, impostor))


def test_smpl_frames_of_its_own(attack, broker_url, session, tmp_path, caplog):
    """A start from a member that is not the source is refused (`sender`), a change with indices
    out of range (`shape`), a change replayed (`stale` once its hyperedge has ended at the
    receiver, `duplicate` while it is open), at every peer, and the run ends as a clean one."""
    caplog.set_level(logging.WARNING, logger="splitfed.roles.endpoint")
    settings = SMPLSettings(**PEERS, peers=3, hyperedge_size=3, hyperepochs=2, sparsity=0.5, start="source")
    peers = [f"{SMPL_PEER}-{index}" for index in range(settings.peers)]
    key_list = keys.generate(tmp_path / "keys", [TRACKER, *peers])
    plan = p2p.planner(SMPL_PEER)(settings, run_settings(p2p.PeerRun, broker_url, session, key_list=key_list), tmp_path)
    result, attacker = attack(plan, key_list.parent, SMPLAttacker, peers=peers)
    assert all(len(peer["history"]) == 2 for peer in result["peers"].values()) and result["accuracy"] > 0.5
    attacked = attacker.smpl_attacked
    assert len(attacker.impostors) >= 3 and sum("indices" in done for done in attacked.values()) == 3 and sum("replay" in done for done in attacked.values()) == 3, attacked
    refused_starts = [re.search(r"hyperedge (\S+) from (\S+),", record.getMessage()).groups() for record in caplog.records
                      if record.getMessage().startswith(f"{SMPL_PEER} rejected a message (sender)")]
    assert sorted(refused_starts) == sorted(attacker.impostors)  # every impostor's, and no source's
    assert rejected_count(SMPL_PEER, session, "sender") == len(attacker.impostors)
    assert rejected_count(SMPL_PEER, session, "shape") >= 3
    # each peer's inbox: the copy sent right after the first numbered message, and the late replay
    assert rejected_count(SMPL_PEER, session, "stale") + rejected_count(SMPL_PEER, session, "duplicate") >= 3 + 3
