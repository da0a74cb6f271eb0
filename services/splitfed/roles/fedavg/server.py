"""fedavg-server: starts rounds, collects signed updates, aggregates, tests the global model.

Crash safety: accepted updates stay unacked in the durable queue until the round's aggregate and
checkpoint (checkpoints.py) are on disk; a restarted server resumes from the checkpoint and the
broker redelivers whatever it had not acked. An update is applied once: a second copy for the
same worker and round is a duplicate, a copy for an earlier round is stale.

High availability: any number of servers may start on one session; the one that holds the
session's lock (lease.py) runs the rounds, the others wait as standbys and touch nothing. When
the holder's connection ends (its process died), a standby takes the lock, resumes from the
newest checkpoint (a folder they share) and the broker hands it the updates the other had not
acked. Every takeover raises the checkpoint's epoch; a server that finds a newer epoch on disk
than its own has been replaced, and stops before writing.

Receiving runs on the roles' one loop (`Role.consume`): `Enrolment` until the run's workers
have joined, then one `Collection` per round (and one for the calibration's statistics).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import uuid
from dataclasses import dataclass

import numpy as np
import torch

from splitfed import config
from splitfed.learning import calibration, federated, strategies, train
from splitfed.learning.context import context_of
from splitfed.learning.settings import FederatedSettings
from splitfed.learning.tasks import Task
from splitfed.learning.train import EpochRecord
from splitfed.observability import metrics
from splitfed.protocol import Message, ProtocolError, TensorSpec, check_tensors
from splitfed.roles.base import LATER, Role
from splitfed.roles.declaration import Identity, Progress, ProgressSink
from splitfed.roles.endpoint import Endpoint, Rejection, RoleTimeout, frame_digest
from splitfed.roles.fedavg import admission
from splitfed.roles.fedavg.checkpoints import CheckpointStore, ServerState
from splitfed.roles.fedavg.common import (
    CALIBRATE, CONTROL, CONTROL_DELTA, DONE, JOIN, MODEL, RECIPE, REFUSED, SERVER, STATISTICS, UPDATE, WELCOME, WORKER, server_queue, to_wire, with_prefix,
    without_prefix, worker_queue,
)
from splitfed.roles.fedavg.lease import Lease
from splitfed.transport import Delivery, Transport, TransportError

log = logging.getLogger(__name__)


@dataclass
class Answer:
    """A worker's accepted answer in a collection, held unacked until its effect is on disk."""

    samples: int
    delivery: Delivery
    size: int  # bytes on the wire


@dataclass
class Update(Answer):
    """A worker's model after a round."""

    vector: torch.Tensor  # (P,) all parameters, flattened
    control_delta: torch.Tensor | None  # (P,) SCAFFOLD: the change of the worker's control variate
    train_loss: float


@dataclass
class Statistics(Answer):
    """A worker's feature statistics for the calibration."""

    statistics: calibration.ClassStatistics


# Settings a resumed run may change: how far it goes and how the global model is scored.
RESUMABLE_CHANGES = ("rounds", "data_dir", "eval_batch_size", "test_limit")


