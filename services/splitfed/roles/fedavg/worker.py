"""fedavg-worker: holds one partition of the data; trains the global model it is sent and
returns a signed update for that round, and (--evaluate parties or both) scores the global models
it is asked to on its own evaluation data. It joins with the fingerprint of what it builds, and
leaves a server whose welcome carries another."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import uuid

import torch

from splitfed.errors import Refused, TaskError
from splitfed.learning import calibration, data, federated
from splitfed.learning.context import context_of
from splitfed.learning.device import from_numpy, numpy_state
from splitfed.learning.settings import PartitionSettings
from splitfed.learning.strategies import LocalRecipe
from splitfed.learning.tasks import Task, fingerprint, fingerprint_difference
from splitfed.observability import metrics
from splitfed.protocol import Message, ProtocolError, TensorSpec, check_tensors
from splitfed.roles.base import Role
from splitfed.roles.declaration import Identity, ProgressSink
from splitfed.roles.endpoint import Endpoint
from splitfed.roles.fedavg.common import (
    CALIBRATE, CONTROL, CONTROL_DELTA, DONE, EVALUATE, EVALUATED, JOIN, MODEL, RECIPE, REFUSED, SCORE, SERVER, STATISTICS, UPDATE, WELCOME, WORKER,
    fingerprint_problem, server_queue, with_prefix, without_prefix, worker_queue,
)
from splitfed.roles.limits import message_bytes
from splitfed.transport import Delivery, Transport

log = logging.getLogger(__name__)

# The recipe's numbers and the closed ranges they must lie in (infinity itself is refused).
RECIPE_RANGES = {"prox_mu": (0.0, math.inf), "absent_scale": (0.0, 1.0), "calibration_tau": (0.0, math.inf)}


def received_recipe(message: Message) -> LocalRecipe:
    """The local recipe a model message carries (a field it leaves out keeps its default);
    ProtocolError("value") for a field this worker cannot train with."""
    fields = message.meta.get(RECIPE, {})
    if not isinstance(fields, dict):
        raise ProtocolError("value", f"recipe {fields!r:.80}")
    values = {}
    for field in dataclasses.fields(LocalRecipe):
        value = fields.get(field.name, field.default)
        if field.name in RECIPE_RANGES:
            low, high = RECIPE_RANGES[field.name]
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high or value == math.inf:
                raise ProtocolError("value", f"{field.name} {value!r}")
            value = float(value)
        elif not isinstance(value, bool):
            raise ProtocolError("value", f"{field.name} {value!r}")
        values[field.name] = value
    return LocalRecipe(**values)


def received_tensors(message: Message, device: torch.device) -> dict[str, torch.Tensor]:
    """A message's tensors on `device`, owning their memory (copied out of the decoded frame)."""
    return {name: from_numpy(array.copy(), device) for name, array in message.tensors.items()}


