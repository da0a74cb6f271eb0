"""fedavg-server: starts rounds, collects signed updates, aggregates, tests the global model.

Crash safety: accepted updates stay unacked in the durable queue until the round's aggregate and
checkpoint are on disk; a restarted server resumes from the checkpoint and the broker redelivers
whatever it had not acked. An update is applied once: a second copy for the same worker and
round is a duplicate, a copy for an earlier round is stale.

High availability: any number of servers may start on one session; the one that holds the
session's lock (an exclusive queue on the broker, `Transport.hold`) runs the rounds, the others
wait as standbys and touch nothing. When the holder's connection ends (its process died), a
standby takes the lock, resumes from the newest checkpoint (a folder they share) and the broker
hands it the updates the other had not acked. Every takeover raises the checkpoint's epoch; a
server that finds a newer epoch on disk than its own has been replaced, and stops before writing.
"""

from __future__ import annotations

import bisect
import json
import logging
import math
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save

from splitfed import config
from splitfed.learning import calibration, data, federated, models, strategies, train
from splitfed.learning.settings import FederatedSettings
from splitfed.learning.train import EpochRecord
from splitfed.observability import metrics
from splitfed.protocol import Message, ProtocolError, TensorSpec, check_tensors
from splitfed.roles.declaration import Identity, Progress, ProgressSink
from splitfed.roles.fedavg import WORKER, CheckpointError
from splitfed.roles.endpoint import Endpoint, Rejection, RoleTimeout, frame_digest, queue_name
from splitfed.roles.fedavg.common import (
    CALIBRATE, CONTROL, CONTROL_DELTA, DONE, JOIN, MODEL, REFUSED, SERVER, STATISTICS, UPDATE, WELCOME, WORKER_ID, server_queue, to_wire,
    with_prefix, without_prefix, worker_queue,
)
from splitfed.transport import Delivery, Transport, TransportError

log = logging.getLogger(__name__)

@dataclass
class Update:
    """A worker's accepted answer: its model after a round (an update), or its feature
    statistics for the calibration."""

    vector: torch.Tensor | None  # (P,) all parameters, flattened
    control_delta: torch.Tensor | None  # (P,) SCAFFOLD: the change of the worker's control variate
    samples: int
    train_loss: float
    delivery: Delivery
    size: int
    statistics: calibration.ClassStatistics | None = None


@dataclass
class ServerState:
    """What a restarted server needs, written to `state.json` beside `model.safetensors`."""

    round: int = 1  # the round being collected
    workers: list[str] = field(default_factory=list)  # joined; each is sent every round's model
    # Workers that missed a round and have not been heard from since: no round waits for them
    # (a dead worker would stall every round); a late update or a new join brings them back.
    missed: list[str] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)
    contributors: dict[str, list[str]] = field(default_factory=dict)  # round -> workers applied
    # The nonces of the joins each worker was admitted with: a replayed join is refused, while a
    # restarted worker, which joins with a new nonce, gets the current model.
    join_nonces: dict[str, list[str]] = field(default_factory=dict)
    run: dict = field(default_factory=dict)  # what the checkpoint belongs to: session and learning settings
    # This run's id, fixed at its start and kept across restarts: every message of the run names
    # it (and its recipient) under the signature, so frames recorded in an earlier run with the
    # same session are refused as `replay`.
    run_id: str = ""
    epoch: int = 0  # takeovers so far: the server that wrote the highest one is the one in charge
    # The workers drawn for `sampled_round` (with --clients-per-round or --fraction), kept so a
    # server that resumes mid-round waits for the same ones even if others joined since.
    sampled: list[str] = field(default_factory=list)
    sampled_round: int = 0
    # With --calibration ccvr, once done: the record of the calibrated model, with the `round`
    # it calibrated (the round after the last) and the `workers` whose statistics it pooled.
    calibration: dict = field(default_factory=dict)


# Settings a resumed run may change: how far it goes and how the global model is scored.
RESUMABLE_CHANGES = ("rounds", "data_dir", "eval_batch_size", "test_limit")


JOIN_NONCES_KEPT = 16
NONCE = re.compile(r"[0-9a-f]{32}")
STANDBY_POLL = 1.0  # seconds between a standby's tries for the lock (AMQP says nothing when a queue goes)


