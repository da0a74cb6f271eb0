"""Joins as an attacker with access to the broker would send them: refused joins make the server
create nothing and send at most one refusal each; a replayed join is refused without a word; in
unsafe mode no more workers get in than the run was set up for."""

import functools
import subprocess
import time
import uuid

import pika

from prometheus_client import REGISTRY
from safetensors.torch import load_file

from splitfed.learning import federated
from splitfed.learning.settings import FederatedSettings, PartitionSettings
from splitfed.learning.tasks import Task, fingerprint
from splitfed.observability.metrics import rejected_count
from splitfed.protocol import Message, decode, encode, encode_body, signed_bytes
from splitfed.roles.fedavg import SERVER
from splitfed.roles.fedavg.common import server_queue, worker_queue
from splitfed.scenarios import fedavg, launch
from splitfed.scenarios.fedavg import FedAvgRun
from splitfed.security import keys
from splitfed.transport.rabbitmq import RabbitTransport


def queue_names() -> set[str]:
    listing = subprocess.run(["rabbitmqctl", "list_queues", "--quiet", "--no-table-headers", "name"], capture_output=True, text=True, check=True, timeout=60)
    return {line.strip() for line in listing.stdout.splitlines()}


def message_count(broker_url: str, queue: str) -> int:
    connection = pika.BlockingConnection(pika.URLParameters(broker_url))
    try:
        return connection.channel().queue_declare(queue, passive=True).method.message_count
    except pika.exceptions.ChannelClosedByBroker:  # not declared yet
        return 0
    finally:
        connection.close()


@functools.cache
def digits_fingerprint() -> dict:
    """What a worker of these runs (digits, the cnn) builds, as its join states it."""
    settings = PartitionSettings(dataset="digits", partition="iid")
    task, context = Task(settings), federated.worker_context(settings, 0)
    return fingerprint(task.model(context), task.classes(context))


def join(session: str, sender: str, signer=None, nonce: str | None = None) -> bytes:
    message = Message("join", session, sender, seq=1, meta={"samples": 100, "nonce": nonce or uuid.uuid4().hex, "fingerprint": digits_fingerprint()})
    body = encode_body({})
    message.sig = signer.sign(signed_bytes(message, body)) if signer else None
    return encode(message, body)


class JoinReplayer(RabbitTransport):
    """worker-0's real connection; after its first update, its own signed join of the start is
    published again three times, as someone who recorded it would (before worker-0's next
    update, so the server reads the replays while the run still goes on)."""

    recorded: bytes | None = None
    replayed = 0

    def publish(self, queue, body, *, persistent=False, must_exist=False):
        super().publish(queue, body, persistent=persistent, must_exist=must_exist)
        kind = decode(body).kind
        if kind == "join":
            self.recorded = body
        elif kind == "update" and not self.replayed:
            for _ in range(3):
                super().publish(queue, self.recorded)
                self.replayed += 1


def test_refused_and_replayed_joins_cost_the_server_nothing(broker_url, session, tmp_path):
    key_list = keys.generate(tmp_path / "keys", [SERVER, "worker-0", "worker-1", "worker-2"])
    strangers = [f"stranger-{i}" for i in range(40)]
    with RabbitTransport(broker_url, name=f"flooder-{session}") as flooder:
        flooder.declare(server_queue(session), durable=True)
        for name in strangers:  # unsigned joins under names nobody listens on
            flooder.publish(server_queue(session), join(session, name))
        settings = FederatedSettings(dataset="digits", rounds=2, partition="iid")
        run = FedAvgRun(broker=broker_url, launch="threads", session=session, timeout=60, key_list=key_list, checkpoint_dir=tmp_path / "ckpt")
        replayer = None

        def connect(party):
            nonlocal replayer
            if party == "worker-0":
                replayer = JoinReplayer(broker_url, name=f"replayer-{session}")
                return replayer
            return RabbitTransport(broker_url, name=f"{party}-{session}")

        result = launch.run(fedavg.SCENARIO, settings, run, connect_as=connect)
    assert replayer.replayed == 3
    assert rejected_count(SERVER, session, "replay") == 3
    assert rejected_count(SERVER, session, "unknown-key") == len(strangers)
    assert not {worker_queue(session, name) for name in strangers} & queue_names()  # nothing was created for them
    sent_models = REGISTRY.get_sample_value("splitfed_messages_total", {"role": SERVER, "session": session, "kind": "model", "direction": "sent"})
    assert sent_models == settings.rounds * settings.workers  # the replays brought no extra model
    assert result["contributors"] == {"1": ["worker-0", "worker-1", "worker-2"], "2": ["worker-0", "worker-1", "worker-2"]}
    reference, _ = federated.reference_run(settings)
    saved = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    assert max((reference.state_dict()[k] - saved[k]).abs().max().item() for k in saved) <= 1e-5


