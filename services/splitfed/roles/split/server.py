"""split-server: holds the model's middle (u-shaped) or last layers (vanilla) and no data, for one
client or several.

With several clients the schedule (roles.split.schedules) decides what the server holds and
when an epoch closes: splitfed-v2 (one set of layers trained by every client's batches),
splitfed-v1 (one copy per client, averaged when a period closes) or round-robin (clients train in
turns the server passes). With --syncs-per-epoch S, an epoch of splitfed-v1 or v2 closes S times
(periods: each client's batches of the epoch cut into S runs); only the last period's close names
the clients that evaluate. What the server accepts from a client is checked by roles.split.checks.
A client that stays silent for --client-timeout is given up for the epoch (or its turn passes),
as long as --min-clients remain; it is not waited for again until it is heard from. Evaluation
batches are answered with the layers as they were when the epoch closed, so clients that have
gone on training do not change the model being scored.

The server builds the whole model from the task, as every client does, and keeps its layers.
Where it cannot know what the model is built for without data (a party's own data, and a task
that declares no input_shape and classes), it builds it from the first client's hello it accepts
(one sample's shape and the class list); every client's hello must match the server's shape and
fingerprint (learning.tasks.fingerprint), or it is refused with how they differ. --evaluate
parties (or both) has each evaluator score its whole own test data as well, and the server adds
up their counts (roles.split.records.EpochLog).
"""

from __future__ import annotations

import collections
import copy
import logging
import time
import uuid
from pathlib import Path

import numpy as np
import torch

from splitfed.errors import DataError, TaskError
from splitfed.learning import clients, cutting, models, train
from splitfed.learning.context import context_of
from splitfed.learning.device import from_numpy, to_numpy
from splitfed.learning.settings import SplitNNSettings
from splitfed.learning.tasks import Task, fingerprint, fingerprint_difference
from splitfed.observability import metrics
from splitfed.protocol import Message
from splitfed.roles.base import LATER, Role
from splitfed.roles.declaration import Identity, Progress, ProgressSink
from splitfed.roles.endpoint import Endpoint, Rejection, queue_name
from splitfed.roles.limits import FRAME_HEADER_BYTES, layout_meta
from splitfed.roles.p2p.common import fingerprint_of
from splitfed.roles.split.checks import check_client_message, input_shape_of
from splitfed.roles.split.client import layer_specs
from splitfed.roles.split.common import (
    ABORT, ACTIVATIONS, CLIENT, DONE, EVALUATED, FED, GRADIENTS, HANDED, HANDSHAKE, HELLO, OUTPUTS, SERVER, TRAINED,
    client_name, client_queue, largest_messages, save_parts, shared,
)
from splitfed.roles.split.records import ClientState, EpochLog
from splitfed.roles.split.schedules import schedule_for
from splitfed.transport import Delivery, Transport

log = logging.getLogger(__name__)
FROM_CLIENTS = (HELLO, ACTIVATIONS, GRADIENTS, TRAINED, HANDED, EVALUATED)


