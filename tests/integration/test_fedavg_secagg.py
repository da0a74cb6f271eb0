"""SecAgg+ (roles.fedavg.secure) over a real RabbitMQ, one OS process per party, watched on the wire.

The broker is a node of this module's own (tests.own_broker) with RabbitMQ's firehose tracer on:
the broker copies every message published on it, as it routes it, to `amq.rabbitmq.trace`, where
a queue of the test's own is bound (routing key `publish.#`). Delivery to the parties is not
touched: the copy is the broker's, made beside the routing, and the parties consume their queues as
ever. The firehose would copy the publishes of every other test on the shared broker too, so it
runs on a node nobody else uses. Every recorded frame is decoded with `splitfed.protocol.codec`
(never pickle), and it is what the parties really sent: the firehose sees the frame the broker
routed, before any consumer.

The firehose also says when a party is at a given point of the protocol, so a party can be killed
(SIGKILL) exactly there: reacting to a frame happens in the recording thread, milliseconds after
the broker routed it. Where a party could otherwise get one step further in those milliseconds, the
server is held (SIGSTOP) over the kill, so the step it would take next cannot happen yet; each
test also asserts, on the recording, that the kill came where it was meant to.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import signal
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pika
import pytest
import torch
from safetensors.torch import load_file

from splitfed import config
from splitfed.learning import federated, secagg, strategies
from splitfed.learning.secagg import EXTRA, SEALED_BYTES
from splitfed.learning.settings import FederatedSettings, PartitionSettings
from splitfed.learning.tasks import Task
from splitfed.protocol import Message, ProtocolError, decode_with_body, signed_bytes
from splitfed.roles.declaration import Identity
from splitfed.roles.fedavg import SERVER, WorkerDeployment, worker_ids
from splitfed.roles.fedavg.checkpoints import ServerState
from splitfed.roles.fedavg.common import (
    CONSENT, EVALUATED, JOIN, KEYS, MASKED, MODEL, NEIGHBOURS, REVEAL, SEALED, SHARES, UNMASK, UPDATE, server_queue, session_queues, worker_queue,
)
from splitfed.roles.fedavg.secure import SECURE
from splitfed.roles.fedavg.worker import FedAvgWorker
from splitfed.scenarios import launch
from splitfed.scenarios.fedavg import FedAvgRun
from splitfed.scenarios.launch import ProcessGroup, RoleProcess, RoleThread
from splitfed.security import keys
from splitfed.transport.chunks import CHUNK_COUNT, CHUNK_ID, CHUNK_INDEX
from splitfed.transport.rabbitmq import RabbitTransport
from tests.integration.test_fedavg_resilience import all_workers, assert_equals_reference, roles, wait_for
from tests.own_broker import OwnBroker

SECURE_KINDS = (KEYS, SHARES, MASKED, CONSENT, REVEAL)  # what a worker sends in a secure round, in order
TO_SERVER = {JOIN, *SECURE_KINDS, EVALUATED}  # all that may reach the server's queue in a secure run
FIELD = 2.0**32
CHI2_LIMIT = 60.0  # 16 bins, 15 degrees of freedom: a uniform vector passes but for odds of about 2e-7
# A stage deadline of the dropout test: how long the server waits for a killed worker at each stage
# it is missing from. The stages of a round after the first take milliseconds on this machine.
ROUND_TIMEOUT = 3.0
WAIT = 120  # seconds: only a run that is stuck waits this long for a party


# -- the firehose ---------------------------------------------------------------------------------

@dataclass
class Frame:
    """One frame published on the broker for the session: where to and where the broker routed it."""

    queue: str  # the routing key it was published with: the queue it was sent to
    routed: tuple[str, ...]  # the queues the broker put it in
    message: Message  # decoded by the codec
    body: bytes  # its safetensors body, as signed


@dataclass
class Trigger:
    predicate: Callable[[Frame], bool]
    action: Callable[[Frame], None]
    fired: threading.Event = field(default_factory=threading.Event)


class Firehose:
    """Every frame published for `session` on the traced broker at `url`, recorded by a thread of
    its own from a queue bound to the firehose, decoded with the codec. `when(predicate, action)`
    runs `action` in that thread as soon as a matching frame is recorded (or at once, when one
    already was): a reaction milliseconds after the broker routed it."""

    def __init__(self, url: str, session: str):
        self.prefix = f"splitfed.{session}."
        self.frames: list[Frame] = []
        self.triggers: list[Trigger] = []
        self.errors: list[BaseException] = []
        self.changed = threading.Condition()
        self.partials: dict[str, dict[int, bytes]] = {}
        self.ready, self.stopping = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._record, args=(url,), name="firehose", daemon=True)
        self.thread.start()
        if not self.ready.wait(60):
            raise AssertionError("the firehose queue was not set up within 60s")
        self.check()

    def _record(self, url: str) -> None:
        connection = None
        try:
            connection = pika.BlockingConnection(pika.URLParameters(url))
            channel = connection.channel()
            queue = channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
            channel.queue_bind(queue, "amq.rabbitmq.trace", "publish.#")
            channel.basic_consume(queue, self._on_trace, auto_ack=True)
            self.ready.set()
            while not self.stopping.is_set():
                connection.process_data_events(time_limit=0.05)
        except BaseException as exc:  # told to the test: it fails on it
            self.errors.append(exc)
        finally:
            self.ready.set()
            if connection is not None and connection.is_open:
                with contextlib.suppress(Exception):
                    connection.close()

    def _on_trace(self, channel, method, properties, trace: bytes) -> None:  # noqa: ANN001 (pika's)
        headers = properties.headers or {}
        routing_keys = [_text(key) for key in headers.get("routing_keys", [])]
        if not routing_keys or not routing_keys[0].startswith(self.prefix):
            return
        original = headers.get("properties", {}).get("headers") or {}
        if CHUNK_ID in original:  # a frame larger than the transport's chunk size: put it back together
            parts = self.partials.setdefault(_text(original[CHUNK_ID]), {})
            parts[int(original[CHUNK_INDEX])] = trace
            if len(parts) < int(original[CHUNK_COUNT]):
                return
            trace = b"".join(parts[index] for index in sorted(parts))
            del self.partials[_text(original[CHUNK_ID])]
        try:
            message, body = decode_with_body(trace)
        except ProtocolError as exc:
            self.errors.append(AssertionError(f"a frame published to {routing_keys[0]} does not decode: {exc}"))
            return
        frame = Frame(routing_keys[0], tuple(_text(queue) for queue in headers.get("routed_queues", [])), message, body)
        with self.changed:
            self.frames.append(frame)
            for trigger in self.triggers:
                self._maybe_fire(trigger, frame)
            self.changed.notify_all()

    def _maybe_fire(self, trigger: Trigger, frame: Frame) -> None:
        if trigger.fired.is_set() or not trigger.predicate(frame):
            return
        try:
            trigger.action(frame)
        except BaseException as exc:
            self.errors.append(exc)
        finally:
            trigger.fired.set()

    def when(self, predicate: Callable[[Frame], bool], action: Callable[[Frame], None]) -> Trigger:
        trigger = Trigger(predicate, action)
        with self.changed:
            for frame in self.frames:
                self._maybe_fire(trigger, frame)
            self.triggers.append(trigger)
        return trigger

    def wait(self, condition: Callable[[list[Frame]], bool], what: str, timeout: float = WAIT) -> None:
        """Until `condition` holds of the frames recorded so far (bounded)."""
        with self.changed:
            if not self.changed.wait_for(lambda: self.errors or condition(self.frames), timeout):
                raise AssertionError(f"timed out waiting for {what}")
        self.check()

    def check(self) -> None:
        if self.errors:
            raise AssertionError(f"the firehose failed: {self.errors[0]!r}") from self.errors[0]

    def snapshot(self) -> list[Frame]:
        with self.changed:
            return list(self.frames)

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(30)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def is_frame(kind: str, round_number: int, sender: str | None = None, to: str | None = None) -> Callable[[Frame], bool]:
    """A predicate: a frame of `kind` for `round_number`, from `sender` and/or to queue `to`."""
    return lambda frame: (frame.message.kind == kind and frame.message.round == round_number
                          and (sender is None or frame.message.sender == sender) and (to is None or frame.queue == to))


@pytest.fixture(scope="module")
def traced_broker(tmp_path_factory) -> Iterator[OwnBroker]:
    """A RabbitMQ node of this module's own, with the firehose on for its only vhost."""
    broker = OwnBroker(tmp_path_factory.mktemp("secagg-broker") / "node").start()
    try:
        traced = broker.ctl("trace_on", "-p", "/")
        assert traced.returncode == 0, traced.stderr
        yield broker
    finally:
        broker.stop()


