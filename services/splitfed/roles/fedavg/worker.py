"""fedavg-worker: holds one partition of the data; trains the global model it is sent and
returns a signed update for that round, and (--evaluate parties or both) scores the global models
it is asked to on its own evaluation data. It joins with the fingerprint of what it builds, and
leaves a server whose welcome carries another."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
import math
import time
import uuid

import torch

from splitfed.errors import Refused, TaskError
from splitfed.learning import calibration, data, federated, privacy, strategies
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
    CALIBRATE, CONSENT, CONSENTS, CONTROL, CONTROL_DELTA, DONE, EVALUATE, EVALUATED, JOIN, KEYS, MASKED, MODEL, NEIGHBOURS, PRIVACY, RECIPE, REFUSED,
    REVEAL, SCORE, SEALED, SERVER, SHARES, STATISTICS, UNMASK, UPDATE, WELCOME, WORKER, fingerprint_problem, server_queue, with_prefix, without_prefix,
    worker_queue,
)
from splitfed.roles.fedavg.secure import SECURE, RoundConfig, SecAggError, SecureTurn
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


@dataclass
class Trained:
    """A round's local training, as this worker sends it."""

    round: int
    start: torch.Tensor  # (P,) the global model it began from
    change: torch.Tensor  # (P,) its change, clipped and noised as --dp says
    under_clip: bool
    loss: float
    control_delta: dict[str, torch.Tensor] | None  # SCAFFOLD
    steps: int


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
        self.trained: Trained | None = None  # the last round's training, kept for a secure round's retry
        self.turn: SecureTurn | None = None  # this worker's part in the secure round under way
        self.revealed: dict[int, frozenset[str]] = {}  # round -> the survivors it revealed shares for
        self.attempts: set[str] = set()  # the attempts of the turn's round this worker has seen
        self.dp_steps = 0  # sample-level DP: optimiser steps taken, for this worker's accountant
        if settings.dp == "sample":
            privacy.check_sample_dp(self.model)
        if settings.secure_aggregation != "none" and len(self.data) > settings.secagg_max_samples:
            raise TaskError(f"{self.worker_id} holds {len(self.data)} samples, more than --secagg-max-samples {settings.secagg_max_samples}")
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
        return (MODEL, CALIBRATE, EVALUATE, DONE, WELCOME, NEIGHBOURS, SEALED, UNMASK, CONSENTS), (SERVER,)

    def check(self, message: Message) -> None:
        if message.kind in (CALIBRATE, EVALUATE):
            check_tensors(message, self.specs)
        if message.kind == MODEL:
            recipe = received_recipe(message)
            check_tensors(message, {**self.specs, **(with_prefix(CONTROL, self.specs) if recipe.control_variates else {})})
            if not isinstance(message.meta.get(SCORE, False), bool):
                raise ProtocolError("value", f"{SCORE} {message.meta[SCORE]!r:.40}")
            self.round_clip(message)
            if (secure := message.meta.get(SECURE)) is not None or self.settings.secure_aggregation != "none":
                config = RoundConfig.received(secure, self.worker_id, self.settings, self.endpoint.trusted)
                if self.turn is not None and message.round == self.turn.round and config.attempt in self.attempts:
                    # A redelivery or a replay: answering it afresh would give the attempt a second set of keys.
                    raise ProtocolError("duplicate" if config.attempt == self.turn.config.attempt else "stale",
                                        f"model of round {message.round}, attempt {config.attempt} again")
        if message.kind in (NEIGHBOURS, SEALED, UNMASK, CONSENTS):
            if self.turn is None:
                raise ProtocolError("stale", f"{message.kind} for round {message.round}, but this worker is in no secure round")
            self.turn.check(message, self.endpoint.trusted)

    def round_clip(self, message: Message) -> float:
        """The clip a model message states for this round (central DP's may adapt), after checking
        that the server runs the privacy this worker was set up for; ProtocolError("value") if not."""
        stated = message.meta.get(PRIVACY)
        own = {"secure_aggregation": self.settings.secure_aggregation, "dp": self.settings.dp}
        if not isinstance(stated, dict) or {key: stated.get(key) for key in own} != own:
            raise ProtocolError("value", f"the server runs with privacy {stated!r:.120}, this worker with {own}")
        clip = stated.get("clip")
        if not isinstance(clip, (int, float)) or isinstance(clip, bool) or not 0 < clip < math.inf:
            raise ProtocolError("value", f"clip {clip!r:.40}")
        if not self.settings.dp_adaptive_clip and clip != self.settings.dp_clip:
            raise ProtocolError("value", f"the server clips at {clip}, this worker at --dp-clip {self.settings.dp_clip}")
        return float(clip)

    def handle(self, message: Message, delivery: Delivery) -> None:
        if message.kind in (NEIGHBOURS, SEALED, UNMASK, CONSENTS):
            self.secure_step(message)
            return
        # A model for a round already answered is a redelivery: nothing to do; a secure round's
        # model again, with another attempt, is a server that restarted the round's protocol.
        answered = self.last_scored if message.kind == EVALUATE else self.last_round
        retried = message.kind == MODEL and message.round == answered and SECURE in message.meta
        if message.kind in (MODEL, CALIBRATE, EVALUATE) and (message.round > answered or retried):
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
        """Train from the model `message` carries and send what this round takes: the model (with
        --dp central or local, the global one plus the clipped, or noised, change), or in a secure
        round the keys now and the masked change once the server asks for it (`secure_step`)."""
        started = time.perf_counter()
        clip = self.round_clip(message)
        if SECURE in message.meta:  # the keys go out before training: the other workers need them to share
            config = RoundConfig.received(message.meta[SECURE], self.worker_id, self.settings, self.endpoint.trusted)
            self.attempts = (self.attempts if self.turn is not None and self.turn.round == message.round else set()) | {config.attempt}
            self.turn = SecureTurn.start(self.endpoint.run, message.round, config, self.worker_id)
            self.endpoint.send_message(self.server, Message(KEYS, "", "", round=message.round, meta={"attempt": self.turn.config.attempt},
                                                            tensors=self.turn.advertisement(self.endpoint.signer)), to=SERVER, persistent=True)
        if self.trained is None or self.trained.round != message.round:  # a secure round run again is not trained again
            self.trained = self.train(message, clip)
        work = self.trained
        loss = work.loss if self.settings.dp == "none" else None  # un-noised: under DP it stays with the worker
        if self.turn is not None:
            encoding = self.turn.config.encoding(federated.dp_weighted(self.settings))
            try:
                self.turn.input = federated.secure_input(encoding, work.change, loss or 0.0, len(self.data), work.under_clip, self.settings)
            except SecAggError as exc:  # a change that is not finite: this worker sits the round out
                self.endpoint.rejected("secagg", f"round {message.round}: {exc}")
            sent_bytes = 0 if self.turn.input is None else self.turn.input.nbytes
        else:
            sent = numpy_state(self.model.state_dict()) if self.settings.dp not in ("central", "local") else numpy_state(
                strategies.unflatten(work.start + work.change, self.model.state_dict(), list(self.specs)))
            if work.control_delta is not None:
                sent.update(numpy_state(with_prefix(CONTROL_DELTA, work.control_delta)))
            meta = {"samples": len(self.data), "train_loss": loss, **({"under_clip": work.under_clip} if self.settings.dp_adaptive_clip else {}),
                    **self.epsilon_meta()}
            self.endpoint.send_message(self.server, Message(UPDATE, "", "", round=message.round, meta=meta, tensors=sent), to=SERVER, persistent=True)
            sent_bytes = sum(array.nbytes for array in sent.values())
        self.rounds += message.round > self.last_round  # a secure round run again is the same round
        self.last_round = message.round
        metrics.ROUND.labels(WORKER, self.session).set(message.round)
        metrics.TRAIN_LOSS.labels(WORKER, self.session).set(work.loss)
        metrics.UPDATE_BYTES.labels(WORKER, self.session).set(sent_bytes)
        log.info("worker %s: round %d trained on %d samples, loss %.4f, %.1fs", self.worker_id, message.round, len(self.data), work.loss,
                 time.perf_counter() - started)

    def train(self, message: Message, clip: float) -> Trained:
        """One round's local training from the model `message` carries (scored first, when asked)."""
        tensors = received_tensors(message, self.task.compute.device)
        self.model.load_state_dict({name: tensors[name] for name in self.specs})
        if message.meta.get(SCORE) is True and message.round - 1 > self.last_scored:  # the global model after the last round: scored before it is trained
            self.send_score(message.round - 1)
        start = strategies.flatten(self.model.state_dict(), list(self.specs))
        recipe = received_recipe(message)
        controls = (without_prefix(CONTROL, tensors), self.control) if recipe.control_variates else None
        seed = federated.round_seed(self.settings.seed, self.index, message.round)
        work = federated.local_training(self.model, self.data, self.settings, seed, message.round, recipe, controls, self.loss_of, self.task.compute)
        self.dp_steps += work.steps
        control_delta = None
        if work.control is not None:
            control_delta = {name: work.control[name] - self.control[name] for name in self.control}
            self.control = work.control
        change, under_clip = federated.private_change(strategies.flatten(self.model.state_dict(), list(self.specs)) - start, self.settings, clip)
        return Trained(message.round, start, change, under_clip, work.loss, control_delta, work.steps)

    def epsilon_meta(self) -> dict:
        """Sample-level DP: this worker's epsilon so far and after one more round like this one
        (the server ends the run before a round that would pass --dp-target-epsilon)."""
        if self.settings.dp != "sample":
            return {}
        rate, steps = min(1.0, self.settings.batch_size / len(self.data)), self.trained.steps
        return {"epsilon": privacy.epsilon(self.settings.dp_noise_multiplier, rate, self.dp_steps, self.settings.dp_delta),
                "epsilon_next": privacy.epsilon(self.settings.dp_noise_multiplier, rate, self.dp_steps + steps, self.settings.dp_delta)}

    def secure_step(self, message: Message) -> None:
        """The next stage of this worker's secure round: its shares for the neighbours whose keys
        the server forwards, its masked input once it holds theirs, the shares the server needs
        to unmask the sum. A stage this worker cannot do (too few neighbours left, a share that
        does not open, survivors other than those it revealed for) leaves the round without it."""
        turn, reply = self.turn, None
        turn.answered.add(message.kind)  # answered or refused, it is not answered again
        try:
            if message.kind == NEIGHBOURS:
                reply = Message(SHARES, "", "", tensors=turn.shares(message))
            elif message.kind == SEALED:
                reply = Message(MASKED, "", "", meta=self.epsilon_meta(), tensors=turn.masked(message))
            elif message.kind == UNMASK:
                reply = Message(CONSENT, "", "", tensors=turn.consent(message, self.endpoint.signer))
            else:
                survivors = frozenset(turn.lists[0])
                if (earlier := self.revealed.get(turn.round)) is not None and earlier != survivors:
                    raise SecAggError(f"it revealed shares for round {turn.round} with other survivors: the difference of two sums would show")
                reply = Message(REVEAL, "", "", tensors=turn.reveal())
                self.revealed = {turn.round: survivors}
        except SecAggError as exc:
            self.endpoint.rejected("secagg", f"round {turn.round}, {message.kind}: {exc}")
            return
        reply.round, reply.meta["attempt"] = turn.round, turn.config.attempt
        self.endpoint.send_message(self.server, reply, to=SERVER, persistent=True)

    def send_statistics(self, message: Message) -> None:
        """CCVR: the per-class count, mean and covariance of this share's penultimate features
        under the final global model."""
        self.model.load_state_dict(received_tensors(message, self.task.compute.device))
        statistics = calibration.feature_statistics(self.model, self.data, len(self.task.classes(self.context)), self.settings.eval_batch_size)
        reply = Message(STATISTICS, "", "", round=message.round, meta={"samples": len(self.data)}, tensors=numpy_state(statistics.tensors()))
        self.endpoint.send_message(self.server, reply, to=SERVER, persistent=True)
        self.last_round = message.round
        log.info("worker %s: feature statistics of %d samples sent for the calibration", self.worker_id, len(self.data))
