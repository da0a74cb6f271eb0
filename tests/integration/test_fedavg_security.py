"""FedAvg over the real broker under attack: refused identities, replays, malformed and
poisoned updates. Attackers are test doubles that speak the real protocol over the real broker."""

import logging
import threading

import numpy as np
import pytest
from prometheus_client import REGISTRY
from safetensors.torch import load_file

from splitfed.learning import federated
from splitfed.observability.metrics import rejected_count
from splitfed.protocol import Message, decode, encode, encode_body, signed_bytes
from splitfed.learning.settings import FederatedSettings
from splitfed.roles.declaration import Identity
from splitfed.roles.fedavg import SERVER, ServerDeployment, WorkerDeployment, worker_ids
from splitfed.roles.fedavg.server import FedAvgServer
from splitfed.roles.fedavg.worker import FedAvgWorker, Refused
from splitfed.scenarios import fedavg, launch
from splitfed.scenarios.fedavg import FedAvgRun
from splitfed.security import keys
from splitfed.transport.rabbitmq import RabbitTransport


@pytest.fixture
def key_dir(tmp_path):
    keys.generate(tmp_path / "keys", ["fedavg-server"] + [f"worker-{i}" for i in range(5)])
    return tmp_path / "keys"


def signed(message: Message, signer) -> bytes:
    body = encode_body(message.tensors)
    message.sig = signer.sign(signed_bytes(message, body)) if signer else None
    return encode(message, body)


def test_only_listed_correctly_signed_workers_get_in(broker_url, session, key_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    settings = FederatedSettings(dataset="digits", rounds=1, workers=2, partition="iid")
    key_list = keys.KeyList.load(key_dir / "key-list.json")
    connect = lambda name: RabbitTransport(broker_url, name=f"{name}-{session}", connect_timeout=10)  # noqa: E731
    server_transport = connect("server")
    server = FedAvgServer(
        settings, ServerDeployment(session=session, timeout=60), server_transport,
        Identity(keys.load_private(key_dir / "fedavg-server.key", SERVER), key_list),
    )
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(result=server.run()), daemon=True)
    thread.start()

    stranger = keys.generate(tmp_path / "stranger", ["worker-1", "intruder:fedavg-worker"]).parent
    impostors = {
        "unsigned": dict(worker="worker-1", signer=None),
        "signature": dict(worker="worker-1", signer=keys.load_private(stranger / "worker-1.key", "worker-1")),
        "unknown-key": dict(worker="intruder", signer=keys.load_private(stranger / "intruder.key", "intruder")),
    }
    for reason, who in impostors.items():
        transport = connect(f"impostor-{reason}")
        worker = FedAvgWorker(settings, WorkerDeployment(session=session, timeout=60, worker_id=who["worker"], index=1), transport, Identity(who["signer"], key_list))
        with pytest.raises(Refused, match=reason):
            worker.run()
        transport.close()
        assert rejected_count(SERVER, session, reason) == 1, reason
    assert sum("refused worker" in r.getMessage() for r in caplog.records) == 3

    honest = []
    for index in range(2):
        transport = connect(f"worker-{index}")
        identity = Identity(keys.load_private(key_dir / f"worker-{index}.key", f"worker-{index}"), key_list)
        role = FedAvgWorker(settings, WorkerDeployment(session=session, timeout=60, worker_id=f"worker-{index}", index=index), transport, identity)
        honest.append((transport, threading.Thread(target=role.run, daemon=True)))
        honest[-1][1].start()
    thread.join(120)
    for transport, worker_thread in honest:
        worker_thread.join(60)
        transport.close()
    server_transport.close()
    assert outcome["result"]["history"][0]["workers"] == ["worker-0", "worker-1"]