@contextlib.contextmanager
def traced_run(broker: OwnBroker, session: str, run: FedAvgRun, workers: int, workdir: Path) -> Iterator[tuple[Firehose, ProcessGroup]]:
    """The firehose recording `session` from before any party starts, and the run's processes
    (their logs and the broker credentials they read in `workdir`); whatever happens, every
    process is killed (a held one too), the recording stops and the session's queues are deleted."""
    wire = Firehose(broker.url, session)
    workdir.mkdir(parents=True, exist_ok=True)
    group = ProcessGroup(run, workdir)
    try:
        yield wire, group
    finally:
        try:
            group.stop()  # SIGKILL ends a held (stopped) process too
        finally:
            wire.close()
            launch.delete_queues(launch.transport_factory(run.resolved()), session_queues(session, workers))


def kill(member: RoleProcess) -> None:
    member.process.kill()
    member.process.wait()


def hold(member: RoleProcess) -> None:
    member.process.send_signal(signal.SIGSTOP)


def release(member: RoleProcess) -> None:
    member.process.send_signal(signal.SIGCONT)


def log_of(member: RoleProcess) -> str:
    return member.log_path.read_text(errors="replace")


# -- what the recording says ----------------------------------------------------------------------

@dataclass
class Attempt:
    """One attempt at a round's secure sum, as the wire shows it."""

    id: str
    round: int
    secure: dict  # the attempt's parameters, as the model message states them
    model: dict[str, np.ndarray]  # the global model the workers were sent for the round
    sent: dict[str, dict[str, Message]]  # kind -> worker -> what it sent the server
    unmask: dict | None = None  # the survivors and dropped the server named

    @property
    def threshold(self) -> int:
        return self.secure["threshold"]

    def senders(self, kind: str) -> set[str]:
        return set(self.sent[kind])

    def revealed(self) -> tuple[dict[str, dict[int, bytes]], dict[str, dict[int, bytes]]]:
        """Every seed share and every key share the server received, by whose secret it is (u) and its index."""
        seeds: dict[str, dict[int, bytes]] = {}
        mask_keys: dict[str, dict[int, bytes]] = {}
        for message in self.sent[REVEAL].values():
            for name, array in message.tensors.items():
                which, owner = name.split("/", 1)
                assert which in ("seed", "key"), f"a reveal carries {name!r}"
                (seeds if which == "seed" else mask_keys).setdefault(owner, {})[int(array[0])] = array[1:].tobytes()
        return seeds, mask_keys


