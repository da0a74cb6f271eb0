"""FedAvg survives crashes: a killed server resumes from its checkpoint, a killed worker is left
out of a round and comes back, a restarted broker is reconnected to; nothing is lost or applied
twice (the final model equals the uninterrupted plain loop's). Plus TLS-only brokers."""

import contextlib
import dataclasses
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from splitfed.learning import federated
from splitfed.learning.settings import FederatedSettings, PartitionSettings
from splitfed.learning.tasks import Task, fingerprint
from splitfed.protocol import Message, decode_with_body, encode, encode_body, signed_bytes
from splitfed.roles.declaration import Identity
from splitfed.roles.endpoint import Endpoint, frame_digest
from splitfed.roles.fedavg import WorkerDeployment, worker_ids
from splitfed.roles.fedavg.common import server_queue, session_queues, worker_queue
from splitfed.roles.fedavg.worker import FedAvgWorker
from splitfed.scenarios import fedavg, launch
from splitfed.scenarios.fedavg import FedAvgRun
from splitfed.scenarios.launch import Launch, ProcessGroup, RoleProcess, RoleThread
from splitfed.transport import TransportError
from splitfed.transport.rabbitmq import RabbitTransport, TLSOptions
from tests.own_broker import OwnBroker, make_tls_files


def checkpoint_state(directory: Path) -> dict:
    try:
        return json.loads((directory / "state.json").read_text())
    except (OSError, ValueError):
        return {"round": 0, "contributors": {}}