class FedAvgServer:
    def __init__(
        self, settings: FederatedSettings, deployment, transport: Transport, identity: Identity = Identity(),  # noqa: ANN001 (roles.fedavg.ServerDeployment)
        on_progress: ProgressSink | None = None,
    ):
        self.settings = settings
        self.deployment = deployment
        self.session = deployment.session
        self.quorum = deployment.min_workers or settings.workers
        self.strategy = strategies.from_settings(settings)
        self.recipe = self.strategy.recipe
        self.strategy_state: strategies.StrategyState = {}
        self.transport = transport
        self.task = Task(settings)
        self.context = context_of(settings, SERVER, SERVER)
        self.model = self.task.model(self.context)
        self.names = list(self.model.state_dict())
        self.specs = {name: TensorSpec("float32", tuple(value.shape)) for name, value in self.model.state_dict().items()}
        self.update_specs = {**self.specs, **(with_prefix(CONTROL_DELTA, self.specs) if self.recipe.control_variates else {})}
        self.statistics_specs = (  # a model that cannot be calibrated is refused here, before any round
            {name: TensorSpec("float32", shape) for name, shape in calibration.statistics_shapes(self.model, len(self.task.classes(self.context))).items()}
            if settings.calibration == "ccvr" else {}
        )
        model_bytes = sum(value.numel() * 4 for value in self.model.state_dict().values())
        statistics_bytes = sum(4 * math.prod(spec.shape) for spec in self.statistics_specs.values())  # a covariance per class: can outweigh the model
        self.test_data = federated.evaluation_data(self.task, self.context)
        self.endpoint = Endpoint(
            transport, session=self.session, role=SERVER, inbox=server_queue(self.session), timeout=deployment.timeout,
            max_message_bytes=max(2 * model_bytes, statistics_bytes) + 64 * 1024, signer=identity.signer, trusted=identity.trusted, ordered=False, durable=True,
            on_arrival=metrics.UPDATES.labels(SERVER, self.session, "received").inc, peer_roles=(WORKER,),
            handshake=(JOIN, REFUSED),  # they come before (or instead of) a place in the run
        )
        self.on_progress = on_progress
        fingerprint = {"session": self.session, **{k: v for k, v in config.values_of(settings).items() if k not in RESUMABLE_CHANGES}}
        self.store = CheckpointStore(deployment.checkpoint_dir, fingerprint)
        self.lease = Lease(transport, self.session, deployment.timeout)
        self.state = ServerState(run=fingerprint)
        self.store.saved()  # a checkpoint of another run is refused at once, not after a standby's wait; take_over loads it

    # -- standby and takeover -------------------------------------------------------------

    def take_over(self) -> None:
        """Wait as standby until this server holds the session's lock, then resume from the
        newest checkpoint (the last holder may have written many since this one started)."""
        metrics.SERVER_ACTIVE.labels(SERVER, self.session).set(0)
        self.lease.acquire()
        self.restore()
        self.state.run_id = self.state.run_id or uuid.uuid4().hex
        self.state.epoch += 1
        self.endpoint.bind(self.state.run_id)
        self.checkpoint(with_model=False)  # the new epoch on disk: a replaced server that wakes up finds it and stops
        metrics.SERVER_ACTIVE.labels(SERVER, self.session).set(1)
        log.info("fedavg-server active for session %s (epoch %d, round %d)", self.session, self.state.epoch, self.state.round)

    def ensure_in_charge(self) -> None:
        """Before writing: this server still holds the lock and no newer server has written a checkpoint."""
        self.lease.ensure_held()
        self.store.ensure_not_superseded(self.state, self.session)

    def restore(self) -> None:
        if (state := self.store.saved()) is None:
            return
        self.state = state
        self.model.load_state_dict(self.store.model(state))
        self.strategy_state = self.strategy.loaded_state(self.store.strategy_tensors(state))
        log.info("resumed from checkpoint: round %d, workers %s", self.state.round, ", ".join(self.state.workers))

    def checkpoint(self, with_model: bool) -> None:
        """The state, and with_model the global model for the round about to run, on disk. A
        write that fails (a full disk) stops the server and leaves the last complete checkpoint."""
        self.ensure_in_charge()
        self.store.write(self.state, self.model.state_dict(), self.strategy_state, with_model)

    # -- the run --------------------------------------------------------------------------

    def run(self) -> dict:
        self.take_over()
        started = time.perf_counter()
        if not self.state.history and self.state.round == 1:
            Enrolment(self).consume()  # a resumed server knows its workers from the checkpoint
            log.info("%d workers joined: %s", len(self.state.workers), ", ".join(self.state.workers))
        while self.state.round <= self.settings.rounds:
            self.run_round()
        if self.settings.calibration == "ccvr" and not self.state.calibrated():
            self.calibrate()
        self.ensure_in_charge()
        for worker in self.state.workers:
            try:
                self.endpoint.send_message(worker_queue(self.session, worker), Message(DONE, "", "", round=self.state.round), to=worker, persistent=True)
            except TransportError as exc:  # a server that takes over a finished run finds the workers gone
                log.info("done not delivered to %s: %s", worker, exc)
        log.info("fedavg-server done: %d rounds", self.settings.rounds)
        final = self.state.calibration or self.state.history[-1]  # the model the run leaves
        return {
            "accuracy": final["accuracy"], "loss": final["loss"], "wall_seconds": time.perf_counter() - started,
            "history": self.state.history, "traffic": vars(self.endpoint.traffic),
            "contributors": self.state.contributors, **({"calibration": self.state.calibration} if self.state.calibration else {}),
        }

    # -- admission ------------------------------------------------------------------------

    def check_join(self, message: Message) -> None:
        if message.kind == JOIN:
            admission.check_join(self.state, message, self.settings.workers, anyone_may_join=self.endpoint.trusted is None)

    def join(self, message: Message, digest: str, send_model: bool) -> None:
        """Admit (or re-admit) the sender of a join that passed `check_join`, on disk before it
        is welcomed; the welcome names the join it answers by its digest."""
        worker = message.sender
        admission.admit(self.state, message)
        self.checkpoint(with_model=False)
        metrics.ACTIVE_WORKERS.labels(SERVER, self.session).set(len(self.state.workers))
        metrics.WORKER_MISSED_ROUNDS.labels(SERVER, self.session, worker).set(0)
        log.info("worker %s joined (round %d)", worker, self.state.round)
        queue = worker_queue(self.session, worker)
        self.transport.declare(queue, durable=True)
        # bound: it names the run. `sampled`: this worker may wait many rounds for a turn.
        welcome = Message(WELCOME, "", "", round=self.state.round, meta={"ref": digest, "sampled": self.settings.samples_clients()})
        self.endpoint.send_message(queue, welcome, to=worker, persistent=True)
        if send_model:
            self.send_models([worker])

    def refuse(self, rejection: Rejection) -> None:
        """Tell a worker whose join was refused why, in the queue it listens on. The server never
        creates that queue: a refused party gets no queue, no model and at most one message per
        join it sent."""
        if (refusal := admission.refusal(rejection)) is None:
            return
        sender = rejection.message.sender
        log.error("refused worker %r: %s: %s", sender, rejection.reason, rejection.detail)
        try:
            self.endpoint.send_message(worker_queue(self.session, sender), refusal, persistent=True, must_exist=True)
        except TransportError as exc:  # nobody listens under that name: nothing to tell
            log.info("refusal for %r not delivered: %s", sender, exc)

    # -- rounds ---------------------------------------------------------------------------

    def model_tensors(self) -> dict:
        """What every worker is sent this round: the global model, and SCAFFOLD's control."""
        tensors = to_wire(self.model.state_dict())
        if self.recipe.control_variates:
            current = strategies.flatten(self.model.state_dict(), self.names)
            control = self.strategy.control(current, self.strategy_state)
            tensors.update(to_wire(with_prefix(CONTROL, strategies.unflatten(control, self.model.state_dict(), self.names))))
        return tensors

    def send_models(self, workers: list[str]) -> None:
        """This round's model and the strategy's local recipe to each of `workers`, serialised
        once for all of them; after the last round, the final model to calibrate on."""
        if self.state.round > self.settings.rounds:
            kind, meta, tensors = CALIBRATE, {}, to_wire(self.model.state_dict())
        else:
            kind, meta, tensors = MODEL, {RECIPE: dataclasses.asdict(self.recipe)}, self.model_tensors()
        batch = [(worker_queue(self.session, worker), Message(kind, "", "", round=self.state.round, meta=dict(meta), tensors=tensors), worker) for worker in workers]
        self.endpoint.send_messages(batch, persistent=True)

    def sample(self) -> list[str]:
        """This round's workers: all that have not missed their last round, or with client
        sampling a seeded draw from them, drawn once per round. It needs no write of its own:
        until the next checkpoint (which holds it) it is a function of the last one, so a
        server that restarts before then draws the same workers again."""
        if self.state.sampled_round != self.state.round:
            missed = set(self.state.missed)
            candidates = [worker for worker in self.state.workers if worker not in missed]
            size = self.settings.round_sample_size(len(self.state.workers))
            self.state.sampled = federated.sample_workers(candidates, size, self.settings.seed, self.state.round)
            self.state.sampled_round = self.state.round
        return self.state.sampled

    def run_round(self) -> None:
        round_number = self.state.round
        started = time.perf_counter()
        metrics.ROUND.labels(SERVER, self.session).set(round_number)
        sampled = self.sample()
        metrics.SAMPLED_WORKERS.labels(SERVER, self.session).set(len(sampled))
        # Without sampling, workers that missed a round are still sent every model, so a slow
        # one comes back by itself; with it, only the sampled are (the rest wait for a turn).
        recipients = sampled if self.settings.samples_clients() else self.state.workers
        self.send_models(recipients)
        # In a fixed order, not arrival order: the same updates always sum to the same bits.
        updates: dict[str, Update] = dict(sorted(self.collect(set(sampled), UPDATE).items()))
        vectors = torch.stack([u.vector for u in updates.values()])  # (K, P)
        weights = torch.tensor([float(u.samples) for u in updates.values()])
        current = strategies.flatten(self.model.state_dict(), self.names)  # (P,)
        combined, self.strategy_state = self.strategy.step(current, vectors, weights, self.strategy_state)  # (P,)
        if self.recipe.control_variates:
            control_deltas = torch.stack([u.control_delta for u in updates.values()])  # (K, P)
            self.strategy_state = self.strategy.next_control(control_deltas, len(self.state.workers), self.strategy_state)
        self.model.load_state_dict(strategies.unflatten(combined, self.model.state_dict(), self.names))
        self.model.eval()
        evaluation = train.evaluate(self.model, self.test_data, self.settings.eval_batch_size)
        record = EpochRecord(round_number, evaluation.accuracy, evaluation.loss, sum(u.train_loss for u in updates.values()) / len(updates), time.perf_counter() - started)
        self.state.history.append({**vars(record), "workers": sorted(updates)})
        self.state.contributors[str(round_number)] = sorted(updates)
        self.state.round += 1
        # Not sampled again (nor waited for) until heard from: a late update or a join.
        self.state.missed = sorted((set(self.state.missed) | set(sampled)) - set(updates))
        if absent := sorted(set(sampled) - set(updates)):
            log.warning("round %d closed without %s", round_number, ", ".join(absent))
        self.checkpoint(with_model=True)
        for update in updates.values():  # only now is the update's effect on disk
            self.endpoint.ack(update.delivery)
        self._round_metrics(record, updates, sampled)
        if self.on_progress:
            self.on_progress(Progress("round", round_number, self.settings.rounds, record.train_loss, vars(record)))
        log.info("round %d: test accuracy %.4f, test loss %.4f, %d updates, %.1fs", round_number, record.accuracy, record.loss, len(updates), record.seconds)

    def calibrate(self) -> None:
        """CCVR after the last round: every worker not given up on sends the feature statistics of
        its share under the final model, and the last layer is retrained on them. As updates, the
        statistics stay unacked until the calibrated model is on disk: a server restarted
        meanwhile gets them again and calibrates the same way."""
        missed = set(self.state.missed)
        self.state.sampled = [worker for worker in self.state.workers if worker not in missed]
        self.state.sampled_round = self.state.round
        self.send_models(self.state.sampled)
        answers: dict[str, Statistics] = dict(sorted(self.collect(set(self.state.sampled), STATISTICS).items()))  # pooled in a fixed order
        record = federated.calibrate(self.model, [answer.statistics for answer in answers.values()], self.settings, self.test_data)
        self.state.calibration = {**vars(record), "round": self.state.round, "workers": sorted(answers)}
        self.checkpoint(with_model=True)
        for answer in answers.values():
            self.endpoint.ack(answer.delivery)
        metrics.TEST_ACCURACY.labels(SERVER, self.session).set(record.accuracy)
        metrics.TEST_LOSS.labels(SERVER, self.session).set(record.loss)
        if self.on_progress:
            self.on_progress(Progress("calibration", 1, 1, record.train_loss, vars(record)))
        log.info("calibrated (ccvr) on the statistics of %d workers: test accuracy %.4f, test loss %.4f", len(answers), record.accuracy, record.loss)

    def _round_metrics(self, record: EpochRecord, updates: dict[str, Update], sampled: list[str]) -> None:
        session = self.session
        metrics.TEST_ACCURACY.labels(SERVER, session).set(record.accuracy)
        metrics.TEST_LOSS.labels(SERVER, session).set(record.loss)
        metrics.TRAIN_LOSS.labels(SERVER, session).set(record.train_loss)
        metrics.ROUND_SECONDS.labels(SERVER, session).observe(record.seconds)
        metrics.ROUND_BYTES.labels(SERVER, session).set(sum(u.size for u in updates.values()))
        metrics.ACTIVE_WORKERS.labels(SERVER, session).set(len(self.state.workers) - len(self.state.missed))
        for worker in sampled:  # the others had no round to miss
            missed = metrics.WORKER_MISSED_ROUNDS.labels(SERVER, session, worker)
            missed.set(0) if worker in updates else missed.inc()

    def collect(self, expected: set[str], kind: str) -> dict[str, Answer]:
        collection = Collection(self, kind, expected)
        collection.consume()
        return collection.answers

    def answer_of(self, message: Message, delivery: Delivery) -> Answer:
        """The record of an update or of statistics that passed the collection's checks."""
        tensors = {name: torch.from_numpy(array) for name, array in message.tensors.items()}
        samples, size = message.meta["samples"], len(delivery.body)
        if message.kind == STATISTICS:
            return Statistics(samples, delivery, size, calibration.ClassStatistics.from_tensors(tensors))
        control_delta = strategies.flatten(without_prefix(CONTROL_DELTA, tensors), self.names) if self.recipe.control_variates else None
        return Update(samples, delivery, size, strategies.flatten(tensors, self.names), control_delta, float(message.meta["train_loss"]))