def attempts_of(frames: list[Frame], session: str) -> dict[str, Attempt]:
    """Each attempt the server started (by its model messages), with what reached the server's queue for it."""
    inbox = server_queue(session)
    found: dict[str, Attempt] = {}
    for frame in frames:
        message = frame.message
        if message.kind == MODEL and SECURE in message.meta:
            secure = message.meta[SECURE]
            attempt = found.setdefault(secure["attempt"], Attempt(secure["attempt"], message.round, secure, message.tensors, {kind: {} for kind in SECURE_KINDS}))
            assert attempt.secure == secure and attempt.round == message.round, "one attempt, two sets of parameters"
            assert all(np.array_equal(attempt.model[name], array) for name, array in message.tensors.items()), "one attempt, two models"
        elif message.kind in SECURE_KINDS and inbox in frame.routed:
            assert message.meta["attempt"] in found, f"{message.kind} from {message.sender} for an attempt no model message announced"
            found[message.meta["attempt"]].sent[message.kind][message.sender] = message
        elif message.kind == UNMASK:
            found[message.meta["attempt"]].unmask = {"survivors": message.meta["survivors"], "dropped": message.meta["dropped"]}
    return found


def completed(attempts: dict[str, Attempt], round_number: int) -> Attempt:
    """The round's attempt whose reveals came in (the one its model was made from, when only one did)."""
    done = [a for a in attempts.values() if a.round == round_number and a.sent[REVEAL]]
    assert len(done) == 1, f"round {round_number}: {len(done)} attempts got reveals"
    return done[0]


def parameters_of(settings: FederatedSettings) -> tuple[Task, list[str], int]:
    task = Task(settings)
    model = task.model(federated.server_context(settings))
    names = list(model.state_dict())
    return task, names, sum(value.numel() for value in model.state_dict().values())


def flat(tensors: dict, names: list[str]) -> torch.Tensor:
    return strategies.flatten({name: torch.as_tensor(np.asarray(tensors[name])) for name in names}, names)


def assert_only_the_protocol_reaches_the_server(frames: list[Frame], session: str, parameters: int) -> None:
    """(a) No `update`, no float tensor, nothing of the model's size but a masked input over Z_2^32."""
    arrived = [frame for frame in frames if server_queue(session) in frame.routed]
    kinds = Counter(frame.message.kind for frame in arrived)
    assert UPDATE not in kinds and set(kinds) <= TO_SERVER, f"the server's queue got {dict(kinds)}"
    assert {JOIN, *SECURE_KINDS} <= set(kinds), f"the run never went through the protocol: {dict(kinds)}"
    for frame in arrived:
        for name, array in frame.message.tensors.items():
            assert array.dtype.kind not in "fc", f"{frame.message.kind} from {frame.message.sender} carries a float tensor {name!r}"
            if array.size >= parameters:
                assert (frame.message.kind, name, array.dtype, array.shape) == (MASKED, "masked", np.uint32, (parameters + EXTRA,))