class FedAvgWorker(Role):
    def __init__(
        self, settings: PartitionSettings, deployment, transport: Transport, identity: Identity = Identity(),  # noqa: ANN001 (roles.fedavg.WorkerDeployment)
        on_progress: ProgressSink | None = None, share: data.Samples | None = None,
    ):
        """`share`: this worker's data, when a process that hosts many workers (a benchmark)
        has partitioned it once for all of them; by default the worker loads its own."""
        if deployment.index >= settings.workers:
            raise ValueError(f"--index {deployment.index} is not below --workers {settings.workers}")
        self.settings = settings
        self.worker_id = deployment.worker_id
        self.index = deployment.index
        self.session = deployment.session
        self.task = Task(settings)
        self.context = context_of(settings, WORKER, self.worker_id, self.index)
        self.model = self.task.model(self.context)
        self.loss_of = self.task.loss(self.context)
        self.fingerprint = fingerprint(self.model, self.task.classes(self.context))
        if problem := fingerprint_problem(self.fingerprint):  # the server would refuse it: say so here, where it can be fixed
            raise TaskError(f"{self.worker_id} cannot join: {problem}")
        self.evaluation: data.Samples | None = None  # what it scores global models on: loaded when the server asks for scores
        self.specs = {name: TensorSpec("float32", tuple(value.shape)) for name, value in self.model.state_dict().items()}
        self.data = share if share is not None else federated.worker_shares(self.task, settings, [self.index])[0]  # only this worker's share is kept
        self.endpoint = Endpoint(
            transport, session=self.session, role=WORKER, inbox=worker_queue(self.session, self.worker_id), timeout=deployment.timeout,
            signer=identity.signer, trusted=identity.trusted, ordered=False, durable=True, name=self.worker_id, peer_roles=(SERVER,),
            # The largest it receives: a model with SCAFFOLD's control variates (the server's strategy is
            # not a worker setting); the models to score or calibrate carry the model alone.
            max_message_bytes=message_bytes({**self.specs, **with_prefix(CONTROL, self.specs)}),
        )
        self.server = server_queue(self.session)
        transport.declare(self.server, durable=True)
        self.control = federated.zeros_like_state(self.model)  # SCAFFOLD's c_i; zero again after a restart
        self.last_round = 0  # the last round this worker sent an update for
        self.last_scored = 0  # the round of the last global model this worker scored
        self.rounds = 0
        self.waits_for_turns = False  # the server draws some workers per round: a long wait is normal
        metrics.LOCAL_SAMPLES.labels(WORKER, self.session).set(len(self.data))
        self.training = metrics.ACTIVITY_SECONDS.labels(WORKER, self.session, "training")
        self.waiting = metrics.ACTIVITY_SECONDS.labels(WORKER, self.session, "waiting")
        self.idle_since = time.monotonic()

    def run(self) -> dict:
        self.join()
        self.consume()
        log.info("worker %s done after %d rounds", self.worker_id, self.rounds)
        return {"worker": self.worker_id, "rounds": self.rounds, "samples": len(self.data), "traffic": vars(self.endpoint.traffic)}

    def join(self) -> None:
        """Announce this worker; wait for the welcome (or a refusal naming this very join)."""
        # A fresh nonce: a replay is told apart.
        join = Message(JOIN, "", "", meta={"samples": len(self.data), "nonce": uuid.uuid4().hex, "fingerprint": self.fingerprint})
        sent = self.endpoint.send_message(self.server, join, persistent=True)
        while True:
            message, delivery = self.endpoint.receive((WELCOME, REFUSED, MODEL, CALIBRATE, DONE), (SERVER,))
            self.endpoint.ack(delivery)
            if message.kind == REFUSED and message.meta.get("ref") == sent.digest:
                raise Refused(f"the server refused worker {self.worker_id}: {message.meta.get('reason')} ({message.meta.get('detail')})")
            if message.kind == WELCOME and message.meta.get("ref") == sent.digest and isinstance(message.meta.get("run"), str):
                if difference := fingerprint_difference(self.fingerprint, message.meta.get("fingerprint")):
                    raise Refused(f"worker {self.worker_id} does not train for this server, which builds another model or class list: "
                                  f"{difference} (the server's against this worker's)")
                self.endpoint.bind(message.meta["run"])  # from now on only this run's messages, to this worker
                self.waits_for_turns = message.meta.get("sampled") is True
                if message.meta.get("evaluate") is True:  # a missing test part fails now, before any training
                    self.evaluation_data()
                log.info("worker %s joined run %s at round %d", self.worker_id, self.endpoint.run, message.round)
                return
            # Anything else predates this join (a model queued while this worker was away): stale.

    def on_silence(self, seconds: float) -> None:
        """A worker the server samples is not failed by its timeout while it waits for its
        turn: the timeout then only says how often it tells the log."""
        if not self.waits_for_turns:
            super().on_silence(seconds)
        log.info("worker %s: not drawn for a round in %.0fs, still waiting", self.worker_id, seconds)

    def expecting(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        return (MODEL, CALIBRATE, EVALUATE, DONE, WELCOME), (SERVER,)

    def check(self, message: Message) -> None:
        if message.kind in (CALIBRATE, EVALUATE):
            check_tensors(message, self.specs)
        if message.kind == MODEL:
            recipe = received_recipe(message)
            check_tensors(message, {**self.specs, **(with_prefix(CONTROL, self.specs) if recipe.control_variates else {})})
            if not isinstance(message.meta.get(SCORE, False), bool):
                raise ProtocolError("value", f"{SCORE} {message.meta[SCORE]!r:.40}")

    def handle(self, message: Message, delivery: Delivery) -> None:
        # A model for a round already answered is a redelivery: nothing to do.
        answered = self.last_scored if message.kind == EVALUATE else self.last_round
        if message.kind in (MODEL, CALIBRATE, EVALUATE) and message.round > answered:
            arrived = time.monotonic()
            self.waiting.inc(arrived - self.idle_since)
            {MODEL: self.train_and_send, CALIBRATE: self.send_statistics, EVALUATE: self.score}[message.kind](message)
            self.idle_since = time.monotonic()
            self.training.inc(self.idle_since - arrived)
        self.finished = message.kind == DONE

    def evaluation_data(self) -> data.Samples:
        if self.evaluation is None:
            self.evaluation = federated.evaluation_data(self.task, self.context)
        return self.evaluation

    def score(self, message: Message) -> None:
        """Score the global model `message` carries (EVALUATE) on this worker's evaluation data."""
        self.model.load_state_dict(received_tensors(message, self.task.compute.device))
        self.send_score(message.round)

    def send_score(self, model_round: int) -> None:
        """This worker's counts for the global model after `model_round`, which `self.model` holds."""
        started = time.perf_counter()
        score = federated.score(self.model, self.evaluation_data(), self.settings.eval_batch_size, self.loss_of, self.task.compute)
        reply = Message(EVALUATED, "", "", round=model_round, meta={"correct": score.correct, "loss_sum": score.loss_sum, "samples": score.samples})
        self.endpoint.send_message(self.server, reply, to=SERVER, persistent=True)
        self.last_scored = model_round
        log.info("worker %s: round %d's model scored on %d samples: accuracy %.4f, loss %.4f, %.1fs", self.worker_id, model_round, score.samples,
                 score.accuracy, score.loss, time.perf_counter() - started)

    def train_and_send(self, message: Message) -> None:
        started = time.perf_counter()
        tensors = received_tensors(message, self.task.compute.device)
        self.model.load_state_dict({name: tensors[name] for name in self.specs})
        if message.meta.get(SCORE) is True and message.round - 1 > self.last_scored:  # the global model after the last round: scored before it is trained
            self.send_score(message.round - 1)
        recipe = received_recipe(message)
        controls = (without_prefix(CONTROL, tensors), self.control) if recipe.control_variates else None
        seed = federated.round_seed(self.settings.seed, self.index, message.round)
        work = federated.local_training(self.model, self.data, self.settings, seed, message.round, recipe, controls, self.loss_of, self.task.compute)
        loss, sent = work.loss, numpy_state(self.model.state_dict())
        if work.control is not None:
            sent.update(numpy_state(with_prefix(CONTROL_DELTA, {name: work.control[name] - self.control[name] for name in self.control})))
            self.control = work.control
        update = Message(UPDATE, "", "", round=message.round, meta={"samples": len(self.data), "train_loss": loss}, tensors=sent)
        self.endpoint.send_message(self.server, update, to=SERVER, persistent=True)
        self.last_round = message.round
        self.rounds += 1
        metrics.ROUND.labels(WORKER, self.session).set(message.round)
        metrics.TRAIN_LOSS.labels(WORKER, self.session).set(loss)
        metrics.UPDATE_BYTES.labels(WORKER, self.session).set(sum(array.nbytes for array in sent.values()))
        log.info("worker %s: round %d trained on %d samples, loss %.4f, %.1fs", self.worker_id, message.round, len(self.data), loss,
                 time.perf_counter() - started)

    def send_statistics(self, message: Message) -> None:
        """CCVR: the per-class count, mean and covariance of this share's penultimate features
        under the final global model."""
        self.model.load_state_dict(received_tensors(message, self.task.compute.device))
        statistics = calibration.feature_statistics(self.model, self.data, len(self.task.classes(self.context)), self.settings.eval_batch_size)
        reply = Message(STATISTICS, "", "", round=message.round, meta={"samples": len(self.data)}, tensors=numpy_state(statistics.tensors()))
        self.endpoint.send_message(self.server, reply, to=SERVER, persistent=True)
        self.last_round = message.round
        log.info("worker %s: feature statistics of %d samples sent for the calibration", self.worker_id, len(self.data))