class Enrolment(Role):
    """Until every expected worker has joined: joins are checked, admitted and welcomed; the
    run gives up `timeout` after it began once a join finds places still free."""

    def __init__(self, server: FedAvgServer):
        self.server = server
        self.endpoint = server.endpoint
        self.give_up = time.monotonic() + server.deployment.timeout
        self.finished = self.joined()

    def joined(self) -> bool:
        return len(self.server.state.workers) >= self.server.settings.workers

    def expecting(self) -> tuple[tuple[str, ...], None]:
        return (JOIN,), None

    def check(self, message: Message) -> None:
        self.server.check_join(message)

    def on_reject(self, rejection: Rejection) -> None:
        self.server.refuse(rejection)

    def handle(self, message: Message, delivery: Delivery) -> None:
        self.server.join(message, frame_digest(delivery.body), send_model=False)
        self.finished = self.joined()

    def on_deadline(self) -> None:
        if not self.finished and time.monotonic() > self.give_up:
            raise RoleTimeout(f"only {len(self.server.state.workers)} of {self.server.settings.workers} workers joined")


class Collection(Role):
    """One round's updates (or, `kind` STATISTICS, the calibration's feature statistics) from the
    sampled workers, until every expected one sent one, or the round timeout has passed with at
    least `min_workers` of them; the run gives up `timeout` after the collection began. Joins are
    answered on the way; one from a sampled worker (restarted mid-round) gets this round's model.
    Each answer stays unacked (LATER) until the server has its effect on disk."""

    def __init__(self, server: FedAvgServer, kind: str, expected: set[str]):
        self.server = server
        self.endpoint = server.endpoint
        self.kind = kind
        self.expected = expected
        self.sampled = set(server.state.sampled)
        self.quorum = min(server.quorum, len(self.sampled))
        self.answers: dict[str, Answer] = {}
        self.round_deadline = time.monotonic() + server.deployment.round_timeout
        self.give_up = time.monotonic() + server.deployment.timeout
        self.on_deadline()

    def expecting(self) -> tuple[tuple[str, ...], None]:
        return (JOIN, self.kind), None

    def check(self, message: Message) -> None:
        server, state = self.server, self.server.state
        server.check_join(message)
        if message.kind != self.kind:
            return
        if not state.is_member(message.sender):
            raise ProtocolError("sender", f"update from {message.sender!r}, which has not joined")
        if message.round < state.round:
            if message.sender in state.contributors.get(str(message.round), ()):
                raise ProtocolError("duplicate", f"update for round {message.round} from {message.sender} was applied already")
            if message.sender in state.missed:  # alive after all, only slow: wait for it next round
                state.missed.remove(message.sender)
                metrics.WORKER_MISSED_ROUNDS.labels(SERVER, server.session, message.sender).set(0)
            raise ProtocolError("stale", f"update for round {message.round} from {message.sender}, now in round {state.round}")
        if message.round > state.round:
            raise ProtocolError("out-of-order", f"update for future round {message.round} from {message.sender}")
        if message.sender not in self.sampled and server.settings.samples_clients():  # without sampling every member is sent the model
            raise ProtocolError("unsampled", f"update for round {message.round} from {message.sender}, which was not sampled for it")
        check_tensors(message, server.update_specs if self.kind == UPDATE else server.statistics_specs)
        samples, loss = message.meta.get("samples"), message.meta.get("train_loss")
        listed = self.endpoint.trusted.max_samples(message.sender) if self.endpoint.trusted else None
        ceiling = min(server.deployment.max_samples, listed or server.deployment.max_samples)
        if not isinstance(samples, int) or isinstance(samples, bool) or not 0 < samples <= ceiling:
            raise ProtocolError("value", f"update from {message.sender} reports samples={samples!r} (at most {ceiling})")
        if self.kind == UPDATE and not _finite_number(loss):
            raise ProtocolError("value", f"update from {message.sender} reports train_loss={loss!r:.40}")
        if self.kind == STATISTICS:
            _check_class_counts(message.tensors["class_counts"], samples, message.sender)

    def on_reject(self, rejection: Rejection) -> None:
        self.server.refuse(rejection)

    def handle(self, message: Message, delivery: Delivery) -> str | None:
        if message.kind == JOIN:
            # Without sampling a newcomer takes part at once; with it, it waits to be drawn.
            takes_part = message.sender in self.sampled or not self.server.settings.samples_clients()
            if takes_part and message.sender not in self.sampled:
                self.sampled.add(message.sender)
                self.expected.add(message.sender)
                self.server.state.sampled = sorted(self.sampled)
            self.server.join(message, frame_digest(delivery.body), send_model=takes_part)
            return None
        if (first := self.answers.get(message.sender)) is not None:
            # A second copy for this round, e.g. redelivered after a reconnect made the first
            # one's ack impossible: hold the newer delivery, so the answer stays in the queue
            # until the round is on disk, and let the first one go.
            self.endpoint.rejected("duplicate", f"second update for round {message.round} from {message.sender}")
            self.endpoint.ack(first.delivery)
            first.delivery = delivery
            return LATER
        self.answers[message.sender] = self.server.answer_of(message, delivery)
        metrics.UPDATES.labels(SERVER, self.server.session, "accepted").inc()
        return LATER

    def next_deadline(self) -> float:
        return self.round_deadline if time.monotonic() < self.round_deadline else self.give_up

    def on_deadline(self) -> None:
        now = time.monotonic()
        if self.expected <= set(self.answers) or (now >= self.round_deadline and len(self.answers) >= self.quorum):
            self.finished = True
        elif now >= self.give_up:
            raise RoleTimeout(f"round {self.server.state.round}: {len(self.answers)} updates, fewer than the {self.quorum} needed")

    def on_silence(self, seconds: float) -> None:
        """Silence as long as `timeout` means the collection's own give-up time has passed too."""
        self.on_deadline()


def _check_class_counts(counts: np.ndarray, samples: int, sender: str) -> None:
    """A worker's class counts are whole, non-negative and add up to the samples it reports (a
    count is the weight of its statistics in the pooled Gaussians)."""
    if (counts < 0).any() or (counts != counts.round()).any() or int(counts.sum()) != samples:
        raise ProtocolError("value", f"statistics from {sender}: class counts are not whole, non-negative numbers adding up to samples={samples}")


def _finite_number(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an int too large for a float
        return False