def wait_for(condition, what: str, timeout: float = 120) -> None:
    """Poll a condition on what the run wrote (bounded): the run itself never sleeps."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def assert_equals_reference(settings: FederatedSettings, checkpoint: Path) -> None:
    """Long local training amplifies the last bit, so the plain loop runs with the workers' thread
    count (one each: three worker processes on this machine's cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference, _ = federated.reference_run(settings)
    finally:
        torch.set_num_threads(threads)
    saved = load_file(str(checkpoint / "model.safetensors"))
    assert max((reference.state_dict()[k] - saved[k]).abs().max().item() for k in saved) <= 1e-5


def with_rounds_to_spare(**strategy) -> FederatedSettings:
    """More rounds than can pass between the test seeing round 1 on disk and pausing the workers
    (`paused`): the run is still under way when something is killed or restarted."""
    return FederatedSettings(dataset="digits", rounds=6, partition="iid", **strategy)


@contextlib.contextmanager
def paused(*members: RoleProcess) -> Iterator[None]:
    """SIGSTOP the members' processes, SIGCONT them on the way out: the run waits for them, so
    it can go no further than the round under way."""
    for member in members:
        member.process.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        for member in members:
            member.process.send_signal(signal.SIGCONT)


def all_workers(settings):
    return worker_ids(settings.workers)


def roles(settings: FederatedSettings, run: FedAvgRun, workdir: Path) -> tuple[Launch, list[Launch]]:
    """The server's and the workers' launches of a run, one torch thread each."""
    server, *workers = [dataclasses.replace(launch, threads=1) for launch in fedavg.plan(settings, run.resolved(), workdir)]
    return server, workers


def process_group(run: FedAvgRun) -> ProcessGroup:
    return ProcessGroup(run)


def test_processes_with_keys_equal_the_plain_loop(broker_url, session, tmp_path):
    """Signed processes equal the plain loop, and the server process really checks signatures:
    joins waiting in its queue before it starts, one unsigned, one signed with the wrong key and
    one from a party off the list, are each answered with a signed refusal naming the reason
    (accepted, any of them would have taken a worker's place in every round)."""
    from splitfed.security import keys

    key_list = keys.generate(tmp_path / "keys", ["fedavg-server", *worker_ids(3), "worker-8", "worker-9"])  # 8, 9: listed, never run
    stranger = keys.generate(tmp_path / "stranger", ["worker-8", "intruder:fedavg-worker"]).parent
    impostors = {  # sender -> (its signer, the refusal expected)
        "worker-9": (None, "unsigned"),
        "worker-8": (keys.load_private(stranger / "worker-8.key", "worker-8"), "signature"),
        "intruder": (keys.load_private(stranger / "intruder.key", "intruder"), "unknown-key"),
    }
    settings = FederatedSettings(dataset="digits", rounds=2, partition="iid")
    impostor = RabbitTransport(broker_url, name=f"impostor-{session}")
    try:
        impostor.declare(server_queue(session), durable=True)
        frames = {}
        for sender, (signer, _) in impostors.items():
            impostor.declare(worker_queue(session, sender), durable=True)
            join = Message("join", session, sender, seq=1, meta={"samples": 479})
            body = encode_body(join.tensors)
            join.sig = signer.sign(signed_bytes(join, body)) if signer else None
            frames[sender] = encode(join, body)
            impostor.publish(server_queue(session), frames[sender], persistent=True)
        run = FedAvgRun(broker=broker_url, session=session, timeout=120, key_list=key_list, checkpoint_dir=tmp_path / "ckpt")
        result = launch.run(fedavg.SCENARIO, settings, run)
        trusted = keys.KeyList.load(key_list)
        for sender, (_, reason) in impostors.items():
            delivery = impostor.receive(worker_queue(session, sender), timeout=10)
            assert delivery is not None, f"{sender}'s join was not answered"
            impostor.ack(delivery)
            refusal, body = decode_with_body(delivery.body)
            assert (refusal.kind, refusal.sender, refusal.meta.get("reason")) == ("refused", "fedavg-server", reason), sender
            assert refusal.meta["ref"] == frame_digest(frames[sender])  # it answers that very join
            assert trusted.verify("fedavg-server", refusal.sig, signed_bytes(refusal, body))
            assert impostor.receive(worker_queue(session, sender), timeout=0.2) is None, f"{sender} was sent more than a refusal"
    finally:
        for sender in impostors:
            impostor.delete(worker_queue(session, sender))
        impostor.delete(server_queue(session))
        impostor.close()
    assert result["config"]["launch"] == "processes"
    assert result["contributors"] == {"1": all_workers(settings), "2": all_workers(settings)}
    assert_equals_reference(settings, tmp_path / "ckpt")


@pytest.mark.parametrize("strategy", [{"strategy": "fedadam", "local_steps": 8},
                                      {"strategy": "scaffold", "optimizer": "sgd", "lr": 0.05, "calibration": "ccvr"}])
def test_server_optimisers_and_scaffold_as_processes_equal_the_plain_loop(broker_url, session, tmp_path, strategy):
    """The strategies with server state, and SCAFFOLD's control variates travelling signed; then
    CCVR's statistics, signed too (the model the run leaves is the calibrated one)."""
    from splitfed.security import keys

    key_list = keys.generate(tmp_path / "keys", ["fedavg-server", *worker_ids(3)])
    settings = FederatedSettings(dataset="digits", rounds=2, partition="classes:0-3,4-6,7-9", **strategy)
    run = FedAvgRun(broker=broker_url, session=session, timeout=120, key_list=key_list, checkpoint_dir=tmp_path / "ckpt")
    result = launch.run(fedavg.SCENARIO, settings, run)
    assert result["contributors"] == {"1": all_workers(settings), "2": all_workers(settings)}
    if settings.calibration == "ccvr":
        assert result["calibration"]["workers"] == all_workers(settings) and result["accuracy"] == result["calibration"]["accuracy"]
    assert_equals_reference(settings, tmp_path / "ckpt")


# Server optimisers and SCAFFOLD keep state beside the model (moments, control variates): the
# resumed run equals the uninterrupted one only if that state is checkpointed with the model.
@pytest.mark.parametrize("strategy", [{"strategy": "fedadam", "calibration": "ccvr"}, {"strategy": "scaffold", "optimizer": "sgd", "lr": 0.02, "local_steps": 12}])
def test_killed_server_resumes_from_its_checkpoint(broker_url, session, tmp_path, strategy):
    settings = with_rounds_to_spare(**strategy)
    checkpoint = tmp_path / "ckpt"
    run = FedAvgRun(broker=broker_url, session=session, timeout=120, checkpoint_dir=checkpoint)
    server_launch, worker_launches = roles(settings, run, tmp_path)
    group = process_group(run)
    try:
        first = group.start(server_launch)
        workers = [group.start(worker) for worker in worker_launches]
        wait_for(lambda: checkpoint_state(checkpoint)["round"] >= 2, "round 1 on disk")
        with paused(*workers):  # mid-round: the round's models are out, some updates maybe on their way
            first.process.kill()
            first.process.wait()
            killed_in = checkpoint_state(checkpoint)["round"]
        assert killed_in < settings.rounds + 1, "the run ended before the kill; give it more rounds"
        out = tmp_path / "result.json"
        second = group.start(server_launch.with_deployment(out=out), name="server-restarted")
        for member in (second, *workers):
            group.wait(member, 180)
    finally:
        group.stop()
    assert f"resumed from checkpoint: round {killed_in}" in second.log_path.read_text()
    result = json.loads(out.read_text())
    assert [r["step"] for r in result["history"]] == list(range(1, settings.rounds + 1))
    assert result["contributors"] == {str(r): all_workers(settings) for r in range(1, settings.rounds + 1)}
    assert_equals_reference(settings, checkpoint)  # nothing lost, nothing applied twice


def queue_counts(queue: str) -> tuple[int, int] | None:
    """(ready, unacknowledged) messages of `queue` as the broker counts them; None if it is absent."""
    listing = subprocess.run(
        ["rabbitmqctl", "list_queues", "--quiet", "--no-table-headers", "name", "messages_ready", "messages_unacknowledged"],
        capture_output=True, text=True, check=True, timeout=60,
    )
    for line in listing.stdout.splitlines():
        fields = line.split()
        if len(fields) == 3 and fields[0] == queue:
            return int(fields[1]), int(fields[2])
    return None


def test_server_killed_holding_unacked_updates_loses_none(broker_url, session, tmp_path):
    """The server process is killed (SIGKILL) while its queue holds updates it accepted for a round
    not yet closed: worker-2 joined but never answers (a stalled worker), so round 1 waits with
    the updates of worker-0 and worker-1 in hand. Those must still be unacked: the broker hands
    them to the restarted server, which applies each once when the real worker-2 catches up.
    The workers run as threads here (one torch thread, as the plain loop compared with)."""
    settings = FederatedSettings(dataset="digits", rounds=2, partition="iid")
    checkpoint, out = tmp_path / "ckpt", tmp_path / "result.json"
    run = FedAvgRun(broker=broker_url, session=session, timeout=90, checkpoint_dir=checkpoint)
    server_launch, _ = roles(settings, run, tmp_path)
    share = PartitionSettings(dataset="digits", partition="iid")
    inbox = server_queue(session)
    group = process_group(run)
    transports = [RabbitTransport(broker_url, name=f"stalled-worker-2-{session}")]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    def start_worker(index: int) -> tuple[FedAvgWorker, RoleThread]:
        transports.append(RabbitTransport(broker_url, name=f"worker-{index}-{session}"))
        role = FedAvgWorker(share, WorkerDeployment(session=session, timeout=90, worker_id=f"worker-{index}", index=index), transports[-1], Identity())
        thread = RoleThread(f"worker-{index}", role.run)
        thread.start()
        return role, thread

    try:
        first = group.start(server_launch)
        # worker-2 joins through the real protocol, then never reads its queue.
        transports[0].declare(inbox, durable=True)
        stalled = Endpoint(transports[0], session=session, role="fedavg-worker", inbox=worker_queue(session, "worker-2"), durable=True, ordered=False, name="worker-2")
        task, context = Task(share), federated.worker_context(share, 2)
        join = {"samples": 479, "nonce": "0" * 32, "fingerprint": fingerprint(task.model(context), task.classes(context))}
        stalled.send_message(inbox, Message("join", "", "", meta=join), persistent=True)
        workers = [start_worker(index) for index in range(2)]

        def delivered() -> bool:
            # A worker records its round once the broker has confirmed the update; none left
            # ready in the queue means the broker has handed both to the server.
            if not all(role.last_round == 1 for role, _ in workers):
                return False
            counts = queue_counts(inbox)
            return counts is not None and counts[0] == 0

        wait_for(delivered, "round 1's updates of worker-0 and worker-1 delivered to the server")
        wait_for(lambda: queue_counts(inbox) == (0, 2), "the server holding both updates unacked while round 1 waits for worker-2", timeout=15)
        assert checkpoint_state(checkpoint)["round"] == 1 and first.process.poll() is None
        first.process.kill()
        first.process.wait()
        wait_for(lambda: queue_counts(inbox) == (2, 0), "the broker taking both updates back for the next server", timeout=30)
        workers.append(start_worker(2))
        second = group.start(server_launch.with_deployment(out=out), name="server-restarted")
        group.wait(second, 180)
        assert [thread.outcome(60)["rounds"] for _, thread in workers] == [2, 2, 2]
    finally:
        torch.set_num_threads(threads)
        group.stop()
        for transport in transports:
            transport.close()
        launch.delete_queues(launch.transport_factory(run.resolved()), session_queues(session, settings.workers))
    assert "resumed from checkpoint: round 1" in second.log_path.read_text()
    result = json.loads(out.read_text())
    assert [r["step"] for r in result["history"]] == [1, 2]
    assert result["contributors"] == {"1": all_workers(settings), "2": all_workers(settings)}
    assert_equals_reference(settings, checkpoint)  # nothing lost, nothing applied twice


def test_killed_worker_is_left_out_then_rejoins(broker_url, session, tmp_path):
    settings = FederatedSettings(dataset="fashion-mnist", limit=3000, test_limit=1000, rounds=8, local_epochs=1, partition="iid")
    checkpoint = tmp_path / "ckpt"
    out = tmp_path / "result.json"
    # Rounds of a second or two: time for worker-2 to restart.
    run = FedAvgRun(broker=broker_url, session=session, timeout=120, checkpoint_dir=checkpoint, min_workers=2, round_timeout=10)
    server_launch, worker_launches = roles(settings, run, tmp_path)
    group = process_group(run)
    try:
        server = group.start(server_launch.with_deployment(out=out))
        workers = [group.start(worker) for worker in worker_launches]
        wait_for(lambda: checkpoint_state(checkpoint)["round"] >= 2, "round 1 on disk")
        workers[2].process.kill()
        workers[2].process.wait()
        short = lambda: [r for r, who in checkpoint_state(checkpoint)["contributors"].items() if who == ["worker-0", "worker-1"]]  # noqa: E731
        wait_for(short, "a round closed with two workers after the round timeout")
        restarted = group.start(worker_launches[2], name="worker-2-restarted")
        for member in (server, workers[0], workers[1], restarted):
            group.wait(member, 180)
    finally:
        group.stop()
    contributors = json.loads(out.read_text())["contributors"]
    left_out = min(int(r) for r, who in contributors.items() if "worker-2" not in who)
    assert contributors[str(left_out)] == ["worker-0", "worker-1"]
    assert any("worker-2" in who for r, who in contributors.items() if int(r) > left_out), "worker-2 never came back"
    assert sorted(map(int, contributors)) == list(range(1, settings.rounds + 1))


def test_a_restarted_broker_is_survived(tmp_path, session):
    broker = OwnBroker(tmp_path / "node").start()
    settings = with_rounds_to_spare()
    checkpoint, out = tmp_path / "ckpt", tmp_path / "result.json"
    run = FedAvgRun(broker=broker.url, session=session, timeout=120, checkpoint_dir=checkpoint)
    server_launch, worker_launches = roles(settings, run, tmp_path)
    group = process_group(run)
    try:
        server = group.start(server_launch.with_deployment(out=out))
        workers = [group.start(worker) for worker in worker_launches]
        wait_for(lambda: checkpoint_state(checkpoint)["round"] >= 2, "round 1 on disk")
        with paused(*workers):
            assert checkpoint_state(checkpoint)["round"] <= settings.rounds, "the run ended before the restart; give it more rounds"
            broker.restart_app()  # closes every connection; durable queues and persistent messages stay
        for member in (server, *workers):
            group.wait(member, 180)
    finally:
        group.stop()
        broker.stop()
    assert "reconnected" in server.log_path.read_text()
    assert json.loads(out.read_text())["contributors"] == {str(r): all_workers(settings) for r in range(1, settings.rounds + 1)}
    assert_equals_reference(settings, checkpoint)


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tls")
    broker = OwnBroker(directory / "node", make_tls_files(directory / "certs")).start()
    yield broker
    broker.stop()


def test_fedavg_over_a_tls_only_broker(tls_broker, tmp_path):
    tls = tls_broker.tls
    out = tmp_path / "result.json"
    completed = subprocess.run(
        [sys.executable, "-m", "splitfed", "run", "fedavg", "--dataset", "digits", "--rounds", "2", "--partition", "iid",
         "--broker", tls_broker.url, "--tls-ca", str(tls.ca), "--tls-cert", str(tls.client_cert), "--tls-key", str(tls.client_key),
         "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["config"]["launch"] == "processes" and len(result["history"]) == 2


def test_plain_or_unverified_connections_to_the_tls_broker_are_refused(tls_broker):
    tls = tls_broker.tls
    plain = tls_broker.url.replace("amqps://", "amqp://")
    attempts = {
        "plain AMQP": (plain, None),
        "TLS without a client certificate": (tls_broker.url, TLSOptions(str(tls.ca))),
        "TLS trusting another CA": (tls_broker.url, TLSOptions(str(tls.other_ca), str(tls.client_cert), str(tls.client_key))),
    }
    for what, (url, options) in attempts.items():
        with pytest.raises(TransportError, match="cannot connect"):
            RabbitTransport(url, tls=options, connect_timeout=3)
            pytest.fail(f"{what} was accepted")
    good = RabbitTransport(tls_broker.url, tls=TLSOptions(str(tls.ca), str(tls.client_cert), str(tls.client_key)), connect_timeout=10)
    good.close()