def assert_no_secret_pair_is_revealed(attempts: dict[str, Attempt], unmasked: list[Attempt]) -> None:
    """(c) For every worker and attempt, the server got the shares of its self-mask seed or of its
    mask key, never both, and no share of a survivor's key nor of the seed of one that dropped
    after sharing. In the attempts whose sum it `unmasked`, it got t or more of the one secret it
    needed of each (so the check is not vacuous): exactly what it may have, nothing more."""
    for attempt in attempts.values():
        seeds, mask_keys = attempt.revealed()
        for worker in set(seeds) & set(mask_keys):
            raise AssertionError(f"attempt {attempt.id}: the server got shares of both secrets of {worker}")
        if attempt.unmask is None:
            assert not seeds and not mask_keys, f"attempt {attempt.id}: shares revealed unasked"
            continue
        survivors, dropped = attempt.senders(MASKED), attempt.senders(SHARES) - attempt.senders(MASKED)
        assert attempt.unmask == {"survivors": sorted(survivors), "dropped": sorted(dropped)}, attempt.unmask
        assert not set(mask_keys) - dropped and not set(seeds) - survivors, (attempt.id, sorted(seeds), sorted(mask_keys))
        if attempt.id in {done.id for done in unmasked}:
            for worker in survivors:
                assert len(seeds.get(worker, {})) >= attempt.threshold, (worker, attempt.id)
            for worker in dropped:
                assert len(mask_keys.get(worker, {})) >= attempt.threshold, (worker, attempt.id)


def assert_sealed_shares_are_opaque(frames: list[Frame], attempts: dict[str, Attempt]) -> None:
    """(d) The share bytes the server receives in reveals appear in no other frame of the run:
    not in the sealed boxes the workers sent it (one per neighbour that advertised keys, each
    SEALED_BYTES long), nor anywhere else."""
    shares = {share for attempt in attempts.values() for revealed in attempt.revealed() for owner in revealed.values() for share in owner.values()}
    assert shares, "no share was ever revealed"
    boxes = 0
    for attempt in attempts.values():
        for sender, message in attempt.sent[SHARES].items():
            assert all(array.dtype == np.uint8 and array.shape == (SEALED_BYTES,) for array in message.tensors.values())
            boxes += len(message.tensors)
    assert boxes, "no sealed share was recorded"
    for frame in frames:
        if frame.message.kind != REVEAL:
            leaked = [share for share in shares if share in frame.body]
            assert not leaked, f"{frame.message.kind} from {frame.message.sender} to {frame.queue} holds a revealed share in the clear"


@dataclass
class Input:
    """A worker's input to a secure round, recomputed here: its change (clipped as encoded), loss and samples."""

    vector: np.ndarray  # (P + EXTRA,) uint32
    change: np.ndarray  # (P,) float64, clipped to the encoding's range
    samples: int


def true_inputs(settings: FederatedSettings, attempt: Attempt, workers: list[str]) -> dict[str, Input]:
    """Each worker's unmasked input to `attempt`, recomputed independently as that worker does:
    its share, the round's seed, local training from the model it was sent, its (DP) change,
    encoded with the attempt's Encoding. One torch thread, as each worker process has."""
    share_settings = config.build(PartitionSettings, config.values_of(settings))
    task = Task(share_settings)
    ids = worker_ids(settings.workers)
    shares = federated.worker_shares(task, share_settings, [ids.index(worker) for worker in workers])
    encoding = secagg.Encoding(attempt.secure["clip"], attempt.secure["max_samples"] if federated.dp_weighted(settings) else 1,
                               len(attempt.secure["participants"]))
    recipe = strategies.from_settings(settings).recipe
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        inputs = {}
        for worker, share in zip(workers, shares):
            index = ids.index(worker)
            context = federated.worker_context(share_settings, index)
            model = task.model(context)
            names = list(model.state_dict())
            model.load_state_dict({name: torch.from_numpy(attempt.model[name].copy()) for name in names})
            start = strategies.flatten(model.state_dict(), names)
            work = federated.local_training(model, share, share_settings, federated.round_seed(settings.seed, index, attempt.round), attempt.round,
                                            recipe, None, task.loss(context), task.compute)
            change, under_clip = federated.private_change(strategies.flatten(model.state_dict(), names) - start, share_settings, settings.dp_clip)
            vector = federated.secure_input(encoding, change, work.loss, len(share), under_clip, share_settings)
            inputs[worker] = Input(vector, np.clip(change.double().numpy(), -encoding.clip, encoding.clip), len(share))
        return inputs
    finally:
        torch.set_num_threads(threads)


def uniform(vector: np.ndarray) -> tuple[float, float]:
    """(mean / 2^32, chi-square of its top four bits over 16 bins): about (0.5, 15) for a uniform vector over Z_2^32."""
    counts = np.bincount((vector >> 28).astype(np.int64), minlength=16)
    expected = vector.size / 16
    return float(vector.astype(np.float64).mean() / FIELD), float(((counts - expected) ** 2 / expected).sum())