class Superseded(CheckpointError):
    """Another server took over this session: this one must not write or send anything more."""


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
        self.transport = transport
        self.meta = data.info(settings.dataset)
        self.model = models.build(settings.model, self.meta, settings.seed)
        self.names = list(self.model.state_dict())
        self.specs = {name: TensorSpec("float32", tuple(value.shape)) for name, value in self.model.state_dict().items()}
        self.update_specs = {**self.specs, **(with_prefix(CONTROL_DELTA, self.specs) if self.strategy.control_variates else {})}
        self.statistics_specs = (  # a model that cannot be calibrated is refused here, before any round
            {name: TensorSpec("float32", shape) for name, shape in calibration.statistics_shapes(self.model, self.meta.classes).items()}
            if settings.calibration == "ccvr" else {}
        )
        model_bytes = sum(value.numel() * 4 for value in self.model.state_dict().values())
        statistics_bytes = sum(4 * math.prod(spec.shape) for spec in self.statistics_specs.values())  # a covariance per class: can outweigh the model
        self.test_data = federated.evaluation_data(settings)
        self.endpoint = Endpoint(
            transport, session=self.session, role=SERVER, inbox=server_queue(self.session), timeout=deployment.timeout,
            max_message_bytes=max(2 * model_bytes, statistics_bytes) + 64 * 1024, signer=identity.signer, trusted=identity.trusted, ordered=False, durable=True,
            on_arrival=metrics.UPDATES.labels(SERVER, self.session, "received").inc, peer_roles=(WORKER,),
            handshake=(JOIN, REFUSED),  # they come before (or instead of) a place in the run
        )
        self.checkpoint_dir: Path | None = deployment.checkpoint_dir
        self.on_progress = on_progress
        self.fingerprint = {"session": self.session, **{k: v for k, v in config.values_of(settings).items() if k not in RESUMABLE_CHANGES}}
        self.state = ServerState(run=self.fingerprint)
        self.lock = queue_name(self.session, SERVER, "lock")
        self.saved_state()  # a checkpoint of another run is refused at once, not after a standby's wait; take_over loads it

    # -- standby and takeover -------------------------------------------------------------

    def take_over(self) -> None:
        """Wait as standby until this server holds the session's lock, then resume from the
        newest checkpoint (the last holder may have written many since this one started)."""
        metrics.SERVER_ACTIVE.labels(SERVER, self.session).set(0)
        told = -math.inf
        while not self.transport.hold(self.lock):
            if time.monotonic() - told >= 60:
                log.info("standby: another fedavg-server holds session %s; taking over when it stops", self.session)
                told = time.monotonic()
            time.sleep(STANDBY_POLL)
        self.restore()
        self.state.run_id = self.state.run_id or uuid.uuid4().hex
        self.state.epoch += 1
        self.endpoint.bind(self.state.run_id)
        self.checkpoint(with_model=False)  # the new epoch on disk: a replaced server that wakes up finds it and stops
        metrics.SERVER_ACTIVE.labels(SERVER, self.session).set(1)
        log.info("fedavg-server active for session %s (epoch %d, round %d)", self.session, self.state.epoch, self.state.round)

    def ensure_in_charge(self) -> None:
        """Before writing: this server still holds the lock (waiting for a lost connection to come
        back with it) and no newer server has written a checkpoint."""
        if not self.transport.holds(self.lock, self.deployment.timeout):
            raise RoleTimeout(f"the broker connection did not come back within {self.deployment.timeout:.0f}s")
        if self.checkpoint_dir and (self.checkpoint_dir / "state.json").exists():
            epoch = json.loads((self.checkpoint_dir / "state.json").read_text()).get("epoch", 0)
            if epoch > self.state.epoch:
                raise Superseded(f"another fedavg-server took over session {self.session} (epoch {epoch}, this one {self.state.epoch})")

    # -- checkpoints ----------------------------------------------------------------------

    def saved_state(self) -> ServerState | None:
        """The checkpoint's state (None without one); CheckpointError if it belongs to another run."""
        if not self.checkpoint_dir or not (self.checkpoint_dir / "state.json").exists():
            return None
        state = ServerState(**json.loads((self.checkpoint_dir / "state.json").read_text()))
        if state.run != self.fingerprint:
            differing = sorted(key for key in {*state.run, *self.fingerprint} if state.run.get(key) != self.fingerprint.get(key))
            shown = ", ".join(f"{key} {state.run.get(key)!r} there, {self.fingerprint.get(key)!r} here" for key in differing[:4])
            raise CheckpointError(f"the checkpoint in {self.checkpoint_dir} belongs to another run ({shown}): use another --checkpoint-dir")
        return state

    def restore(self) -> None:
        if (state := self.saved_state()) is None:
            return
        self.state = state
        # Our own files, written before the state that names them: never bytes from the network.
        self.model.load_state_dict(load_file(str(self.checkpoint_dir / self.model_file(self.state.round, self.calibrated()))))
        strategy_file = self.checkpoint_dir / self.strategy_file(self.state.round)
        self.strategy.load_state(load_file(str(strategy_file)) if strategy_file.exists() else {})
        log.info("resumed from checkpoint: round %d, workers %s", self.state.round, ", ".join(self.state.workers))

    @staticmethod
    def model_file(round_number: int, calibrated: bool = False) -> str:
        return f"model-round-{round_number}{'-calibrated' if calibrated else ''}.safetensors"

    def calibrated(self) -> bool:
        """Whether the model in hand is the calibrated one (the rounds are over and CCVR ran)."""
        return self.state.calibration.get("round") == self.state.round

    @staticmethod
    def strategy_file(round_number: int) -> str:
        return f"strategy-round-{round_number}.safetensors"

    def checkpoint(self, with_model: bool) -> None:
        """Write the global model for the round about to run, then atomically replace state.json,
        which names it: a crash at any point leaves a state and the model it refers to. A write
        that fails (a full disk) stops the server and leaves the last complete checkpoint."""
        self.ensure_in_charge()
        if not self.checkpoint_dir:
            return
        try:
            self._write_checkpoint(with_model)
        except OSError as exc:
            raise CheckpointError(
                f"cannot write the checkpoint in {self.checkpoint_dir}: {exc.strerror or exc}; the last complete checkpoint is intact"
            ) from None

    def _write_checkpoint(self, with_model: bool) -> None:
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        current = self.checkpoint_dir / self.model_file(self.state.round, self.calibrated())
        strategy = self.checkpoint_dir / self.strategy_file(self.state.round)
        model = save({k: v.contiguous() for k, v in self.model.state_dict().items()}) if with_model or not current.exists() else None
        if model is not None:
            _atomic(current, model)
            # The strategy's state (momentum, moments, control variate) belongs to this model.
            if state := self.strategy.state():
                _atomic(strategy, save({k: v.contiguous() for k, v in state.items()}))
        _atomic(self.checkpoint_dir / "state.json", json.dumps(vars(self.state)).encode())
        # Only the previous round's files, which this server wrote: nothing else in the folder.
        for old in (self.model_file(self.state.round - 1), self.model_file(self.state.round - 1, True), self.strategy_file(self.state.round - 1)):
            (self.checkpoint_dir / old).unlink(missing_ok=True)
        latest = self.checkpoint_dir / "model.safetensors"  # the newest global model, for people and tools
        if with_model and model is not None:
            _atomic(latest, model)

    # -- the run --------------------------------------------------------------------------

    def run(self) -> dict:
        self.take_over()
        started = time.perf_counter()
        if not self.state.history and self.state.round == 1:
            self.wait_for_workers()  # a resumed server knows its workers from the checkpoint
        while self.state.round <= self.settings.rounds:
            self.run_round()
        if self.settings.calibration == "ccvr" and not self.calibrated():
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

    def wait_for_workers(self) -> None:
        """Until every expected worker has joined (a resumed server already knows them)."""
        deadline = time.monotonic() + self.deployment.timeout
        while len(self.state.workers) < self.settings.workers:
            if time.monotonic() > deadline:
                raise RoleTimeout(f"only {len(self.state.workers)} of {self.settings.workers} workers joined")
            message, delivery = self.endpoint.receive((JOIN,), None, self.check_join, self.refuse)
            self.join(message, frame_digest(delivery.body), send_model=False)
            self.endpoint.ack(delivery)
        log.info("%d workers joined: %s", len(self.state.workers), ", ".join(self.state.workers))

    def check_join(self, message: Message) -> None:
        """A join must name a worker, carry a fresh nonce, and (without a key list, where anyone
        can join) find a free place among the `--workers` the run was set up for."""
        if message.kind != JOIN:
            return
        worker, nonce = message.sender, message.meta.get("nonce")
        if not WORKER_ID.fullmatch(worker):
            raise ProtocolError("sender", f"worker id {worker[:80]!r} is not a valid name")
        if not isinstance(nonce, str) or not NONCE.fullmatch(nonce):
            raise ProtocolError("value", f"join from {worker} carries no valid nonce")
        if nonce in self.state.join_nonces.get(worker, ()):
            raise ProtocolError("replay", f"join from {worker} was seen before (nonce {nonce})")
        if self.endpoint.trusted is None and not self.is_member(worker) and len(self.state.workers) >= self.settings.workers:
            raise ProtocolError("full", f"{worker} cannot join: all {self.settings.workers} places are taken")

    def join(self, message: Message, digest: str, send_model: bool) -> None:
        """Admit (or re-admit) the sender of a join that passed `check_join`; the welcome names
        the join it answers by its digest."""
        worker = message.sender
        self.state.join_nonces[worker] = [*self.state.join_nonces.get(worker, ()), message.meta["nonce"]][-JOIN_NONCES_KEPT:]
        if not self.is_member(worker):
            bisect.insort(self.state.workers, worker)  # kept sorted: a join costs log N, not N log N
        self.state.missed = [w for w in self.state.missed if w != worker]
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

    def is_member(self, worker: str) -> bool:
        at = bisect.bisect_left(self.state.workers, worker)
        return at < len(self.state.workers) and self.state.workers[at] == worker

    def refuse(self, rejection: Rejection) -> None:
        """Tell a worker whose join was refused why, in the queue it listens on (it checks `ref`).
        The server never creates that queue: a refused party gets no queue, no model and at most
        one message per join it sent; a replayed join gets nothing."""
        message = rejection.message
        if message is None or message.kind != JOIN or rejection.reason == "replay" or not WORKER_ID.fullmatch(message.sender):
            return
        log.error("refused worker %r: %s: %s", message.sender, rejection.reason, rejection.detail)
        refusal = Message(REFUSED, "", "", meta={"reason": rejection.reason, "detail": rejection.detail, "ref": rejection.digest})
        try:
            self.endpoint.send_message(worker_queue(self.session, message.sender), refusal, persistent=True, must_exist=True)
        except TransportError as exc:  # nobody listens under that name: nothing to tell
            log.info("refusal for %r not delivered: %s", message.sender, exc)

    def model_tensors(self) -> dict:
        """What every worker is sent this round: the global model, and SCAFFOLD's control."""
        tensors = to_wire(self.model.state_dict())
        if self.strategy.control_variates:
            current = strategies.flatten(self.model.state_dict(), self.names)
            tensors.update(to_wire(with_prefix(CONTROL, strategies.unflatten(self.strategy.control(current), self.model.state_dict(), self.names))))
        return tensors

    def send_models(self, workers: list[str]) -> None:
        """This round's model to each of `workers`, serialised once for all of them; after the
        last round, the final model to calibrate on."""
        if self.state.round > self.settings.rounds:
            kind, meta, tensors = CALIBRATE, {}, to_wire(self.model.state_dict())
        else:
            kind, tensors = MODEL, self.model_tensors()
            meta = {"prox_mu": self.strategy.local_prox_mu, "absent_scale": self.strategy.local_absent_scale,
                    "frozen_head": self.strategy.local_frozen_head, "calibration_tau": self.strategy.local_calibration_tau}
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
        updates = dict(sorted(self.collect(set(sampled)).items()))
        vectors = torch.stack([u.vector for u in updates.values()])  # (K, P)
        weights = torch.tensor([float(u.samples) for u in updates.values()])
        current = strategies.flatten(self.model.state_dict(), self.names)  # (P,)
        combined = self.strategy.step(current, vectors, weights)  # (P,)
        if self.strategy.control_variates:
            self.strategy.update_control(torch.stack([u.control_delta for u in updates.values()]), len(self.state.workers))
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
        answers = dict(sorted(self.collect(set(self.state.sampled), STATISTICS).items()))  # pooled in a fixed order
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

    def collect(self, expected: set[str], kind: str = UPDATE) -> dict[str, Update]:
        """Updates (or, `kind` STATISTICS, the calibration's feature statistics) for this round
        from the sampled workers, until every expected one sent one, or the round timeout has
        passed with at least `min_workers` of them. Joins are answered on the way; one from a
        sampled worker (restarted mid-round) gets this round's model."""
        updates: dict[str, Update] = {}
        sampled = set(self.state.sampled)
        quorum = min(self.quorum, len(sampled))

        def check(message: Message) -> None:
            if message.kind == JOIN:
                self.check_join(message)
            if message.kind != kind:
                return
            if not self.is_member(message.sender):
                raise ProtocolError("sender", f"update from {message.sender!r}, which has not joined")
            if message.round < self.state.round:
                if message.sender in self.state.contributors.get(str(message.round), ()):
                    raise ProtocolError("duplicate", f"update for round {message.round} from {message.sender} was applied already")
                if message.sender in self.state.missed:  # alive after all, only slow: wait for it next round
                    self.state.missed.remove(message.sender)
                    metrics.WORKER_MISSED_ROUNDS.labels(SERVER, self.session, message.sender).set(0)
                raise ProtocolError("stale", f"update for round {message.round} from {message.sender}, now in round {self.state.round}")
            if message.round > self.state.round:
                raise ProtocolError("out-of-order", f"update for future round {message.round} from {message.sender}")
            if message.sender not in sampled and self.settings.samples_clients():  # without sampling every member is sent the model
                raise ProtocolError("unsampled", f"update for round {message.round} from {message.sender}, which was not sampled for it")
            check_tensors(message, self.update_specs if kind == UPDATE else self.statistics_specs)
            samples, loss = message.meta.get("samples"), message.meta.get("train_loss")
            listed = self.endpoint.trusted.max_samples(message.sender) if self.endpoint.trusted else None
            ceiling = min(self.deployment.max_samples, listed or self.deployment.max_samples)
            if not isinstance(samples, int) or isinstance(samples, bool) or not 0 < samples <= ceiling:
                raise ProtocolError("value", f"update from {message.sender} reports samples={samples!r} (at most {ceiling})")
            if kind == UPDATE and not _finite_number(loss):
                raise ProtocolError("value", f"update from {message.sender} reports train_loss={loss!r:.40}")
            if kind == STATISTICS:
                _check_class_counts(message.tensors["class_counts"], samples, message.sender)

        round_deadline = time.monotonic() + self.deployment.round_timeout
        give_up = time.monotonic() + self.deployment.timeout
        while not expected <= set(updates):
            now = time.monotonic()
            if now >= round_deadline and len(updates) >= quorum:
                break
            if now >= give_up:
                raise RoleTimeout(f"round {self.state.round}: {len(updates)} updates, fewer than the {quorum} needed")
            received = self.endpoint.receive((JOIN, kind), None, check, self.refuse, wait=min(1.0, max(0.05, (round_deadline if now < round_deadline else give_up) - now)))
            if received is None:
                continue
            message, delivery = received
            if message.kind == JOIN:
                # Without sampling a newcomer takes part at once; with it, it waits to be drawn.
                takes_part = message.sender in sampled or not self.settings.samples_clients()
                if takes_part and message.sender not in sampled:
                    sampled.add(message.sender)
                    expected.add(message.sender)
                    self.state.sampled = sorted(sampled)
                self.join(message, frame_digest(delivery.body), send_model=takes_part)
                self.endpoint.ack(delivery)
                continue
            if message.sender in updates:
                # A second copy for this round, e.g. redelivered after a reconnect made the first
                # one's ack impossible: hold the newer delivery, so the update stays in the queue
                # until the round is on disk, and let the first one go.
                self.endpoint.rejected("duplicate", f"second update for round {message.round} from {message.sender}")
                self.endpoint.ack(updates[message.sender].delivery)
                updates[message.sender].delivery = delivery
                continue
            tensors = {name: torch.from_numpy(array) for name, array in message.tensors.items()}
            if kind == STATISTICS:
                updates[message.sender] = Update(None, None, message.meta["samples"], 0.0, delivery, len(delivery.body), calibration.ClassStatistics.from_tensors(tensors))
            else:
                control_delta = strategies.flatten(without_prefix(CONTROL_DELTA, tensors), self.names) if self.strategy.control_variates else None
                updates[message.sender] = Update(
                    strategies.flatten(tensors, self.names), control_delta, message.meta["samples"], float(message.meta["train_loss"]), delivery, len(delivery.body),
                )
            metrics.UPDATES.labels(SERVER, self.session, "accepted").inc()
        return updates


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


def _atomic(path: Path, content: bytes) -> None:
    """Write through a temporary file, fsync it, rename it over `path`, fsync the folder. A write
    that fails leaves `path` as it was and no temporary file behind."""
    temporary = path.with_name(path.name + ".tmp")
    try:
        with open(temporary, "wb") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    os.replace(temporary, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