class Meddler(RabbitTransport):
    """A worker's real connection, and the worker's key in an attacker's hands: before its real
    update it sends broken copies (most properly signed); after it a duplicate, a copy signed
    for a round long closed (stale) and, in later rounds, a replay of the first round's update."""

    signer = None
    first_update: bytes | None = None

    def publish(self, queue, body, *, persistent=False, must_exist=False):
        message = decode(body)
        if message.kind != "update":
            return super().publish(queue, body, persistent=persistent, must_exist=must_exist)
        for bad in self.broken_copies(message):
            super().publish(queue, bad)
        super().publish(queue, body, persistent=persistent, must_exist=must_exist)
        super().publish(queue, body)  # duplicate
        message.round = 0
        super().publish(queue, signed(message, self.signer))  # stale
        if self.first_update is None:
            self.first_update = body
        else:
            super().publish(queue, self.first_update)  # stale replay

    def broken_copies(self, message: Message) -> list[bytes]:
        name = next(iter(message.tensors))
        tensors = message.tensors

        def variant(**changes):
            meta = changes.pop("meta", message.meta)
            return Message(message.kind, message.session, message.sender, message.seq, message.round, meta, {**tensors, **changes})

        nan = tensors[name].copy()
        nan.flat[0] = np.nan
        huge = np.zeros(3 * sum(t.size for t in tensors.values()), np.float32)
        return [
            b"garbage", signed(variant(), self.signer)[:-9],  # truncated
            signed(variant(**{name: tensors[name][:1]}), self.signer),  # wrong shape
            signed(variant(**{name: tensors[name].astype(np.float64)}), self.signer),  # wrong dtype
            signed(variant(**{name: nan}), self.signer),  # NaN
            signed(variant(padding=huge), self.signer),  # oversized
            signed(variant(meta={**message.meta, "samples": -5}), self.signer),  # nonsense weight
            signed(variant(meta={**message.meta, "samples": 10**13}), self.signer),  # a weight meant to dominate
            signed(variant(meta={**message.meta, "train_loss": 10**400}), self.signer),  # no float holds it
            signed(variant(**{name: tensors[name] * 100}), None),  # unsigned
            signed(variant(**{name: tensors[name] * 100}), keys.Signer(message.sender, keys.Ed25519PrivateKey.generate())),  # forged
        ]


def test_bad_duplicate_and_replayed_updates_are_dropped_and_counted(broker_url, session, key_dir, tmp_path):
    settings = FederatedSettings(dataset="digits", rounds=3, partition="iid")
    reference, _ = federated.reference_run(settings)

    def connect(role):
        if role != "worker-0":
            return RabbitTransport(broker_url, name=f"{role}-{session}")
        meddler = Meddler(broker_url, name=f"meddler-{session}")
        meddler.signer = keys.load_private(key_dir / "worker-0.key", "worker-0")
        return meddler

    run = FedAvgRun(broker=broker_url, launch="threads", session=session, timeout=120, key_list=key_dir / "key-list.json", checkpoint_dir=tmp_path / "ckpt")
    result = launch.run(fedavg.SCENARIO, settings, run, connect_as=connect)
    saved = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    assert max((reference.state_dict()[k] - saved[k]).abs().max().item() for k in saved) <= 1e-5
    assert all(r["workers"] == ["worker-0", "worker-1", "worker-2"] for r in result["history"])
    for reason in ("malformed", "shape", "dtype", "nonfinite", "oversized", "value", "unsigned", "signature", "duplicate", "stale"):
        assert rejected_count(SERVER, session, reason) >= 1, f"no {reason} rejection counted"
    labels = {"role": SERVER, "session": session}
    assert REGISTRY.get_sample_value("splitfed_updates_total", {**labels, "outcome": "accepted"}) == 9
    assert REGISTRY.get_sample_value("splitfed_updates_total", {**labels, "outcome": "received"}) > 9 + 3 * 9


class Poisoner(RabbitTransport):
    """A listed worker gone bad: each update is replaced by large-norm noise, properly signed."""

    signer = None

    def publish(self, queue, body, *, persistent=False, must_exist=False):
        message = decode(body)
        if message.kind == "update":
            rng = np.random.default_rng(message.round)
            message.tensors = {k: (v + rng.normal(0, 100, v.shape)).astype(np.float32) for k, v in message.tensors.items()}
            body = signed(message, self.signer)
        super().publish(queue, body, persistent=persistent, must_exist=must_exist)