def assert_masked_inputs_hide_the_true_ones(attempt: Attempt, inputs: dict[str, Input]) -> None:
    """(b) Each masked vector is not the worker's true input and looks uniform over Z_2^32; the
    true input does not (the test would tell them apart)."""
    for worker, message in attempt.sent[MASKED].items():
        masked, true = message.tensors["masked"], inputs[worker].vector
        assert masked.shape == true.shape and masked.dtype == true.dtype == np.uint32
        assert (masked == true).mean() < 1e-4, f"{worker}'s masked input equals its true input in {(masked == true).sum()} coordinates"
        tolerance = max(0.01, 6 * (1 / 12 / masked.size) ** 0.5)  # six standard deviations of the mean of uniform values
        mean, chi2 = uniform(masked)
        assert abs(mean - 0.5) < tolerance and chi2 < CHI2_LIMIT, f"{worker}'s masked input is not uniform: mean {mean}, chi-square {chi2}"
        mean, chi2 = uniform(true)
        assert chi2 > CHI2_LIMIT, f"{worker}'s true input passes for uniform (chi-square {chi2}): the check above proves nothing"


def assert_the_sum_is_the_next_model(attempt: Attempt, inputs: dict[str, Input], names: list[str], next_model: dict) -> None:
    """The survivors' true inputs, added up and decoded, give the server's next global model (to
    float32's last bits): the masks cancelled exactly, and nothing else went in. That model is
    the sample-weighted mean of their (clipped) changes within the quantisation bound."""
    survivors = sorted(attempt.senders(MASKED))
    encoding = secagg.Encoding(attempt.secure["clip"], attempt.secure["max_samples"], len(attempt.secure["participants"]))
    aggregate = encoding.decode(secagg.plain_sum([inputs[worker].vector for worker in survivors]), len(survivors))
    current, following = flat(attempt.model, names).double(), flat(next_model, names).double()
    assert aggregate.samples == sum(inputs[worker].samples for worker in survivors)
    assert (current + torch.from_numpy(aggregate.mean_delta) - following).abs().max().item() < 1e-6
    exact = sum(torch.from_numpy(inputs[worker].change) * inputs[worker].samples for worker in survivors) / aggregate.samples
    error = (following - current - exact).abs().max().item()
    assert error <= encoding.bound(len(survivors), aggregate.samples) + 1e-6, f"round {attempt.round}: {error} off the weighted mean"


def next_model_of(attempts: dict[str, Attempt], round_number: int, checkpoint: Path) -> dict:
    """The global model after `round_number`: the one the next round sends, or after the last the checkpoint's."""
    later = [attempt for attempt in attempts.values() if attempt.round == round_number + 1]
    return later[0].model if later else {name: value.numpy() for name, value in load_file(str(checkpoint / "model.safetensors")).items()}


# -- the tests ------------------------------------------------------------------------------------

def test_the_server_receives_nothing_but_masked_inputs_and_the_shares_to_unmask_their_sum(traced_broker, session, tmp_path):
    """Proof on the wire: a server and 4 workers, every frame signed (key list), SecAgg+ with a
    sparse graph (k=2, t=2 among 4: each worker masks with two neighbours only). The firehose
    records every frame the broker routes into the server's queue. Evidence:
    (a) no `update` ever reaches it, nor any float tensor; the one thing of the model's size is a
        masked input, uint32;
    (b) each masked input is not the worker's true input and looks uniform over Z_2^32 (mean and
        chi-square of its top bits), while the true input, recomputed here from the model the
        worker was sent (its training repeated), does not; the true inputs, added up and decoded,
        are the server's next global model: it used their sum and only their sum;
    (c) for every worker and attempt the server got the shares of one of its two secrets, never
        both, and none of a survivor's mask key: it cannot unmask any one input;
    (d) the shares it forwards travel sealed: the share bytes it is later revealed appear in no
        sealed box, nor anywhere else before the reveal."""
    settings = FederatedSettings(dataset="digits", rounds=2, partition="iid", workers=4, model="tiny", lr=0.05, secure_aggregation="secagg+", secagg_neighbours=2,
                                 secagg_threshold=2)
    key_list = keys.generate(tmp_path / "keys", [SERVER, *worker_ids(settings.workers)])
    checkpoint, out = tmp_path / "ckpt", tmp_path / "result.json"
    run = FedAvgRun(broker=traced_broker.url, session=session, timeout=60, key_list=key_list, checkpoint_dir=checkpoint)
    server_launch, worker_launches = roles(settings, run, tmp_path)
    with traced_run(traced_broker, session, run, settings.workers, tmp_path / "parties") as (wire, group):
        members = [group.start(server_launch.with_deployment(out=out)), *(group.start(worker) for worker in worker_launches)]
        for member in members:
            group.wait(member, WAIT)
        wire.check()
        frames = wire.snapshot()
    result = json.loads(out.read_text())
    assert result["contributors"] == {"1": all_workers(settings), "2": all_workers(settings)}

    trusted = keys.KeyList.load(key_list)
    for frame in frames:  # what was recorded is what the parties signed
        assert trusted.verify(frame.message.sender, frame.message.sig, signed_bytes(frame.message, frame.body)), frame.message.kind
    task, names, parameters = parameters_of(settings)
    assert_only_the_protocol_reaches_the_server(frames, session, parameters)
    attempts = attempts_of(frames, session)
    assert sorted(attempt.round for attempt in attempts.values()) == [1, 2]
    for round_number in (1, 2):
        attempt = completed(attempts, round_number)
        assert (attempt.secure["neighbours"], attempt.secure["threshold"]) == (2, 2)
        for kind in SECURE_KINDS:
            assert attempt.senders(kind) == set(all_workers(settings)), (round_number, kind)
        inputs = true_inputs(settings, attempt, all_workers(settings))
        assert_masked_inputs_hide_the_true_ones(attempt, inputs)
        assert_the_sum_is_the_next_model(attempt, inputs, names, next_model_of(attempts, round_number, checkpoint))
    assert_no_secret_pair_is_revealed(attempts, [completed(attempts, 1), completed(attempts, 2)])
    assert_sealed_shares_are_opaque(frames, attempts)