def test_unsafe_mode_admits_no_more_workers_than_the_run_has(broker_url, session):
    """Three real workers' joins wait in the server's queue, then a fourth party's: the server,
    with no key list and --workers 3, admits the three and tells the fourth it is full."""
    from splitfed.roles.declaration import Identity
    from splitfed.roles.fedavg import ServerDeployment, WorkerDeployment
    from splitfed.roles.fedavg.server import FedAvgServer
    from splitfed.roles.fedavg.worker import FedAvgWorker
    from splitfed.scenarios.launch import RoleThread

    settings = FederatedSettings(dataset="digits", rounds=1, partition="iid")
    transports, threads = [], []
    try:
        for index in range(3):
            transports.append(RabbitTransport(broker_url, name=f"worker-{index}-{session}"))
            worker = FedAvgWorker(settings, WorkerDeployment(session=session, timeout=60, worker_id=f"worker-{index}", index=index), transports[-1], Identity())
            threads.append(RoleThread(f"worker-{index}", worker.run))
            threads[-1].start()
        probe = RabbitTransport(broker_url, name=f"probe-{session}")
        transports.append(probe)
        deadline = time.monotonic() + 60
        while message_count(broker_url, server_queue(session)) < 3:  # the three joins are queued first
            assert time.monotonic() < deadline, "the workers' joins never arrived"
            time.sleep(0.05)
        probe.declare(worker_queue(session, "gatecrasher"), durable=True)  # it listens, so it is told
        late = join(session, "gatecrasher")
        probe.publish(server_queue(session), late)
        transports.append(RabbitTransport(broker_url, name=f"server-{session}"))
        result = FedAvgServer(settings, ServerDeployment(session=session, timeout=60), transports[-1], Identity()).run()
        assert [thread.outcome(60)["rounds"] for thread in threads] == [1, 1, 1]
        refusal = probe.receive(worker_queue(session, "gatecrasher"), timeout=10)
        assert refusal is not None and decode(refusal.body).meta["reason"] == "full"
        probe.ack(refusal)
        assert probe.receive(worker_queue(session, "gatecrasher"), timeout=0.5) is None  # a refusal, and no model
    finally:
        for transport in transports:
            transport.close()
        launch.delete_queues(lambda party: RabbitTransport(broker_url, name=f"cleanup-{session}"),
                             [*fedavg_queues(session), worker_queue(session, "gatecrasher")])
    assert result["contributors"] == {"1": ["worker-0", "worker-1", "worker-2"]}
    assert rejected_count(SERVER, session, "full") == 1


def fedavg_queues(session: str) -> list[str]:
    from splitfed.roles.fedavg.common import session_queues

    return session_queues(session, 3)


class Recorder(RabbitTransport):
    """worker-0's connection in a first run: keeps the first update it sends and the round-2
    model it is sent, as someone watching the broker would."""

    update: bytes | None = None
    model: bytes | None = None

    def publish(self, queue, body, *, persistent=False, must_exist=False):
        if decode(body).kind == "update" and self.update is None:
            Recorder.update = body
        super().publish(queue, body, persistent=persistent, must_exist=must_exist)

    def receive(self, queue, timeout):
        delivery = super().receive(queue, timeout)
        if delivery is not None and (message := decode(delivery.body)).kind == "model" and message.round == 2:
            Recorder.model = delivery.body
        return delivery


class Replayer(RabbitTransport):
    """worker-0's connection in a second run on the same session, all frames validly signed by
    the same keys: as round 1 starts, the first run's round-1 update of worker-0 goes to the
    server ahead of the real one; as worker-0's round-1 update leaves, the first run's round-2
    model is put in worker-0's queue."""

    def receive(self, queue, timeout):
        delivery = super().receive(queue, timeout)
        if delivery is not None and (message := decode(delivery.body)).kind == "model" and message.round == 1:
            super().publish(server_queue(message.session), Recorder.update)
        return delivery

    def publish(self, queue, body, *, persistent=False, must_exist=False):
        super().publish(queue, body, persistent=persistent, must_exist=must_exist)
        if decode(body).kind == "update" and decode(body).round == 1:
            super().publish(worker_queue(decode(body).session, "worker-0"), Recorder.model)


def test_frames_recorded_in_an_earlier_run_of_the_session_are_refused(broker_url, session, tmp_path):
    key_list = keys.generate(tmp_path / "keys", [SERVER, "worker-0", "worker-1", "worker-2"])
    first = FederatedSettings(dataset="digits", rounds=2, partition="iid")

    def connect_with(double):
        return lambda party: (double if party == "worker-0" else RabbitTransport)(broker_url, name=f"{party}-{session}")

    launch.run(fedavg.SCENARIO, first, FedAvgRun(broker=broker_url, launch="threads", session=session, timeout=60, key_list=key_list),
               connect_as=connect_with(Recorder))
    assert Recorder.update is not None and Recorder.model is not None
    # A second run on the same session, same keys, another seed, with the first run's frames replayed.
    second = FederatedSettings(dataset="digits", rounds=2, partition="iid", seed=2)
    run = FedAvgRun(broker=broker_url, launch="threads", session=session, timeout=60, key_list=key_list, checkpoint_dir=tmp_path / "ckpt")
    result = launch.run(fedavg.SCENARIO, second, run, connect_as=connect_with(Replayer))
    assert rejected_count(SERVER, session, "replay") == 1  # the old update
    assert rejected_count("fedavg-worker", session, "replay") == 1  # the old model
    assert result["contributors"] == {"1": ["worker-0", "worker-1", "worker-2"], "2": ["worker-0", "worker-1", "worker-2"]}
    reference, _ = federated.reference_run(second)
    saved = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    assert max((reference.state_dict()[k] - saved[k]).abs().max().item() for k in saved) <= 1e-5