class SplitServer(Role):
    def __init__(
        self, settings: SplitNNSettings, deployment, transport: Transport, identity: Identity = Identity(),  # noqa: ANN001 (roles.split.SplitParty)
        on_progress: ProgressSink | None = None,
    ):
        self.settings = settings
        clients.check_evaluation(settings)
        self.save: Path | None = deployment.save
        self.on_progress = on_progress
        self.session = deployment.session
        self.task = Task(settings)
        self.compute = self.task.compute
        self.wire = settings.wire_dtype  # activations in, gradients out: the clients send the same
        self.context = context_of(settings, SERVER, SERVER)
        self.loss_of = self.task.loss(self.context)  # vanilla: the server computes the loss
        self.known_shape, self.known_classes = self.task.declared_shape(), self.task.declared_classes()
        names = [client_name(index, settings.clients) for index in range(settings.clients)]
        self.schedule = schedule_for(settings, names)
        self.endpoint = Endpoint(
            transport, session=self.session, role=SERVER, inbox=queue_name(self.session, SERVER), timeout=deployment.timeout,
            signer=identity.signer, trusted=identity.trusted, peer_roles=(CLIENT,), handshake=HANDSHAKE,
            max_message_bytes=FRAME_HEADER_BYTES,  # until it holds its model only hellos can come, and they are metadata (`hold` raises it)
        )
        self.endpoint.bind(uuid.uuid4().hex)  # this server's run: drawn afresh at every start
        self.started_at = time.time()  # stated in its hello, so a relay follows the newest run
        now = time.monotonic()
        self.clients = {name: ClientState(name, index, client_queue(self.session, deployment.via, index, settings.clients), heard=now)
                        for index, name in enumerate(names)}
        for state in self.clients.values():
            transport.declare(state.queue)
        self.fed = queue_name(self.session, FED) if self.schedule.fed else None
        if self.fed:
            transport.declare(self.fed)
        # The model: built now where the data set or the task says what it is built for; else
        # from what the first client it accepts states in its hello (the server holds no data).
        self.body: torch.nn.Sequential | None = None  # the shared layers (splitfed-v1: the average, after each epoch)
        self.evaluation_body: torch.nn.Sequential | None = None  # the layers evaluation batches see: as the last epoch closed
        self.opt: torch.optim.Optimizer | None = None
        self.fingerprint: dict | None = None
        self.input_shape: tuple[int, ...] | None = None  # one sample's, as the clients' data has it
        self.in_shape: tuple[int, ...] | None = None  # per sample, at the cut
        self.out_shape: tuple[int, ...] | None = None
        self.classes = 0
        self.cut_layer: int | None = None  # the index of the server's first layer in the whole model
        if self.known_shape is not None and self.known_classes is not None:
            self.hold(*self.whole_model(self.task))
        self.epoch, self.period = 1, 1
        self.epoch_started = time.perf_counter()
        self.epochs: list[EpochLog] = []
        self.awaiting_evaluation: EpochLog | None = None  # closed, its evaluator not yet heard
        self.compute_seconds = 0.0  # time spent handling messages: the server's share of a round trip
        self.held: collections.deque[tuple[Message, Delivery]] = collections.deque()  # training batches waiting for the shared layers (Schedule.must_wait)
        self.active = metrics.SPLIT_ACTIVE_CLIENTS.labels(SERVER, self.session)

    def whole_model(self, task: Task) -> tuple[torch.nn.Sequential, tuple[str, ...], tuple[int, ...]]:
        """The whole model `task` builds (seeded: every party builds the same one), its classes and
        one sample's input shape."""
        return task.sequential(self.context), task.classes(self.context), task.data_shape(self.context).shape

    def hold(self, whole: torch.nn.Sequential, classes: tuple[str, ...], input_shape: tuple[int, ...]) -> None:
        """Keep the server's layers of `whole`, and what the checks of the clients' messages need;
        accept the largest messages the clients can send from now on, and name the run to the fed
        (which follows the newest server to say hello) with a client's layers' names, dtypes and shapes."""
        self.fingerprint = fingerprint(whole, classes)
        self.classes, self.input_shape = len(classes), input_shape
        parts = cutting.cut(whole, self.settings.cut_layer, self.settings.mode)
        self.cut_layer = parts.cut_layer
        self.in_shape = models.output_shape(parts.head, input_shape)
        self.out_shape = models.output_shape(parts.body, self.in_shape)
        self.endpoint.limit(largest_messages(self.settings, self.in_shape, self.out_shape).to_server)
        if self.fed:
            self.endpoint.send(self.fed, HELLO, run=self.endpoint.run, started=self.started_at, layout=layout_meta(layer_specs(parts)))
        self.body = parts.body
        self.opt = train.optimizer(self.body.parameters(), self.settings.optimizer, self.settings.lr)
        for state in self.clients.values():
            state.body, state.opt = self.schedule.layers(self.body, self.opt)
        self.evaluation_body = copy.deepcopy(self.body)

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> dict:
        if self.body is None:
            log.info("split-server ready: %s mode, %s, %d client(s); the model's input shape and classes come with the first client's hello",
                     self.settings.mode, self.settings.schedule, self.settings.clients)
        else:
            log.info("split-server ready: %s mode, %s, %d client(s), layers %d.., input %s",
                     self.settings.mode, self.settings.schedule, self.settings.clients, self.cut_layer, self.in_shape)
        self.consume()
        if self.save and self.body is not None:
            save_parts(self.save, [(self.body.state_dict(), self.cut_layer)])
        return self.result()

    def expecting(self) -> tuple[tuple[str, ...], list[str]]:
        return FROM_CLIENTS, list(self.clients)

    def handle(self, message: Message, delivery: Delivery) -> str | None:
        """Take `message`, or hold it unacked (LATER) until the shared layers are free; then the
        held batches that can go on."""
        if self.schedule.must_wait(message, self.clients.values()):
            self.clients[message.sender].heard = time.monotonic()  # waiting on another client, not silent
            self.held.append((message, delivery))
            return LATER
        self.take(message)
        self.release_held()
        return None

    def release_held(self) -> None:
        """Take the held batches, in the order they came, while the shared layers are free."""
        while self.held and not self.schedule.must_wait(self.held[0][0], self.clients.values()):
            message, delivery = self.held.popleft()
            self.take(message)
            self.endpoint.ack(delivery)

    def take(self, message: Message) -> None:
        """Apply a client's message, timed: the server's share of a round trip."""
        started = time.perf_counter()
        state = self.clients[message.sender]
        state.heard = time.monotonic()
        if state.gone and message.kind != HELLO:
            state.gone = False
            log.info("split-server: %s is heard from again", state.name)
            self.count_active()
        self.apply(state, message)
        self.compute_seconds += time.perf_counter() - started

    def apply(self, state: ClientState, message: Message) -> None:
        if message.kind == HELLO:
            self.greet(state, message)
        elif message.kind == ACTIVATIONS:
            self.forward(state, message)
        elif message.kind == GRADIENTS:
            self.backward(state, message)
        elif message.kind == TRAINED:
            self.trained(state, message)
        elif message.kind == HANDED:
            self.schedule.handed(self)
        elif message.kind == EVALUATED:
            self.evaluated(state, message)

    # -- checks -----------------------------------------------------------------------------

    def check(self, message: Message) -> None:
        """Refuse what this server cannot apply, before it touches the model."""
        check_client_message(self, self.clients[message.sender], message)

    def on_reject(self, rejection: Rejection) -> None:
        """A client message of another run: this server restarted (or never saw the run's
        hello), so that run cannot go on; say so to the client rather than leave it waiting.
        An authentic message of an old run gets one abort naming that run, which the client of
        the current run refuses: replaying them costs the attacker a message per abort."""
        message = rejection.message
        if rejection.reason == "replay" and message is not None and message.sender in self.clients and message.kind not in HANDSHAKE:
            run = message.meta.get("run")
            reason = f"this split-server (run {self.endpoint.run}) does not know run {run}: it restarted, or the run began with another server"
            self.endpoint.send(self.clients[message.sender].queue, ABORT, run=run if isinstance(run, str) else "", reason=reason)

    # -- the handshake ----------------------------------------------------------------------

    def greet(self, state: ClientState, message: Message) -> None:
        """Answer a hello with this server's run, if the settings and the model match and the
        client may (re)start. A hello from a client that has begun (a restarted client, or a
        replay) is answered that it cannot rejoin; the client's run is untouched. (A client's
        hello is unnumbered, so accepting one expects the client's numbered messages from 1.)"""
        state.hellos.append(message.meta["nonce"])
        ours = shared(self.settings)
        differing = sorted(k for k in ours if message.meta.get(k) != ours[k])
        problem = ", ".join(f"{k}: client {message.meta.get(k)!r}, server {ours[k]!r}" for k in differing)
        begun = state.begun or self.epochs != []
        if begun:
            problem = f"run {self.endpoint.run} is under way ({state.name}: {state.batches} batches); a restarted client cannot rejoin it"
            log.warning("split-server: a hello from %s once the run was under way (a restarted client, or a replay); refused", state.name)
        elif not problem:
            problem = self.model_problem(state, message)
        answer = {"ok": not problem, "problem": problem, "begun": begun, "ref": message.meta["nonce"], "run": self.endpoint.run, "started": self.started_at,
                  "receives": self.endpoint.max_message_bytes}
        self.endpoint.send(state.queue, HELLO, **answer)
        if begun:
            return
        if problem:
            log.error("split-server: %s refused: %s", state.name, problem)
            if self.settings.clients == 1:
                self.finished = True  # the only client cannot train with this server
            return
        if not any(s.greeted for s in self.clients.values()):
            self.epoch_started = time.perf_counter()  # the first epoch begins with the first client
        state.greeted, state.gone = True, False
        self.endpoint.resync(state.name)
        self.count_active()
        self.schedule.joined(self)

    def model_problem(self, state: ClientState, message: Message) -> str:
        """Why the client's model cannot be this server's other half ("" if it can): its input
        shape or its fingerprint (its whole model and classes) differ from the server's. A server
        that could not know the shape or the classes without data builds its model from the first
        hello that agrees with it, and holds every later client to that."""
        shape, stated = input_shape_of(message.meta), fingerprint_of(message.meta)
        held = None
        if self.body is None:
            task = clients.StatedTask(self.settings, self.known_shape or shape, self.known_classes or tuple(stated["classes"]))
            try:
                held = self.whole_model(task)
            except (TaskError, DataError, ValueError, RuntimeError) as exc:
                return f"the split-server cannot build the model for {state.name}'s input shape {shape}: {exc}"
        mine, input_shape = (fingerprint(held[0], held[1]), held[2]) if held else (self.fingerprint, self.input_shape)
        if shape != input_shape:
            return f"{state.name}'s samples are of shape {shape}, the run's of {input_shape}"
        if difference := fingerprint_difference(mine, stated):
            return f"{state.name}'s model and classes are not the server's: {difference} ({state.name}'s against the server's)"
        if held:
            self.hold(*held)
            log.info("split-server: %s's hello says the model takes samples of shape %s in %d classes", state.name, shape, self.classes)
        return ""

    # -- training batches -------------------------------------------------------------------

    def forward(self, state: ClientState, message: Message) -> None:
        inputs = from_numpy(message.tensors["x"], self.compute.device, torch.float32)  # (B, *in_shape)
        if message.meta.get("train") is not True:
            # A label prior (--label-dp) asks of the layers as they are now, an evaluation of them as the last epoch closed.
            body = state.body if message.meta.get("prior") is True else self.evaluation_body
            body.eval()
            with torch.no_grad(), self.compute.autocast():
                outputs = body(inputs)  # (B, *out_shape)
            self.answer(state, OUTPUTS, {"h": to_numpy(outputs, self.wire)})
            return
        state.begun = True
        state.samples += len(inputs)
        state.body.train()
        state.opt.zero_grad(set_to_none=True)
        inputs.requires_grad_(True)
        with self.compute.autocast():
            outputs = state.body(inputs)
        if self.settings.mode == "u-shaped":
            state.pending = (inputs, outputs)
            self.answer(state, OUTPUTS, {"h": to_numpy(outputs, self.wire)})
            return
        with self.compute.autocast():
            loss = self.loss_of(outputs, from_numpy(message.tensors["y"], self.compute.device))
        loss.backward()
        self.answer(state, GRADIENTS, {"g": to_numpy(inputs.grad, self.wire)}, loss=loss.item())
        self.step(state)

    def backward(self, state: ClientState, message: Message) -> None:
        """u-shaped, second half of a training batch."""
        inputs, outputs = state.pending
        state.pending = None
        outputs.backward(from_numpy(message.tensors["g"], self.compute.device, outputs.dtype))
        self.answer(state, GRADIENTS, {"g": to_numpy(inputs.grad, self.wire)})
        self.step(state)

    def step(self, state: ClientState) -> None:
        """After the answer: the client needs only the gradient at the cut, so its backward pass
        and this step overlap (the next message of any client finds the step done)."""
        state.opt.step()
        state.batches += 1

    def answer(self, state: ClientState, kind: str, tensors: dict[str, np.ndarray] | None = None, **meta: object) -> None:
        """Send a client `kind`, bound to this run like every answer but the handshakes."""
        self.endpoint.send(state.queue, kind, tensors, to=state.name, **meta)

    # -- closing epochs ---------------------------------------------------------------------

    def trained(self, state: ClientState, message: Message) -> None:
        epoch, period = message.meta["epoch"], message.meta["period"]
        if (epoch, period) != (self.epoch, self.period):
            log.warning("split-server: %s reported epoch %d period %d, which closed without it", state.name, epoch, period)
            self.schedule.late(self, state, epoch, period)
            state.samples, state.pending = 0, None
            return
        state.reported = {"train_loss": message.meta["train_loss"]}
        state.epoch_samples += state.samples
        state.epoch_loss += message.meta["train_loss"] * state.samples
        metrics.SPLIT_CLIENT_EPOCH.labels(SERVER, self.session, state.name).set(epoch)
        self.schedule.reported(self, state)

    def close_epoch(self, included: list[ClientState], evaluators: list[str]) -> EpochLog:
        """The open epoch closes with `included`: its log, scored by `evaluators`, the clients that
        hold the epoch's layers (none: reported as it is), as --evaluate says: server, each a part
        of the test set; parties, each its whole own test data; both, both. From now on
        evaluation batches see the layers as they are now."""
        samples = {s.name: s.epoch_samples for s in included}
        total = sum(samples.values())
        loss = sum(s.epoch_loss for s in included) / total if total else float("nan")
        missing = [name for name in self.clients if name not in samples]
        if missing:
            log.warning("split-server: epoch %d closes without %s (silent for %.0f s)", self.epoch, ", ".join(missing), self.settings.client_timeout)
        record = EpochLog(self.epoch, list(samples), missing, samples, loss, opened=self.epoch_started,
                          evaluators=evaluators if self.settings.evaluate in ("server", "both") else [],
                          party_evaluators=evaluators if self.settings.evaluate in ("parties", "both") else [])
        self.epochs.append(record)
        if self.awaiting_evaluation is not None:  # an evaluator is gone, or far behind: that epoch's score is what came
            self.close_evaluation()
        if not record.waiting_for():
            self.report(record)
        else:
            self.awaiting_evaluation = record
            for name in record.waiting_for():
                self.clients[name].heard = time.monotonic()
        metrics.SPLIT_EPOCH_CLIENTS.labels(SERVER, self.session).set(len(included))
        self.evaluation_body = copy.deepcopy(self.body)
        return record

    def next_period(self) -> None:
        if self.period < self.settings.syncs_per_epoch:
            self.open_period()
            self.period += 1
        else:
            self.next_epoch()

    def next_epoch(self) -> None:
        self.open_period()
        for state in self.clients.values():
            state.epoch_samples, state.epoch_loss = 0, 0.0
        self.epoch, self.period = self.epoch + 1, 1
        self.epoch_started = time.perf_counter()

    def open_period(self) -> None:
        """Nothing reported yet; a client's silence counts from now (it may have reported long
        ago, and waited for a slow one since)."""
        now = time.monotonic()
        for state in self.clients.values():
            state.samples, state.reported, state.pending, state.heard = 0, None, None, now

    def present(self, name: str) -> bool:
        """It has said hello and has not been given up."""
        return self.clients[name].greeted and not self.clients[name].gone

    def count_active(self) -> None:
        """splitfed_split_active_clients, set when a client joins, goes silent or comes back (not per batch)."""
        self.active.set(sum(1 for s in self.clients.values() if self.present(s.name)))

    # -- evaluation and the end -------------------------------------------------------------

    def evaluated(self, state: ClientState, message: Message) -> None:
        record = self.awaiting_evaluation
        if not record.scores and not record.party_scores and record.epoch == self.epoch - 1:
            # A client scores the closed epoch before it trains the next one (in round-robin,
            # before it hands its layers on), so no training of the open epoch came before this
            # first score: the open epoch's time starts now, and is its training and evaluation.
            self.epoch_started = time.perf_counter()
        if state.name in record.evaluators:
            record.scores[state.name] = (message.meta["correct"], message.meta["loss_sum"], message.meta["samples"])
        if state.name in record.party_evaluators:
            own = message.meta["own"]
            record.party_scores[state.name] = (own["correct"], own["loss_sum"], own["samples"])
        if not record.waiting_for():
            self.close_evaluation()

    def close_evaluation(self) -> None:
        """Report the epoch awaiting its evaluation with the parts scored so far; after the last
        epoch, end the run."""
        record, self.awaiting_evaluation = self.awaiting_evaluation, None
        if missing := record.waiting_for():
            log.warning("split-server: epoch %d is scored without %s (silent): on %d test samples", record.epoch, ", ".join(missing), record.evaluated_samples)
        record.add_up()
        self.report(record)
        if record.epoch == self.settings.epochs:
            self.finish()

    def report(self, record: EpochLog) -> None:
        record.seconds = time.perf_counter() - record.opened
        log.info(
            "split-server: epoch %d closed with %d client(s): accuracy %s", record.epoch, len(record.included),
            "n/a" if record.accuracy is None else f"{record.accuracy:.4f}",
        )
        if self.on_progress:
            self.on_progress(Progress("epoch", record.epoch, self.settings.epochs, record.train_loss, record.summary()))

    def finish(self) -> None:
        for state in self.clients.values():
            if state.greeted:
                self.answer(state, DONE, batches=state.batches, compute_seconds=self.compute_seconds)
        self.tell_fed(DONE)
        self.finished = True

    def tell_fed(self, kind: str, **meta: object) -> None:
        """Tell the split-fed, where the schedule has one."""
        if self.fed:
            self.endpoint.send(self.fed, kind, to=FED, **meta)

    # -- silence ----------------------------------------------------------------------------

    def deadline(self, state: ClientState) -> float:
        """When `state`'s silence gives it up: --client-timeout once it has joined; a client yet to
        say hello gets the server's --timeout from the start (processes and pods start slowly)."""
        return state.heard + (self.settings.client_timeout if state.greeted else self.endpoint.timeout)

    def next_deadline(self) -> float | None:
        return min((self.deadline(s) for s in self.waited_for()), default=None)

    def waited_for(self) -> list[ClientState]:
        """The clients whose silence would hold the run up now: evaluators, and those the schedule waits for."""
        waiting = []
        if self.awaiting_evaluation is not None:
            waiting += [self.clients[name] for name in self.awaiting_evaluation.waiting_for()]
        return waiting + self.schedule.waited_for(self)

    def on_deadline(self) -> None:
        """Give up the clients silent too long; a batch that held the shared layers may have gone with them."""
        self.enforce_deadlines()
        self.release_held()

    def enforce_deadlines(self) -> None:
        """Give up on clients that have been silent too long, and move the run on without them."""
        now = time.monotonic()
        silent = [s for s in self.waited_for() if now >= self.deadline(s)]
        for state in silent:
            log.warning("split-server: %s has been silent for %.0f s: given up", state.name, self.deadline(state) - state.heard)
            state.gone, state.pending = True, None
        if not silent:
            return
        self.count_active()
        record = self.awaiting_evaluation
        if record is not None and all(self.clients[name].gone for name in record.waiting_for()):
            self.close_evaluation()
            if self.finished:
                return
        self.schedule.after_silence(self)

    # -- results ----------------------------------------------------------------------------

    def result(self) -> dict:
        history = [record.summary() for record in self.epochs]
        last = history[-1] if history else {}
        return {
            "accuracy": last.get("accuracy"),
            "loss": last.get("loss"),
            **({"parties": last["parties"]} if "parties" in last else {}),
            "evaluate": self.settings.evaluate,
            "schedule": self.settings.schedule,
            "clients": {s.name: {"batches": s.batches, "gone": s.gone} for s in self.clients.values()},
            "history": history,
            "batches": sum(s.batches for s in self.clients.values()),
            "compute_seconds": self.compute_seconds,
            "traffic": vars(self.endpoint.traffic),
        }