def test_workers_killed_at_each_stage_are_left_out_or_unmasked_as_the_protocol_says(traced_broker, session, tmp_path):
    """Dropouts, one process per party: 6 workers, min_workers 3, a short round timeout, and a
    worker killed (SIGKILL) at each point of the protocol, as the firehose shows it there:
    - round 2, worker-0 right after its secagg-keys, while it trains, before it shares: it is left
      out (no shares of its secrets exist, nobody masks with it);
    - round 2, worker-1 right after its secagg-shares, before secagg-masked: the survivors reveal
      its mask key, the server takes out the masks they added for it, and it is left out;
    - round 3 (worker-0 and -1 no longer drawn), worker-2 right after its secagg-masked: its
      self mask is rebuilt from its neighbours' seed shares, so its input counts although it
      never reveals.
    Each round's new model is the weighted mean of exactly the contributors' true changes,
    recomputed here, within the quantisation bound; the wire checks of the first test hold too
    (now with a key share revealed, of the dropped worker only)."""
    settings = FederatedSettings(dataset="digits", rounds=3, partition="iid", workers=6, model="tiny", lr=0.05, secure_aggregation="secagg+")
    checkpoint, out = tmp_path / "ckpt", tmp_path / "result.json"
    run = FedAvgRun(broker=traced_broker.url, session=session, timeout=60, checkpoint_dir=checkpoint, min_workers=3, round_timeout=ROUND_TIMEOUT)
    server_launch, worker_launches = roles(settings, run, tmp_path)
    with traced_run(traced_broker, session, run, settings.workers, tmp_path / "parties") as (wire, group):
        server = group.start(server_launch.with_deployment(out=out))
        workers = {launch.name: group.start(launch) for launch in worker_launches}
        # Round 1: a worker's first training is slow (torch's lazy imports), slower on a loaded
        # machine than a stage deadline. The server is held from the moment it forwards the keys
        # until every worker has trained, so no deadline closes a stage on a live worker.
        wire.when(is_frame(NEIGHBOURS, 1), lambda frame: hold(server))
        wait_for(lambda: all(f"{name}: round 1 trained" in log_of(worker) for name, worker in workers.items()), "every worker's first training")
        release(server)
        # Round 2: the server is held once worker-0 (sent its model first) has it, so that no stage
        # goes on until worker-0 is dead: killed after its keys, it never gets their neighbours'.
        wire.when(is_frame(MODEL, 2, to=worker_queue(session, "worker-0")), lambda frame: hold(server))
        wire.when(is_frame(KEYS, 2, sender="worker-0"), lambda frame: (kill(workers["worker-0"]), release(server)))
        # No sealed shares go out before the shares stage's deadline (worker-0 is missing from it).
        wire.when(is_frame(SHARES, 2, sender="worker-1"), lambda frame: kill(workers["worker-1"]))
        # Round 3: held once it sends worker-2 (the first survivor) its sealed shares: no unmask
        # request goes out until worker-2, killed after its masked input, is dead.
        wire.when(is_frame(SEALED, 3, to=worker_queue(session, "worker-2")), lambda frame: hold(server))
        wire.when(is_frame(MASKED, 3, sender="worker-2"), lambda frame: (kill(workers["worker-2"]), release(server)))
        for member in (server, *(workers[name] for name in ("worker-3", "worker-4", "worker-5"))):
            group.wait(member, WAIT)
        wire.check()
        frames = wire.snapshot()

    result = json.loads(out.read_text())
    survivors = ["worker-2", "worker-3", "worker-4", "worker-5"]
    assert result["contributors"] == {"1": all_workers(settings), "2": survivors, "3": survivors}
    logged = log_of(server)
    assert "round 2: secure sum goes on without worker-0 (no secagg-shares)" in logged
    assert "round 2: secure sum goes on without worker-1 (no secagg-masked)" in logged
    assert "round 2: secure sum of 4 workers unmasked (1 dropped after sharing, 1 left before)" in logged

    task, names, parameters = parameters_of(settings)
    assert_only_the_protocol_reaches_the_server(frames, session, parameters)
    attempts = attempts_of(frames, session)
    assert sorted(attempt.round for attempt in attempts.values()) == [1, 2, 3], "a round was run again"
    second, third = completed(attempts, 2), completed(attempts, 3)
    # Each kill came where it was meant to, no later.
    assert [second.senders(kind) for kind in SECURE_KINDS] == [set(all_workers(settings)), {"worker-1", *survivors}, *[set(survivors)] * 3]
    assert third.secure["participants"] == survivors
    assert [third.senders(kind) for kind in SECURE_KINDS] == [set(survivors)] * 3 + [set(survivors) - {"worker-2"}] * 2
    assert second.unmask == {"survivors": survivors, "dropped": ["worker-1"]}
    assert third.unmask == {"survivors": survivors, "dropped": []}
    seeds, mask_keys = second.revealed()
    assert "worker-0" not in seeds and "worker-0" not in mask_keys  # nothing of it was ever shared
    assert len(mask_keys["worker-1"]) >= second.threshold  # its mask key, to take out the masks the survivors added for it
    seeds, mask_keys = third.revealed()
    assert len(seeds["worker-2"]) >= third.threshold and not mask_keys  # its self mask, from its neighbours' seed shares
    assert_no_secret_pair_is_revealed(attempts, [completed(attempts, 1), second, third])
    assert_sealed_shares_are_opaque(frames, attempts)
    for attempt in (second, third):
        inputs = true_inputs(settings, attempt, survivors)
        assert_masked_inputs_hide_the_true_ones(attempt, inputs)
        assert_the_sum_is_the_next_model(attempt, inputs, names, next_model_of(attempts, attempt.round, checkpoint))


