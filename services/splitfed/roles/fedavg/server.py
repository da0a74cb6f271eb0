"""fedavg-server: starts rounds, collects signed updates, aggregates, tests the global model
(itself on its own data, or adding up the workers' scores of it on theirs: --evaluate).

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
have joined, then one `Collection` per round (and one for the calibration's statistics). With
--evaluate parties or both, a round's collection also gathers the workers' scores of the previous
round's model (`Scoring`): that round's record is complete, and enters the history, only then; the
last round's model (and the calibrated one) is scored in a collection of its own.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import uuid
from collections.abc import Collection as Names
from dataclasses import dataclass, field

import numpy as np
import torch

from splitfed import config
from splitfed.errors import TaskError
from splitfed.learning import calibration, federated, secagg, strategies, tasks, train
from splitfed.learning.device import from_numpy, numpy_state
from splitfed.learning.settings import FederatedSettings
from splitfed.learning.tasks import Task
from splitfed.observability import metrics
from splitfed.protocol import Message, ProtocolError, TensorSpec, check_tensors
from splitfed.roles.base import LATER, Role
from splitfed.roles.declaration import Identity, Progress, ProgressSink
from splitfed.roles.endpoint import Endpoint, Rejection, RoleTimeout, frame_digest
from splitfed.roles.fedavg import admission
from splitfed.roles.fedavg.checkpoints import CheckpointStore, ServerState
from splitfed.roles.fedavg.common import (
    CALIBRATE, CONSENT, CONSENTS, CONTROL, CONTROL_DELTA, DONE, EVALUATE, EVALUATED, JOIN, KEYS, MASKED, MODEL, NEIGHBOURS, PRIVACY, RECIPE, REFUSED,
    REVEAL, SCORE, SEALED, SERVER, SHARES, STATISTICS, UNMASK, UPDATE, WELCOME, WORKER, fingerprint_problem, server_queue, with_prefix, without_prefix,
    worker_queue,
)
from splitfed.roles.fedavg.secure import SECURE, SecAggError, SecureRound, masked_spec
from splitfed.roles.fedavg.lease import Lease
from splitfed.roles.limits import message_bytes
from splitfed.transport import Delivery, Transport, TransportError

log = logging.getLogger(__name__)


@dataclass
class Answer:
    """A worker's accepted answer in a collection, held unacked until its effect is on disk."""

    samples: int
    delivery: Delivery
    size: int  # bytes on the wire
    epsilon: tuple[float, float] | None  # sample-level DP: the worker's epsilon after this round and after one more


@dataclass
class Update(Answer):
    """A worker's model after a round."""

    vector: torch.Tensor  # (P,) all parameters, flattened
    control_delta: torch.Tensor | None  # (P,) SCAFFOLD: the change of the worker's control variate
    train_loss: float
    under_clip: bool  # --dp-adaptive-clip: its change was under the clip


SECURE_STAGES = (KEYS, SHARES, MASKED, CONSENT, REVEAL)  # what workers send in a secure round


def _reported_epsilon(message: Message) -> tuple[float, float] | None:
    if "epsilon" not in message.meta:
        return None
    return float(message.meta["epsilon"]), float(message.meta["epsilon_next"])


@dataclass
class Statistics(Answer):
    """A worker's feature statistics for the calibration."""

    statistics: calibration.ClassStatistics


@dataclass
class Evaluated(Answer):
    """A worker's score of a global model on its own evaluation data."""

    score: train.Score