def poisoned_run(broker_url, session, key_dir, strategy, poison: bool) -> float:
    settings = FederatedSettings(dataset="digits", rounds=4, local_epochs=3, workers=5, partition="iid", strategy=strategy)
    run = FedAvgRun(broker=broker_url, launch="threads", session=f"{session}-{strategy}-{poison}", timeout=120, key_list=key_dir / "key-list.json")

    def connect(role):
        if poison and role == "worker-4":
            transport = Poisoner(broker_url, name=f"poisoner-{run.session}")
            transport.signer = keys.load_private(key_dir / "worker-4.key", "worker-4")
            return transport
        return RabbitTransport(broker_url, name=f"{role}-{run.session}")

    return launch.run(fedavg.SCENARIO, settings, run, connect_as=connect)["accuracy"]


def test_median_and_krum_hold_against_a_poisoning_worker(broker_url, session, key_dir):
    clean = poisoned_run(broker_url, session, key_dir, "fedavg", poison=False)
    assert clean > 0.7
    assert poisoned_run(broker_url, session, key_dir, "fedavg", poison=True) < 0.5 * clean  # the attack is real
    for strategy in ("median", "krum"):
        assert poisoned_run(broker_url, session, key_dir, strategy, poison=True) >= 0.9 * clean, strategy


class Tamperer(RabbitTransport):
    """Someone on the path between a listed worker and the server: each genuine, signed update is
    copied and the copy changed after signing, keeping the worker's real signature: its tensors
    scaled (body), and from round 2 on last round's update relabelled as this round's (round).
    Both copies are valid in every other way and reach the server before the genuine update, so
    a signature that left the body or the round uncovered would let them in."""

    previous: bytes | None = None
    tampered = 0

    def publish(self, queue, body, *, persistent=False, must_exist=False):
        message = decode(body)
        if message.kind == "update":
            assert message.sig, "the worker's update should be signed"
            changed = decode(body)
            changed.tensors = {name: (array * 1.5).astype(np.float32) for name, array in changed.tensors.items()}
            super().publish(queue, encode(changed))  # encode keeps changed.sig, the genuine signature
            self.tampered += 1
            if self.previous is not None:
                replay = decode(self.previous)
                replay.round = message.round
                super().publish(queue, encode(replay))
                self.tampered += 1
            self.previous = body
        super().publish(queue, body, persistent=persistent, must_exist=must_exist)


def test_signed_updates_changed_after_signing_are_refused(broker_url, session, key_dir, tmp_path):
    settings = FederatedSettings(dataset="digits", rounds=2, partition="iid")
    tamperer = None

    def connect(role):
        nonlocal tamperer
        if role == "worker-0":
            tamperer = Tamperer(broker_url, name=f"tamperer-{session}")
            return tamperer
        return RabbitTransport(broker_url, name=f"{role}-{session}")

    run = FedAvgRun(broker=broker_url, launch="threads", session=session, timeout=60, key_list=key_dir / "key-list.json", checkpoint_dir=tmp_path / "ckpt")
    result = launch.run(fedavg.SCENARIO, settings, run, connect_as=connect)
    assert tamperer.tampered == 3  # two with a changed body, one with a changed round
    assert rejected_count(SERVER, session, "signature") == tamperer.tampered
    assert result["contributors"] == {"1": worker_ids(3), "2": worker_ids(3)}
    labels = {"role": SERVER, "session": session}
    assert REGISTRY.get_sample_value("splitfed_updates_total", {**labels, "outcome": "accepted"}) == 6
    reference, _ = federated.reference_run(settings)
    saved = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    assert max((reference.state_dict()[k] - saved[k]).abs().max().item() for k in saved) <= 1e-5