CHECKPOINT_FILE = re.compile(r"state\.json|model\.safetensors|model-round-\d+(-calibrated)?\.safetensors|strategy-round-\d+\.safetensors")


def folder_contents(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def assert_nothing_of_an_update_is_kept(contents: dict[str, bytes], frames: list[Frame], attempts: dict[str, Attempt]) -> None:
    """A checkpoint holds the run's state and global models only: no file but those, no piece of
    any masked input or revealed share recorded on the wire, and a state.json with nothing of the
    secure sum in it (no attempt, key, share or mask)."""
    assert all(CHECKPOINT_FILE.fullmatch(name) for name in contents), sorted(contents)
    pieces = {share for attempt in attempts.values() for revealed in attempt.revealed() for owner in revealed.values() for share in owner.values()}
    for frame in frames:
        if frame.message.kind == MASKED:
            masked = frame.message.tensors["masked"].tobytes()
            pieces |= {masked[offset : offset + 32] for offset in range(0, len(masked) - 32, len(masked) // 8 & ~3)}
    assert pieces
    for name, content in contents.items():
        assert not any(piece in content for piece in pieces), f"{name} holds bytes of a masked input or a revealed share"
    state = json.loads(contents["state.json"])
    assert set(state) <= {f.name for f in dataclasses.fields(ServerState)}, sorted(state)

    def names_in(value: object) -> Iterator[str]:
        if isinstance(value, dict):
            for key, item in value.items():
                yield key
                yield from names_in(item)
        elif isinstance(value, list):
            for item in value:
                yield from names_in(item)

    progress = {key: value for key, value in state.items() if key != "run"}  # `run`: the session and learning settings it belongs to
    assert not [key for key in names_in(progress) if re.search("secagg|secure|attempt|mask|share|seed|key", key, re.IGNORECASE)]
    assert not [attempt for attempt in attempts if attempt in contents["state.json"].decode()]


def test_a_server_killed_mid_protocol_is_replaced_by_its_standby_then_by_a_restart(traced_broker, session, tmp_path):
    """Server failover in the middle of a secure sum. Server-a runs the rounds, server-b waits as
    standby; the workers run as threads here (only the servers are killed). Round 1: the moment
    server-a asks for the shares that unmask the sum (its first secagg-unmask on the wire), it is
    killed (SIGKILL): server-b takes over the round from the checkpoint, runs it again with fresh
    keys and goes on. Round 2: at its secagg-unmask server-b is
    killed in turn, and a server restarted on the same checkpoint folder resumes it. The final
    model equals the plain loop's (nothing lost, nothing applied twice), and the checkpoint folder,
    looked at the moment each server died and at the end, holds only the state and the global
    models: no byte of any masked input or revealed share, no secure-sum field in state.json."""
    settings = FederatedSettings(dataset="digits", rounds=2, partition="iid", workers=3, model="tiny", lr=0.05, secure_aggregation="secagg+")
    checkpoint, out = tmp_path / "ckpt", tmp_path / "result.json"
    run = FedAvgRun(broker=traced_broker.url, session=session, timeout=60, checkpoint_dir=checkpoint)
    server_launch, _ = roles(settings, run, tmp_path)
    share_settings = config.build(PartitionSettings, config.values_of(settings))
    transports: list[RabbitTransport] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # each worker thread trains as a one-thread worker process, as the plain loop compared with
    seen: dict[int, dict[str, bytes]] = {}  # round -> the checkpoint folder the moment its server died

    def start_worker(index: int) -> RoleThread:
        transports.append(RabbitTransport(traced_broker.url, name=f"worker-{index}-{session}"))
        deployment = WorkerDeployment(session=session, timeout=60, worker_id=f"worker-{index}", index=index)
        thread = RoleThread(f"worker-{index}", FedAvgWorker(share_settings, deployment, transports[-1], Identity()).run)
        thread.start()
        return thread

    def kill_in(round_number: int, victim: RoleProcess, held: RoleProcess | None = None) -> Callable[[Frame], None]:
        def action(frame: Frame) -> None:
            if held is not None:
                hold(held)  # the standby waits until the folder has been looked at
            kill(victim)
            seen[round_number] = folder_contents(checkpoint)
            if held is not None:
                release(held)
        return action

    try:
        with traced_run(traced_broker, session, run, settings.workers, tmp_path / "parties") as (wire, group):
            first = group.start(server_launch, name="server-a")
            wait_for(lambda: f"active for session {session} (epoch 1" in log_of(first), "server-a taking the lock", WAIT)
            standby = group.start(server_launch, name="server-b")
            wait_for(lambda: "standby: another fedavg-server holds session" in log_of(standby), "server-b waiting as standby", WAIT)
            wire.when(is_frame(UNMASK, 1, sender=SERVER), kill_in(1, first, held=standby))
            wire.when(is_frame(UNMASK, 2, sender=SERVER), kill_in(2, standby))
            workers = [start_worker(index) for index in range(settings.workers)]
            wire.wait(lambda frames: 2 in seen, "server-b reaching round 2's unmask request")
            restarted = group.start(server_launch.with_deployment(out=out), name="server-c")
            group.wait(restarted, WAIT)
            for worker in workers:
                worker.outcome(WAIT)  # each one finished, none failed
            wire.check()
            frames = wire.snapshot()
            final = folder_contents(checkpoint)
    finally:
        torch.set_num_threads(threads)
        for transport in transports:
            transport.close()

    assert f"active for session {session} (epoch 2, round 1)" in log_of(standby)
    assert "resumed from checkpoint: round 2" in log_of(restarted) and "(epoch 3, round 2)" in log_of(restarted)
    result = json.loads(out.read_text())
    assert [record["step"] for record in result["history"]] == [1, 2]
    assert result["contributors"] == {"1": all_workers(settings), "2": all_workers(settings)}
    assert_equals_reference(settings, checkpoint)

    attempts = attempts_of(frames, session)
    by_round = {round_number: [a for a in attempts.values() if a.round == round_number] for round_number in (1, 2)}
    for round_number, (killed, resumed) in by_round.items():  # two attempts each: the killed server's, then its successor's
        assert killed.unmask is not None and resumed.unmask is not None, round_number
        assert all(np.array_equal(killed.model[name], resumed.model[name]) for name in killed.model)  # the round's model, run again
        assert all(attempt.senders(MASKED) == set(all_workers(settings)) for attempt in (killed, resumed))
    # The server was killed after asking for the reveals and before the round was on disk.
    assert (json.loads(seen[1]["state.json"])["round"], json.loads(seen[2]["state.json"])["round"]) == (1, 2)
    assert set(seen[1]) == {"state.json", "model-round-1.safetensors"}
    assert set(seen[2]) == {"state.json", "model-round-2.safetensors", "model.safetensors"}
    assert set(final) == {"state.json", "model-round-3.safetensors", "model.safetensors"}
    for contents in (seen[1], seen[2], final):
        assert_nothing_of_an_update_is_kept(contents, frames, attempts)
    assert_only_the_protocol_reaches_the_server(frames, session, parameters_of(settings)[2])
    assert_no_secret_pair_is_revealed(attempts, [resumed for _, resumed in by_round.values()])
    assert_sealed_shares_are_opaque(frames, attempts)