@dataclass
class Scoring:
    """The workers' scores of one global model, being gathered: the model after round `round`
    (rounds + 1: the calibrated model), from the workers `expected` to score it."""

    round: int
    expected: set[str]
    answers: dict[str, Evaluated] = field(default_factory=dict)


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
        # With --evaluate parties the server reads no data at all: its context names no folder.
        self.server_scores, self.parties_score = federated.server_scores(settings), federated.parties_score(settings)
        self.context = federated.server_context(settings)
        self.model = self.task.model(self.context)
        self.loss_of = self.task.loss(self.context)
        classes = federated.server_classes(self.task, self.context, reads_data=self.server_scores)
        self.fingerprint = tasks.fingerprint(self.model, classes)  # what every worker must build too
        if problem := fingerprint_problem(self.fingerprint):  # no worker's join could carry the same
            raise TaskError(f"{SERVER} cannot admit workers: {problem}")
        self.names = list(self.model.state_dict())
        self.specs = {name: TensorSpec("float32", tuple(value.shape)) for name, value in self.model.state_dict().items()}
        self.update_specs = {**self.specs, **(with_prefix(CONTROL_DELTA, self.specs) if self.recipe.control_variates else {})}
        self.statistics_specs = (  # a model that cannot be calibrated is refused here, before any round
            {name: TensorSpec("float32", shape) for name, shape in calibration.statistics_shapes(self.model, len(classes)).items()}
            if settings.calibration == "ccvr" else {}
        )
        self.parameters = sum(math.prod(spec.shape) for spec in self.specs.values())  # P: what a secure input carries beside its extras
        self.test_data = federated.evaluation_data(self.task, self.context) if self.server_scores else None
        self.scoring: Scoring | None = None  # the scores being gathered now, if any
        self.secure: SecureRound | None = None  # the secure sum under way, if any
        if self.secure_rounds:  # at zero from the start, so the first dropout or failure is an increase a dashboard sees
            for stage in SECURE_STAGES:
                metrics.SECAGG_DROPOUTS.labels(SERVER, self.session, stage.removeprefix("secagg-"))
            metrics.SECAGG_FAILURES.labels(SERVER, self.session)
        if (settings.dp in ("central", "local") and settings.dp_target_epsilon is not None
                and (first := federated.epsilon_after(settings, [federated.sampling_rate(settings, settings.workers)])) > settings.dp_target_epsilon):
            raise TaskError(f"one round already spends epsilon {first:.3g} at delta {settings.dp_delta:g}, more than --dp-target-epsilon "
                            f"{settings.dp_target_epsilon:g}: raise --dp-noise-multiplier")
        self.endpoint = Endpoint(
            transport, session=self.session, role=SERVER, inbox=server_queue(self.session), timeout=deployment.timeout,
            # The largest it receives: an update (with SCAFFOLD's control deltas), or CCVR's
            # statistics (a covariance per class: they can outweigh the model); joins and scores are metadata.
            max_message_bytes=max(message_bytes(self.update_specs), message_bytes(self.statistics_specs), message_bytes(masked_spec(self.parameters))),
            signer=identity.signer, trusted=identity.trusted, ordered=False, durable=True,
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
        self.strategy_state = self.strategy.loaded_state({name: self.task.compute.put(value) for name, value in self.store.strategy_tensors(state).items()})
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
        while self.state.round <= self.settings.rounds and not self.budget_spent():
            self.run_round()
        if self.state.unscored:
            self.score_last_round()
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
            "accuracy": final["accuracy"], "loss": final["loss"], **{key: value for key, value in final.items() if key.startswith("parties")},  # federated.parties_figures
            "wall_seconds": time.perf_counter() - started, "history": self.state.history, "traffic": vars(self.endpoint.traffic),
            "contributors": self.state.contributors, **({"calibration": self.state.calibration} if self.state.calibration else {}),
            **({"dp": {"epsilon": final.get("epsilon"), "delta": self.settings.dp_delta, "stopped": self.state.stopped}} if self.settings.dp != "none" else {}),
        }

    def last_record(self) -> dict:
        """The record of the last round closed (its scores may still be due); empty before the first."""
        return self.state.unscored or (self.state.history[-1] if self.state.history else {})

    def budget_spent(self) -> bool:
        """Whether the next round would take epsilon past --dp-target-epsilon: the accountant's
        figure after it (central, local DP), or the largest any worker reported it would reach
        (sample-level DP). The run then ends with the rounds it has."""
        target = self.settings.dp_target_epsilon
        if target is None or not self.last_record():
            return False
        last = self.last_record()
        upcoming = (last.get("epsilon_next") if self.settings.dp == "sample" else
                    federated.epsilon_after(self.settings, [*self.state.dp_rates, federated.sampling_rate(self.settings, len(self.candidates()))]))
        if upcoming is None or upcoming <= target:
            return False
        self.state.stopped = f"round {self.state.round} would take epsilon to {upcoming:.3g}, past --dp-target-epsilon {target:g}"
        log.warning("ending the run after %d rounds: %s", self.state.round - 1, self.state.stopped)
        return True

    # -- admission ------------------------------------------------------------------------

    def check_join(self, message: Message) -> None:
        if message.kind == JOIN:
            admission.check_join(self.state, message, self.settings.workers, anyone_may_join=self.endpoint.trusted is None, fingerprint=self.fingerprint)

    def join(self, message: Message, digest: str, send_model: bool) -> None:
        """Admit (or re-admit) the sender of a join that passed `check_join`, on disk before it
        is welcomed; the welcome names the join it answers by its digest, and carries the
        fingerprint the worker checks in turn. A worker due to score the model being scored
        that is sent no model is sent that one to score (it lost what was queued for it)."""
        worker = message.sender
        admission.admit(self.state, message)
        self.checkpoint(with_model=False)
        metrics.ACTIVE_WORKERS.labels(SERVER, self.session).set(len(self.state.workers))
        metrics.WORKER_MISSED_ROUNDS.labels(SERVER, self.session, worker).set(0)
        log.info("worker %s joined (round %d)", worker, self.state.round)
        queue = worker_queue(self.session, worker)
        self.transport.declare(queue, durable=True)
        # bound: it names the run. `sampled`: this worker may wait many rounds for a turn.
        # `evaluate`: it will be asked to score global models on its own data.
        welcome = Message(WELCOME, "", "", round=self.state.round, meta={
            "ref": digest, "sampled": self.settings.samples_clients() or self.secure_rounds, "evaluate": self.parties_score,
            "fingerprint": self.fingerprint,
        })
        self.endpoint.send_message(queue, welcome, to=worker, persistent=True)
        if send_model:
            self.send_models([worker])
        elif self.scoring is not None and worker in self.scoring.expected:
            self.send_models([], evaluators=[worker])

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

    def model_tensors(self, model: dict) -> dict:
        """What every worker is sent this round: the global model (`model`, on the wire), and
        SCAFFOLD's control."""
        if not self.recipe.control_variates:
            return model
        current = strategies.flatten(self.model.state_dict(), self.names)
        control = self.strategy.control(current, self.strategy_state)
        return {**model, **numpy_state(with_prefix(CONTROL, strategies.unflatten(control, self.model.state_dict(), self.names)))}

    def send_models(self, workers: list[str], evaluators: Names[str] = ()) -> None:
        """This round's model and the strategy's local recipe to each of `workers` (after the
        last round, the final model to calibrate on), and the global model alone to each of
        `evaluators` to score; serialised once for all of them. A worker due to score the
        global model (`scoring`) that is sent this round's, which is that model, is asked to
        score it before it trains."""
        model = numpy_state(self.model.state_dict())
        if self.state.round > self.settings.rounds:
            kind, meta, tensors = CALIBRATE, {}, model
        else:
            kind, meta, tensors = MODEL, {RECIPE: dataclasses.asdict(self.recipe), PRIVACY: self.privacy()}, self.model_tensors(model)
            if self.secure is not None:
                meta[SECURE] = self.secure.config.meta()
        scorers = self.scoring.expected if self.scoring is not None and kind == MODEL else set()
        batch = [(worker_queue(self.session, worker), Message(kind, "", "", round=self.state.round, meta={**meta, **({SCORE: True} if worker in scorers else {})},
                                                              tensors=tensors), worker) for worker in workers]
        batch += [(worker_queue(self.session, worker), Message(EVALUATE, "", "", round=self.scoring.round, tensors=model), worker) for worker in evaluators]
        self.endpoint.send_messages(batch, persistent=True)

    @property
    def secure_rounds(self) -> bool:
        return self.settings.secure_aggregation != "none"

    @property
    def clip(self) -> float:
        """This round's DP clip (it adapts with --dp-adaptive-clip)."""
        return self.state.dp_clip if self.state.dp_clip is not None else self.settings.dp_clip

    def privacy(self) -> dict:
        """What a model message states of the round's privacy, which the worker checks against its own settings."""
        return {"secure_aggregation": self.settings.secure_aggregation, "dp": self.settings.dp, "clip": self.clip}

    def sample(self) -> list[str]:
        """This round's workers: all that have not missed their last round, or with client
        sampling a seeded draw from them, drawn once per round. It needs no write of its own:
        until the next checkpoint (which holds it) it is a function of the last one, so a
        server that restarts before then draws the same workers again. Under central DP the draw
        is secret (the OS's randomness): a restarted server may draw others."""
        if self.state.sampled_round != self.state.round:
            size = self.settings.round_sample_size(len(self.state.workers))
            self.state.sampled = federated.sample_workers(self.candidates(), size, self.settings.seed, self.state.round, secret=self.settings.dp == "central")
            self.state.sampled_round = self.state.round
        return self.state.sampled

    def candidates(self) -> list[str]:
        """The workers a round may draw: those not given up on."""
        missed = set(self.state.missed)
        return [worker for worker in self.state.workers if worker not in missed]

    def run_round(self) -> None:
        round_number = self.state.round
        started = time.perf_counter()
        metrics.ROUND.labels(SERVER, self.session).set(round_number)
        sampled = self.sample()
        metrics.SAMPLED_WORKERS.labels(SERVER, self.session).set(len(sampled))
        # A secure round takes only the sampled (its masks are agreed among them); without one,
        # and without sampling, workers that missed a round are still sent every model, so a slow
        # one comes back by itself; with it, only the sampled are (the rest wait for a turn).
        recipients = sampled if self.settings.samples_clients() or self.secure_rounds else self.state.workers
        # The model sent is the last round's: its scorers that are sent it score it on the way,
        # the others are sent it to score.
        self.scoring = self.pending_scoring()
        current = strategies.flatten(self.model.state_dict(), self.names)  # (P,)
        clip = self.clip
        if self.secure_rounds:
            aggregate, contributors, answers = self.secure_sum(sampled, recipients)
            combined, self.strategy_state = federated.secure_step(self.strategy, self.strategy_state, current, aggregate, len(contributors),
                                                                 self.settings, clip)
            train_loss, under_clip = aggregate.mean_loss, aggregate.under_clip
        else:
            self.send_models(recipients, evaluators=sorted(self.scoring.expected.difference(recipients)) if self.scoring else ())
            # In a fixed order, not arrival order: the same updates always sum to the same bits.
            updates: dict[str, Update] = dict(sorted(self.collect(set(sampled), UPDATE).items()))
            vectors = torch.stack([u.vector for u in updates.values()])  # (K, P)
            combined, self.strategy_state = federated.plain_step(self.strategy, self.strategy_state, current, vectors,
                                                                 [u.samples for u in updates.values()], self.settings, clip)
            if self.recipe.control_variates:
                control_deltas = torch.stack([u.control_delta for u in updates.values()])  # (K, P)
                self.strategy_state = self.strategy.next_control(control_deltas, len(self.state.workers), self.strategy_state)
            contributors, answers = sorted(updates), list(updates.values())
            train_loss, under_clip = sum(u.train_loss for u in updates.values()) / len(updates), sum(u.under_clip for u in updates.values())
        scoring = self.close_scoring()
        scored = self.scored_record(self.state.unscored, scoring) if scoring else None  # the last round's record, now complete
        self.model.load_state_dict(strategies.unflatten(combined, self.model.state_dict(), self.names))
        evaluation = self.own_evaluation()
        # Under DP the workers' losses are not noised, so they are not reported either.
        record = {"step": round_number, **evaluation, "train_loss": train_loss if self.settings.dp == "none" else None, "seconds": time.perf_counter() - started, "workers": contributors,
                  **self.privacy_figures(round_number, clip, answers)}
        if self.settings.dp != "none":
            self.state.dp_clip = federated.next_clip(self.settings, clip, under_clip, len(contributors))
        self.state.contributors[str(round_number)] = contributors
        self.state.round += 1
        # Not sampled again (nor waited for) until heard from: a late update, a score or a join.
        # A scorer that sent no score nor update is not waited for either.
        silent = scoring.expected - set(scoring.answers) if scoring else set()
        heard = set(contributors) | (set(scoring.answers) if scoring else set())
        self.state.missed = sorted(((set(self.state.missed) | silent) - heard) | (set(sampled) - set(contributors)))
        if absent := sorted(set(sampled) - set(contributors)):
            log.warning("round %d closed without %s", round_number, ", ".join(absent))
        if scored is not None:
            self.state.history.append(scored)
        if self.parties_score:  # complete once the live workers have scored this round's model
            missed = set(self.state.missed)
            self.state.unscored, self.state.scorers = record, [worker for worker in self.state.workers if worker not in missed]
        else:
            self.state.history.append(record)
        self.checkpoint(with_model=True)
        for answer in [*answers, *(scoring.answers.values() if scoring else ())]:  # only now is the answer's effect on disk
            self.endpoint.ack(answer.delivery)
        self._round_metrics(record, contributors, sum(answer.size for answer in answers), sampled)
        for complete in (scored, None if self.parties_score else record):
            if complete is not None:
                self.report(complete)

    def privacy_figures(self, round_number: int, clip: float, answers: list[Answer]) -> dict:
        """What a round's record says of its privacy: epsilon spent after it (central and local DP:
        the server's accountant; sample-level DP: the most any contributor reported, and the most
        one more round would take it to) and the clip it used."""
        if self.settings.dp == "none":
            return {}
        if self.settings.dp == "sample":  # the largest any worker has reported, in this round or before
            last = self.last_record()
            reported = [answer.epsilon for answer in answers if answer.epsilon is not None]
            epsilon = max((value for value in (last.get("epsilon"), *(now for now, _ in reported)) if value is not None), default=None)
            upcoming = max((value for value in (last.get("epsilon_next"), *(then for _, then in reported)) if value is not None), default=None)
            figures = {"epsilon": epsilon, "epsilon_next": upcoming}
        else:
            self.state.dp_rates.append(federated.sampling_rate(self.settings, len(self.candidates())))
            epsilon = federated.epsilon_after(self.settings, self.state.dp_rates)
            figures = {"epsilon": epsilon}
        if epsilon is not None:
            metrics.DP_EPSILON.labels(SERVER, self.session).set(epsilon)
        return {**figures, "clip": clip}

    # -- secure aggregation ---------------------------------------------------------------

    def secure_sum(self, sampled: list[str], recipients: list[str]) -> tuple[secagg.Aggregate, list[str], list[Answer]]:
        """The round's aggregate by SecAgg+ (roles.fedavg.secure): the model and the attempt's
        parameters to the sampled workers, then keys, shares, masked inputs and the shares that
        unmask their sum, each stage a collection like an update's. An attempt that cannot be
        unmasked (too few neighbours revealed) is run again with fresh keys until the run's
        timeout; its inputs are never used. Returns the aggregate, its contributors and their
        masked inputs' answers (acked once the round is on disk)."""
        if len(sampled) < 2:
            raise RoleTimeout(f"round {self.state.round}: {len(sampled)} live worker, and a secure sum of one would be its update")
        k, t = self.settings.secagg_graph(len(sampled), fitted=True)  # the round may be smaller than the run's start was checked for
        give_up = time.monotonic() + self.deployment.timeout
        first = True
        while True:
            self.secure = SecureRound.start(self.state.run_id, self.state.round, sampled, k, t, self.settings, self.parameters, self.endpoint.trusted)
            evaluators = sorted(self.scoring.expected.difference(recipients)) if self.scoring and first else ()
            self.send_models(recipients, evaluators=evaluators)
            first = False
            try:
                return self.secure_stages()
            except SecAggError as exc:
                for answer in self.secure.held:  # the attempt's inputs are never used: let them go
                    self.endpoint.ack(answer.delivery)
                metrics.SECAGG_FAILURES.labels(SERVER, self.session).inc()
                if time.monotonic() > give_up:
                    raise RoleTimeout(f"round {self.state.round}: no secure sum could be unmasked: {exc}") from None
                log.warning("round %d: the secure sum of attempt %s cannot be unmasked (%s): running the round again", self.state.round,
                            self.secure.config.attempt, exc)
            finally:
                self.secure = None

    def secure_stages(self) -> tuple[secagg.Aggregate, list[str], list[Answer]]:
        """One attempt's stages after the model went out."""
        attempt, round_number = self.secure, self.state.round
        stages = ((KEYS, NEIGHBOURS, attempt.neighbour_keys), (SHARES, SEALED, attempt.sealed_for), (MASKED, None, None))
        for kind, reply, tensors_for in stages:
            expected = attempt.expected(kind)
            answers = self.collect(set(expected), kind, with_scores=kind == MASKED)
            self.went_on_without(kind, expected - set(answers))
            if reply is not None:
                self.endpoint.send_messages([(worker_queue(self.session, worker), Message(reply, "", "", round=round_number, meta={"attempt": attempt.config.attempt},
                                                                                          tensors=tensors_for(worker)), worker) for worker in sorted(answers)],
                                            persistent=True)
        survivors, dropped = attempt.unmask_sets()
        request = {"attempt": attempt.config.attempt, "survivors": survivors, "dropped": dropped}
        self.endpoint.send_messages([(worker_queue(self.session, worker), Message(UNMASK, "", "", round=round_number, meta=dict(request)), worker)
                                     for worker in survivors], persistent=True)
        # A survivor that died after its input needs no shares of its own: whether enough consents
        # and shares came in is for the workers and the unmasking to say, not the quorum.
        self.collect(set(survivors), CONSENT, with_scores=False, quorum=1)
        consents = dict(attempt.consents)  # every consent to every consenter: each one's signature (empty without a key list)
        self.went_on_without(CONSENT, set(survivors) - set(consents))
        self.endpoint.send_messages([(worker_queue(self.session, worker), Message(CONSENTS, "", "", round=round_number, meta={"attempt": attempt.config.attempt},
                                                                                  tensors=consents), worker) for worker in sorted(consents)], persistent=True)
        revealed = self.collect(set(consents), REVEAL, with_scores=False, quorum=1)
        self.went_on_without(REVEAL, set(survivors) - set(revealed))
        total = attempt.unmasked_sum()
        aggregate = attempt.config.encoding(federated.dp_weighted(self.settings)).decode(total, len(survivors))
        log.info("round %d: secure sum of %d workers unmasked (%d dropped after sharing, %d left before)", round_number, len(survivors), len(dropped),
                 len(attempt.config.participants) - len(survivors) - len(dropped))
        return aggregate, survivors, attempt.held

    def went_on_without(self, kind: str, left: set[str]) -> None:
        """Workers a secure round's stage closed without: counted by stage, and logged."""
        if left:
            metrics.SECAGG_DROPOUTS.labels(SERVER, self.session, kind.removeprefix("secagg-")).inc(len(left))
            log.warning("round %d: secure sum goes on without %s (no %s)", self.state.round, ", ".join(sorted(left)), kind)

    def own_evaluation(self) -> dict:
        """The server's own score of the global model (accuracy and loss; None without data)."""
        if not self.server_scores:
            return {"accuracy": None, "loss": None}
        self.model.eval()
        evaluation = train.evaluate(self.model, self.test_data, self.settings.eval_batch_size, self.loss_of, self.task.compute)
        return {"accuracy": evaluation.accuracy, "loss": evaluation.loss}

    # -- the parties' scores --------------------------------------------------------------

    def pending_scoring(self) -> Scoring | None:
        """The scores the last round's record waits for, if any."""
        return Scoring(self.state.unscored["step"], set(self.state.scorers)) if self.state.unscored else None

    def close_scoring(self) -> Scoring | None:
        """The scores gathered in the collection that just closed, if it gathered any; who did
        not answer in time is left out, and the log says so."""
        scoring, self.scoring = self.scoring, None
        if scoring is not None and (absent := sorted(scoring.expected - set(scoring.answers))):
            log.warning("%s did not score round %d's model in time: left out of the parties' figures", ", ".join(absent), scoring.round)
        return scoring

    def scored_record(self, record: dict, scoring: Scoring) -> dict:
        """`record` with the parties' figures; with --evaluate parties their total is its accuracy and loss."""
        figures = federated.parties_figures({worker: answer.score for worker, answer in scoring.answers.items()})
        scored = {**record, **figures}
        if not self.server_scores:
            scored.update(accuracy=figures["parties_accuracy"], loss=figures["parties_loss"])
        return scored

    def score_last_round(self) -> None:
        """After the last round: its model, sent alone to the workers due to score it, scored and
        the record complete (on disk before their scores are acked)."""
        self.scoring = self.pending_scoring()
        self.send_models([], evaluators=sorted(self.scoring.expected))
        self.collect(set(), None)
        scoring = self.close_scoring()
        scored = self.scored_record(self.state.unscored, scoring)
        self.state.history.append(scored)
        self.state.unscored, self.state.scorers = {}, []
        self.state.missed = sorted((set(self.state.missed) | scoring.expected) - set(scoring.answers))
        self.checkpoint(with_model=False)
        for answer in scoring.answers.values():
            self.endpoint.ack(answer.delivery)
        self.report(scored)

    def report(self, record: dict) -> None:
        """A round whose record is complete: its score in the metrics, the progress and the log."""
        metrics.TEST_ACCURACY.labels(SERVER, self.session).set(record["accuracy"])
        metrics.TEST_LOSS.labels(SERVER, self.session).set(record["loss"])
        if self.on_progress:
            self.on_progress(Progress("round", record["step"], self.settings.rounds, record["train_loss"], record))
        log.info("round %d: %s, %d updates, %.1fs", record["step"], self.scores_of(record), len(record["workers"]), record["seconds"])

    def scores_of(self, record: dict) -> str:
        """A record's scores, for the log."""
        scores = [f"test accuracy {record['accuracy']:.4f}, test loss {record['loss']:.4f}"] if self.server_scores else []
        if "parties" in record:
            scores.append(f"parties' test accuracy {record['parties_accuracy']:.4f}, test loss {record['parties_loss']:.4f} "
                          f"over {record['parties_samples']} samples of {len(record['parties'])} workers")
        return "; ".join(scores)

    def calibrate(self) -> None:
        """CCVR after the last round: every worker not given up on sends the feature statistics of
        its share under the final model, and the last layer is retrained on them; with --evaluate
        parties or both, the workers whose statistics were pooled then score the calibrated model.
        As updates, the statistics and the scores stay unacked until the calibrated model is on
        disk: a server restarted meanwhile gets them again and calibrates the same way."""
        missed = set(self.state.missed)
        self.state.sampled = [worker for worker in self.state.workers if worker not in missed]
        self.state.sampled_round = self.state.round
        self.send_models(self.state.sampled)
        answers: dict[str, Statistics] = dict(sorted(self.collect(set(self.state.sampled), STATISTICS).items()))  # pooled in a fixed order
        started = time.perf_counter()
        train_loss = federated.calibrate(self.model, [answer.statistics for answer in answers.values()], self.settings)
        record = {"step": self.settings.rounds, **self.own_evaluation(), "train_loss": train_loss}
        held: list[Answer] = list(answers.values())
        if self.parties_score:
            self.scoring = Scoring(self.state.round, set(answers))
            self.send_models([], evaluators=sorted(answers))
            self.collect(set(), None)
            scoring = self.close_scoring()
            record = self.scored_record(record, scoring)
            held += scoring.answers.values()
        self.state.calibration = {**record, "seconds": time.perf_counter() - started, "round": self.state.round, "workers": sorted(answers)}
        self.checkpoint(with_model=True)
        for answer in held:
            self.endpoint.ack(answer.delivery)
        record = self.state.calibration
        metrics.TEST_ACCURACY.labels(SERVER, self.session).set(record["accuracy"])
        metrics.TEST_LOSS.labels(SERVER, self.session).set(record["loss"])
        if self.on_progress:
            self.on_progress(Progress("calibration", 1, 1, record["train_loss"], record))
        log.info("calibrated (ccvr) on the statistics of %d workers: %s", len(answers), self.scores_of(record))

    def _round_metrics(self, record: dict, contributors: list[str], received_bytes: int, sampled: list[str]) -> None:
        session = self.session
        if record["train_loss"] is not None:
            metrics.TRAIN_LOSS.labels(SERVER, session).set(record["train_loss"])
        metrics.ROUND_SECONDS.labels(SERVER, session).observe(record["seconds"])
        metrics.ROUND_BYTES.labels(SERVER, session).set(received_bytes)
        metrics.ACTIVE_WORKERS.labels(SERVER, session).set(len(self.state.workers) - len(self.state.missed))
        for worker in sampled:  # the others had no round to miss
            missed = metrics.WORKER_MISSED_ROUNDS.labels(SERVER, session, worker)
            missed.set(0) if worker in contributors else missed.inc()

    def collect(self, expected: set[str], kind: str | None, with_scores: bool = True, quorum: int | None = None) -> dict[str, Answer]:
        """`kind` answers from the `expected` workers (kind None: none, only the scores that
        `scoring` waits for), in one `Collection`; `with_scores` False: it need not wait for the
        scores; `quorum`: the answers it may close with at the round timeout (default: --min-workers)."""
        collection = Collection(self, kind, expected, with_scores, quorum)
        collection.consume()
        return collection.answers

    def answer_of(self, message: Message, delivery: Delivery) -> Answer:
        """The record of an update, statistics or a score that passed the collection's checks."""
        samples, size = message.meta.get("samples", 0), len(delivery.body)
        if message.kind in SECURE_STAGES:
            self.secure.take(message)
            return Answer(samples, delivery, size, _reported_epsilon(message))
        if message.kind == EVALUATED:
            return Evaluated(samples, delivery, size, None, train.Score(message.meta["correct"], float(message.meta["loss_sum"]), samples))
        if message.kind == STATISTICS:  # pooled on the CPU, in float64 (learning.calibration)
            return Statistics(samples, delivery, size, None, calibration.ClassStatistics.from_tensors({name: torch.from_numpy(array) for name, array in message.tensors.items()}))
        tensors = {name: from_numpy(array, self.task.compute.device) for name, array in message.tensors.items()}  # averaged on the device
        control_delta = strategies.flatten(without_prefix(CONTROL_DELTA, tensors), self.names) if self.recipe.control_variates else None
        return Update(samples, delivery, size, _reported_epsilon(message), strategies.flatten(tensors, self.names), control_delta,
                      float(message.meta.get("train_loss") or 0.0), message.meta.get("under_clip") is True)

    def scored_by(self, round_number: int) -> Names[str]:
        """The workers whose scores of the model of `round_number` are on record."""
        if self.state.calibration.get("round") == round_number:
            return self.state.calibration.get("parties", {})
        if 1 <= round_number <= len(self.state.history):
            return self.state.history[round_number - 1].get("parties", {})
        return ()


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
    sampled workers, and the scores the server's `scoring` waits for, until every expected one
    sent its answer, or the round timeout has passed with at least `min_workers` answers (and one
    score); the run gives up `timeout` after the collection began. Joins are answered on the way;
    one from a sampled worker (restarted mid-round) gets this round's model. Each answer stays
    unacked (LATER) until the server has its effect on disk."""

    def __init__(self, server: FedAvgServer, kind: str | None, expected: set[str], with_scores: bool = True, quorum: int | None = None):
        self.server = server
        self.endpoint = server.endpoint
        self.kind = kind
        self.expected = expected
        self.with_scores = with_scores
        self.sampled = set(server.state.sampled)
        self.quorum = (quorum or min(server.quorum, len(self.sampled))) if kind is not None else 0
        self.answers: dict[str, Answer] = {}
        self.round_deadline = time.monotonic() + server.deployment.round_timeout
        self.give_up = time.monotonic() + server.deployment.timeout
        self.on_deadline()

    def expecting(self) -> tuple[tuple[str, ...], None]:
        # Scores are taken whenever the workers score: a late one is refused for what it is.
        return (JOIN, *((self.kind,) if self.kind else ()), *((EVALUATED,) if self.server.parties_score else ())), None

    def check(self, message: Message) -> None:
        server, state = self.server, self.server.state
        server.check_join(message)
        if message.kind == EVALUATED:
            self.check_score(message)
        if message.kind != self.kind:
            return
        if not state.is_member(message.sender):
            raise ProtocolError("sender", f"update from {message.sender!r}, which has not joined")
        _check_epsilon(message)
        if self.kind in SECURE_STAGES:
            if server.secure is None:
                raise ProtocolError("stale", f"{message.kind} from {message.sender}, but no secure sum is under way")
            server.secure.check(message)
            if message.sender in self.answers:
                raise ProtocolError("duplicate", f"second {message.kind} from {message.sender} in attempt {server.secure.config.attempt}")
            return
        if message.round < state.round:
            if message.sender in state.contributors.get(str(message.round), ()):
                raise ProtocolError("duplicate", f"update for round {message.round} from {message.sender} was applied already")
            self.heard_from(message.sender)  # alive after all, only slow: wait for it next round
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
        if self.kind == UPDATE and server.settings.dp == "none" and not _finite_number(loss):  # under DP a worker reports no loss
            raise ProtocolError("value", f"update from {message.sender} reports train_loss={loss!r:.40}")
        if self.kind == STATISTICS:
            _check_class_counts(message.tensors["class_counts"], samples, message.sender)

    def check_score(self, message: Message) -> None:
        """A score must be of the model being scored, from a worker asked to score it, with
        counts that can be true: whole numbers of samples (as many as its first score since it
        joined), no more of them correct, and a finite, non-negative sum of losses."""
        server, state, scoring, sender = self.server, self.server.state, self.server.scoring, message.sender
        if not state.is_member(sender):
            raise ProtocolError("sender", f"score from {sender!r}, which has not joined")
        check_tensors(message, {})
        if scoring is None or message.round != scoring.round:
            if sender in server.scored_by(message.round):
                raise ProtocolError("duplicate", f"score of round {message.round}'s model from {sender} was counted already")
            if message.round < (scoring.round if scoring is not None else state.round):
                self.heard_from(sender)
                raise ProtocolError("stale", f"score of round {message.round}'s model from {sender}, which is no longer being scored")
            raise ProtocolError("out-of-order", f"score of round {message.round}'s model from {sender}, which is not being scored")
        if sender not in scoring.expected:
            raise ProtocolError("unsampled", f"score of round {message.round}'s model from {sender}, which was not asked to score it")
        correct, loss_sum, samples = (message.meta.get(name) for name in ("correct", "loss_sum", "samples"))
        ceiling = server.deployment.max_samples
        if not _count(samples) or not 0 < samples <= ceiling:
            raise ProtocolError("value", f"score from {sender} reports samples={samples!r:.40} (at most {ceiling})")
        if not _count(correct) or correct > samples:
            raise ProtocolError("value", f"score from {sender} reports correct={correct!r:.40} of samples={samples}")
        if not _finite_number(loss_sum) or loss_sum < 0:
            raise ProtocolError("value", f"score from {sender} reports loss_sum={loss_sum!r:.40}")
        if (claimed := state.evaluation_samples.get(sender)) is not None and samples != claimed:
            raise ProtocolError("value", f"score from {sender} is over {samples} samples, but its first score since it joined was over {claimed}")

    def heard_from(self, worker: str) -> None:
        """A worker given up on that turns out to be alive (a late answer) is waited for again."""
        state = self.server.state
        if worker in state.missed:
            state.missed.remove(worker)
            metrics.WORKER_MISSED_ROUNDS.labels(SERVER, self.server.session, worker).set(0)

    def on_reject(self, rejection: Rejection) -> None:
        self.server.refuse(rejection)

    def handle(self, message: Message, delivery: Delivery) -> str | None:
        if message.kind == JOIN:
            # Without sampling a newcomer takes part at once; with it, it waits to be drawn. A
            # secure round's workers are fixed when it starts: a newcomer waits for the next.
            takes_part = self.kind in (UPDATE, STATISTICS) and (message.sender in self.sampled or not self.server.settings.samples_clients())
            if takes_part and message.sender not in self.sampled:
                self.sampled.add(message.sender)
                self.expected.add(message.sender)
                self.server.state.sampled = sorted(self.sampled)
            self.server.join(message, frame_digest(delivery.body), send_model=takes_part)
            return None
        if message.kind == EVALUATED:
            self.hold(self.server.scoring.answers, message, delivery)
            self.server.state.evaluation_samples.setdefault(message.sender, message.meta["samples"])
            return LATER
        if message.kind in SECURE_STAGES:  # the attempt's state is in memory only: a restarted server runs the round again
            self.answers[message.sender] = self.server.answer_of(message, delivery)
            if message.kind != MASKED:
                return None
            self.server.secure.held.append(self.answers[message.sender])
        elif self.hold(self.answers, message, delivery):
            metrics.UPDATES.labels(SERVER, self.server.session, "accepted").inc()
        return LATER

    def hold(self, answers: dict[str, Answer], message: Message, delivery: Delivery) -> bool:
        """Keep a valid answer unacked; False for a second copy from the same worker."""
        if (first := answers.get(message.sender)) is not None:
            # A second copy for this round, e.g. redelivered after a reconnect made the first
            # one's ack impossible: hold the newer delivery, so the answer stays in the queue
            # until the round is on disk, and let the first one go.
            self.endpoint.rejected("duplicate", f"second {message.kind} for round {message.round} from {message.sender}")
            self.endpoint.ack(first.delivery)
            first.delivery = delivery
            return False
        answers[message.sender] = self.server.answer_of(message, delivery)
        return True

    def next_deadline(self) -> float:
        return self.round_deadline if time.monotonic() < self.round_deadline else self.give_up

    def on_deadline(self) -> None:
        now, scoring = time.monotonic(), self.server.scoring if self.with_scores else None
        complete = self.expected <= set(self.answers) and (scoring is None or scoring.expected <= set(scoring.answers))
        enough = len(self.answers) >= self.quorum and (scoring is None or len(scoring.answers) > 0)
        if complete or (now >= self.round_deadline and enough):
            self.finished = True
        elif now >= self.give_up:
            if len(self.answers) < self.quorum:
                raise RoleTimeout(f"round {self.server.state.round}: {len(self.answers)} updates, fewer than the {self.quorum} needed")
            raise RoleTimeout(f"no worker scored round {scoring.round}'s model")

    def on_silence(self, seconds: float) -> None:
        """Silence as long as `timeout` means the collection's own give-up time has passed too."""
        self.on_deadline()


def _check_epsilon(message: Message) -> None:
    """Sample-level DP figures a worker reports: two finite, non-negative numbers, the second no smaller."""
    if "epsilon" not in message.meta:
        return
    now, upcoming = message.meta.get("epsilon"), message.meta.get("epsilon_next")
    if not (_finite_number(now) or now == math.inf) or not (_finite_number(upcoming) or upcoming == math.inf) or not 0 <= now <= upcoming:
        raise ProtocolError("value", f"{message.kind} from {message.sender} reports epsilon {now!r:.40}, then {upcoming!r:.40}")


def _check_class_counts(counts: np.ndarray, samples: int, sender: str) -> None:
    """A worker's class counts are whole, non-negative and add up to the samples it reports (a
    count is the weight of its statistics in the pooled Gaussians)."""
    if (counts < 0).any() or (counts != counts.round()).any() or int(counts.sum()) != samples:
        raise ProtocolError("value", f"statistics from {sender}: class counts are not whole, non-negative numbers adding up to samples={samples}")


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _finite_number(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an int too large for a float
        return False
