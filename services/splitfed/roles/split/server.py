"""split-server: holds the model's middle (u-shaped) or last layers (vanilla) and no data, for one
client or several.

With several clients the schedule decides what the server holds and when an epoch closes:
- splitfed-v2: one set of layers and one optimiser, trained by every client's batches in the order
  they arrive; an epoch closes when every client has reported its share (`trained`).
- splitfed-v1: one copy of the layers and optimiser per client; when the epoch closes the copies
  are averaged, weighted by the samples each client trained on, and every copy restarts from the
  average.
  With --syncs-per-epoch S, an epoch of either closes S times (periods: each client's batches of
  the epoch cut into S runs); only the last period's close names the client that evaluates.
- round-robin: one set of layers; clients train one at a time. The server passes the turn
  (`turn`) and the previous client hands its layers to the next one directly.
A client that stays silent for --client-timeout is given up for the epoch (or its turn passes),
as long as --min-clients remain; it is not waited for again until it is heard from. Evaluation
batches are answered with the layers as they were when the epoch closed, so clients that have
gone on training do not change the model being scored.
"""

from __future__ import annotations

import collections
import copy
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from splitfed.learning import cutting, data, models, train
from splitfed.learning.averaging import step_towards, weighted_average
from splitfed.learning.settings import SplitNNSettings
from splitfed.observability import metrics
from splitfed.protocol import Message, ProtocolError, TensorSpec, check_tensors
from splitfed.roles.declaration import Identity, Progress, ProgressSink
from splitfed.roles.endpoint import Endpoint, Rejection, RoleTimeout, queue_name, to_numpy
from splitfed.roles.split.common import (
    ABORT, ACTIVATIONS, CLIENT, CLOSED, DONE, EVALUATED, FED, GRADIENTS, HANDED, HANDSHAKE, HELLO, OUTPUTS, SERVER, TRAINED, TURN,
    client_name, client_queue, save_parts, shared,
)
from splitfed.transport import Delivery, Transport

log = logging.getLogger(__name__)
FROM_CLIENTS = (HELLO, ACTIVATIONS, GRADIENTS, TRAINED, HANDED, EVALUATED)


@dataclass
class ClientState:
    """What the server knows of one client."""

    name: str
    index: int
    queue: str
    body: torch.nn.Sequential  # the layers its batches train (splitfed-v1: its own copy)
    opt: torch.optim.Optimizer
    heard: float  # when it last sent anything (time.monotonic)
    greeted: bool = False
    begun: bool = False  # it has sent a batch: a new hello from it can no longer start over
    gone: bool = False  # given up after --client-timeout of silence; back once heard from
    pending: tuple[torch.Tensor, torch.Tensor] | None = None  # u-shaped: (input, output) awaiting gradients
    samples: int = 0  # training samples in the current period (the whole epoch, in round-robin)
    reported: dict | None = None  # its `trained` for the current period
    epoch_samples: int = 0  # over the current epoch's reported periods
    epoch_loss: float = 0.0  # their training loss, summed over those samples
    batches: int = 0


@dataclass
class EpochLog:
    epoch: int
    included: list[str]
    missing: list[str]
    samples: dict[str, int]  # over the whole epoch
    train_loss: float
    accuracy: float | None = None
    loss: float | None = None
    opened: float = 0.0  # time.perf_counter() when the epoch began
    seconds: float = 0.0  # from then until its evaluation was reported (or given up)
    evaluators: list[str] = field(default_factory=list)  # who scores which part of the test set, in part order
    scores: dict[str, tuple[int, float, int]] = field(default_factory=dict)  # evaluator -> (correct, loss sum, samples)

    def waiting_for(self) -> list[str]:
        return [name for name in self.evaluators if name not in self.scores]

    def add_up(self) -> None:
        """The epoch's accuracy and loss over the parts scored (all of the test set, unless an
        evaluator went silent)."""
        if samples := self.evaluated_samples:
            self.accuracy = sum(c for c, _, _ in self.scores.values()) / samples
            self.loss = sum(loss for _, loss, _ in self.scores.values()) / samples

    @property
    def evaluated_samples(self) -> int:
        return sum(n for _, _, n in self.scores.values())


class SplitServer:
    def __init__(
        self, settings: SplitNNSettings, deployment, transport: Transport, identity: Identity = Identity(),  # noqa: ANN001 (roles.split.SplitParty)
        on_progress: ProgressSink | None = None,
    ):
        self.settings = settings
        self.save: Path | None = deployment.save
        self.on_progress = on_progress
        self.session = deployment.session
        meta = data.info(settings.dataset)
        self.classes = meta.classes
        parts = cutting.cut(models.build(settings.model, meta, settings.seed), settings.cut_layer, settings.mode)
        self.cut_layer = parts.cut_layer
        self.in_shape = models.output_shape(parts.head, meta.shape)  # per sample, at the cut
        self.out_shape = models.output_shape(parts.body, self.in_shape)
        self.per_client = settings.schedule == "splitfed-v1" and settings.clients > 1
        self.averaged_bodies = False  # splitfed-v1: self.body is an average (not the initial layers) once this is set
        self.body = parts.body  # the shared layers (splitfed-v1: the average, after each epoch)
        self.opt = train.optimizer(self.body.parameters(), settings.optimizer, settings.lr)
        names = [client_name(index, settings.clients) for index in range(settings.clients)]
        self.endpoint = Endpoint(
            transport, session=self.session, role=SERVER, inbox=queue_name(self.session, SERVER), timeout=deployment.timeout,
            signer=identity.signer, trusted=identity.trusted, peer_roles=(CLIENT,), handshake=HANDSHAKE,
        )
        self.endpoint.bind(uuid.uuid4().hex)  # this server's run: drawn afresh at every start
        self.started_at = time.time()  # stated in its hello, so a relay follows the newest run
        now = time.monotonic()
        self.clients = {name: self._client(name, index, deployment.via, now) for index, name in enumerate(names)}
        for state in self.clients.values():
            transport.declare(state.queue)
        self.fed = queue_name(self.session, FED) if settings.clients > 1 and settings.schedule != "round-robin" else None
        if self.fed:  # the fed follows the run of the newest server to say hello
            transport.declare(self.fed)
            self.endpoint.send(self.fed, HELLO, run=self.endpoint.run, started=self.started_at)
        self.evaluation_body = copy.deepcopy(self.body)  # the layers evaluation batches see: as the last epoch closed
        self.epoch, self.period = 1, 1
        self.epoch_started = time.perf_counter()
        self.epochs: list[EpochLog] = []
        self.awaiting_evaluation: EpochLog | None = None  # closed, its evaluator not yet heard
        self.turns = _TurnOrder(names, settings.epochs) if settings.schedule == "round-robin" and settings.clients > 1 else None
        self.compute_seconds = 0.0  # time spent handling messages: the server's share of a round trip
        self.held: collections.deque[tuple[Message, Delivery]] = collections.deque()  # training batches waiting for the shared layers (must_wait)
        self.finished = False
        self.active = metrics.SPLIT_ACTIVE_CLIENTS.labels(SERVER, self.session)

    def _client(self, name: str, index: int, via: str, now: float) -> ClientState:
        if self.per_client:
            body = copy.deepcopy(self.body)
            opt = train.optimizer(body.parameters(), self.settings.optimizer, self.settings.lr)
        else:
            body, opt = self.body, self.opt
        return ClientState(name, index, client_queue(self.session, via, index, self.settings.clients), body, opt, heard=now)

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> dict:
        log.info(
            "split-server ready: %s mode, %s, %d client(s), layers %d.., input %s",
            self.settings.mode, self.settings.schedule, self.settings.clients, self.cut_layer, self.in_shape,
        )
        quiet_since = time.monotonic()
        while not self.finished:
            wait = max(0.01, min(self.next_deadline(), quiet_since + self.endpoint.timeout) - time.monotonic())
            received = self.endpoint.receive(FROM_CLIENTS, list(self.clients), self.check, self.on_reject, wait=wait)
            if received is not None:
                quiet_since = time.monotonic()
                self.take(*received)
            elif time.monotonic() >= quiet_since + self.endpoint.timeout:
                raise RoleTimeout(f"split-server: no client message within {self.endpoint.timeout:.0f}s")
            self.enforce_deadlines()
            self.release_held()
        if self.save:
            save_parts(self.save, [(self.body.state_dict(), self.cut_layer)])
        return self.result()

    def take(self, message: Message, delivery: Delivery) -> None:
        """Handle `message` and ack it, or hold it unacked until the shared layers are free."""
        if self.must_wait(message):
            self.clients[message.sender].heard = time.monotonic()  # waiting on another client, not silent
            self.held.append((message, delivery))
            return
        self.handle(message)
        self.endpoint.ack(delivery)
        self.release_held()

    def must_wait(self, message: Message) -> bool:
        """u-shaped with one shared server half (splitfed-v2): a batch's forward and backward
        are two messages apart, and the layers must not step in between, so another client's
        training batch waits until no batch is half done (as if the clients took turns per batch)."""
        return (message.kind == ACTIVATIONS and message.meta.get("train") is True and self.settings.mode == "u-shaped" and not self.per_client
                and any(state.pending is not None for state in self.clients.values()))

    def release_held(self) -> None:
        """Take the held batches, in the order they came, while the shared layers are free."""
        while self.held and not self.must_wait(self.held[0][0]):
            message, delivery = self.held.popleft()
            self.handle(message)
            self.endpoint.ack(delivery)

    def handle(self, message: Message) -> None:
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
            self.turns.handed_to = self.turns.holder
            self.clients[self.turns.holder].heard = time.monotonic()  # its turn starts now that it has the layers
        elif message.kind == EVALUATED:
            self.evaluated(state, message)

    # -- checks -----------------------------------------------------------------------------

    def check(self, message: Message) -> None:
        """Refuse what this server cannot apply, before it touches the model."""
        state = self.clients[message.sender]
        if message.kind == HELLO:
            if not isinstance(message.meta.get("nonce"), str):
                raise ProtocolError("malformed", "hello without a nonce")
            return
        if not state.greeted:
            raise ProtocolError("kind", f"{message.kind} from {state.name} before its hello")
        training = message.meta.get("train") is True
        vanilla_train = self.settings.mode == "vanilla" and training
        if message.kind == ACTIVATIONS:
            specs = {"x": TensorSpec("float32", (None, *self.in_shape))}
            if vanilla_train:
                specs["y"] = TensorSpec("int64", (None,))
            check_tensors(message, specs)
            if vanilla_train and not np.all((message.tensors["y"] >= 0) & (message.tensors["y"] < self.classes)):
                raise ProtocolError("value", f"labels outside 0..{self.classes - 1}")
            if training and state.pending is not None:
                raise ProtocolError("kind", "new activations while gradients for the last batch are outstanding")
            if training and self.turns is not None and self.turns.holder != state.name:
                raise ProtocolError("kind", f"a training batch from {state.name}, whose turn it is not")
        elif message.kind == GRADIENTS:
            if state.pending is None:
                raise ProtocolError("kind", "gradients with no batch outstanding")
            check_tensors(message, {"g": TensorSpec("float32", (len(state.pending[1]), *self.out_shape))})
        elif message.kind == TRAINED:
            epoch, period, loss = message.meta.get("epoch"), message.meta.get("period"), message.meta.get("train_loss")
            if not isinstance(epoch, int) or not isinstance(period, int) or not 1 <= period <= self.settings.syncs_per_epoch or not isinstance(loss, float):
                raise ProtocolError("malformed", f"trained needs an integer epoch, a period in 1..{self.settings.syncs_per_epoch} and a float train_loss")
            if self.turns is not None and self.turns.holder != state.name:
                raise ProtocolError("kind", f"trained from {state.name}, whose turn it is not")
            if (epoch, period) > (self.epoch, self.period):
                raise ProtocolError("kind", f"trained for epoch {epoch} period {period} from {state.name} while epoch {self.epoch} period {self.period} is open")
        elif message.kind == HANDED:
            if self.turns is None or self.turns.previous != state.name or message.meta.get("holder") != self.turns.holder:
                raise ProtocolError("kind", f"handed from {state.name}, which was not asked to hand on its layers")
        elif message.kind == EVALUATED:
            pending = self.awaiting_evaluation
            if pending is None or state.name not in pending.waiting_for() or message.meta.get("epoch") != pending.epoch:
                raise ProtocolError("kind", f"an evaluation from {state.name} that was not asked for")
            correct, loss_sum, samples = (message.meta.get(k) for k in ("correct", "loss_sum", "samples"))
            if not (isinstance(samples, int) and isinstance(correct, int) and 0 <= correct <= samples and isinstance(loss_sum, float) and loss_sum >= 0):
                raise ProtocolError("malformed", f"evaluated needs whole counts 0 <= correct <= samples and a float loss_sum >= 0, not {correct!r:.20}, {samples!r:.20}, {loss_sum!r:.30}")

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
        """Answer a hello with this server's run, if the settings match and the client may
        (re)start. A hello from a client that has begun (a restarted client, or a replay) is
        answered that it cannot rejoin; the client's run is untouched. (A client's hello is
        unnumbered, so accepting one expects the client's numbered messages from 1.)"""
        ours = shared(self.settings)
        differing = sorted(k for k in ours if message.meta.get(k) != ours[k])
        problem = ", ".join(f"{k}: client {message.meta.get(k)!r}, server {ours[k]!r}" for k in differing)
        begun = state.begun or self.epochs != []
        if begun:
            problem = f"run {self.endpoint.run} is under way ({state.name}: {state.batches} batches); a restarted client cannot rejoin it"
            log.warning("split-server: a hello from %s once the run was under way (a restarted client, or a replay); refused", state.name)
        answer = {"ok": not problem, "problem": problem, "begun": begun, "ref": message.meta["nonce"], "run": self.endpoint.run, "started": self.started_at}
        self.endpoint.send(state.queue, HELLO, **answer)
        if begun:
            return
        if differing:
            log.error("split-server: %s's settings differ (%s)", state.name, problem)
            if self.settings.clients == 1:
                self.finished = True  # the only client cannot train with this server
            return
        if not any(s.greeted for s in self.clients.values()):
            self.epoch_started = time.perf_counter()  # the first epoch begins with the first client
        state.greeted, state.gone = True, False
        self.endpoint.resync(state.name)
        self.count_active()
        if self.turns is not None and not self.turns.started and all(s.greeted for s in self.clients.values()):
            self.pass_turn()

    # -- training batches -------------------------------------------------------------------

    def forward(self, state: ClientState, message: Message) -> None:
        inputs = torch.from_numpy(message.tensors["x"])  # (B, *in_shape)
        if message.meta.get("train") is not True:
            self.evaluation_body.eval()
            with torch.no_grad():
                outputs = self.evaluation_body(inputs)  # (B, *out_shape)
            self.answer(state, OUTPUTS, {"h": to_numpy(outputs)})
            return
        state.begun = True
        state.samples += len(inputs)
        state.body.train()
        state.opt.zero_grad(set_to_none=True)
        inputs.requires_grad_(True)
        outputs = state.body(inputs)
        if self.settings.mode == "u-shaped":
            state.pending = (inputs, outputs)
            self.answer(state, OUTPUTS, {"h": to_numpy(outputs)})
            return
        loss = train.loss_fn(outputs, torch.from_numpy(message.tensors["y"]))
        loss.backward()
        self.answer(state, GRADIENTS, {"g": to_numpy(inputs.grad)}, loss=loss.item())
        self.step(state)

    def backward(self, state: ClientState, message: Message) -> None:
        """u-shaped, second half of a training batch."""
        inputs, outputs = state.pending
        state.pending = None
        outputs.backward(torch.from_numpy(message.tensors["g"]))
        self.answer(state, GRADIENTS, {"g": to_numpy(inputs.grad)})
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
            # A late share of a period that closed without it: it was left out of the average. The
            # answer says where the run is, and the client goes on there from the fed's newest layers.
            log.warning("split-server: %s reported epoch %d period %d, which closed without it", state.name, epoch, period)
            if self.turns is None:
                self.answer(state, CLOSED, epoch=epoch, period=period, evaluator="", resume=[self.epoch, self.period])
            state.samples, state.pending = 0, None
            return
        state.reported = {"train_loss": message.meta["train_loss"]}
        state.epoch_samples += state.samples
        state.epoch_loss += message.meta["train_loss"] * state.samples
        metrics.SPLIT_CLIENT_EPOCH.labels(SERVER, self.session, state.name).set(epoch)
        if self.turns is not None:
            self.turns.previous = state.name  # it holds the newest layers now
            self.pass_turn()
        elif all(s.reported is not None or s.gone for s in self.clients.values()):
            self.close_period()

    def close_period(self) -> None:
        """Every client that is still there has reported: average (splitfed-v1), tell the
        included clients and the fed; at an epoch's end, name who evaluates."""
        included = [s for s in self.clients.values() if s.reported is not None]
        if len(included) < self.settings.quorum():
            raise RuntimeError(
                f"epoch {self.epoch} period {self.period}: only {len(included)} of {self.settings.clients} clients finished it "
                f"(--min-clients {self.settings.quorum()})"
            )
        samples = {s.name: s.samples for s in included}
        if self.per_client:
            self.average_bodies(included, list(samples.values()))
        closed = {"epoch": self.epoch, "period": self.period, "included": list(samples), "samples": samples}
        evaluators: list[str] = []
        if self.period == self.settings.syncs_per_epoch:
            # Every included client holds the same layers now (the fed's average): each scores a
            # part of the test set, so the evaluation costs the epoch 1/N of its time.
            evaluators = self.record_epoch(included, evaluators=list(samples)).evaluators
            self.evaluation_body = copy.deepcopy(self.body)
        for state in included:
            part = [evaluators.index(state.name), len(evaluators)] if state.name in evaluators else [0, 0]
            self.answer(state, CLOSED, **closed, evaluate=part)
        if self.fed:
            self.endpoint.send(self.fed, CLOSED, to=FED, **closed)
        self.next_period()

    def record_epoch(self, included: list[ClientState], evaluators: list[str]) -> EpochLog:
        samples = {s.name: s.epoch_samples for s in included}
        total = sum(samples.values())
        loss = sum(s.epoch_loss for s in included) / total if total else float("nan")
        missing = [name for name in self.clients if name not in samples]
        if missing:
            log.warning("split-server: epoch %d closes without %s (silent for %.0f s)", self.epoch, ", ".join(missing), self.settings.client_timeout)
        record = EpochLog(self.epoch, list(samples), missing, samples, loss, opened=self.epoch_started, evaluators=evaluators)
        self.epochs.append(record)
        if self.awaiting_evaluation is not None:  # an evaluator is gone, or far behind: that epoch's score is what came
            self.close_evaluation()
        if not evaluators:
            self.report(record)
        else:
            self.awaiting_evaluation = record
            for name in evaluators:
                self.clients[name].heard = time.monotonic()
        metrics.SPLIT_EPOCH_CLIENTS.labels(SERVER, self.session).set(len(included))
        return record

    def average_bodies(self, included: list[ClientState], weights: list[int]) -> None:
        """splitfed-v1: every client's copy of the layers restarts from their weighted average,
        stepped by --fed-lr from the last average (as the fed steps the client halves: the run's
        first averaging is the average itself)."""
        states = [{k: to_numpy(v) for k, v in s.body.state_dict().items()} for s in included]
        average = weighted_average(states, weights)
        if self.averaged_bodies:
            average = step_towards({k: to_numpy(v) for k, v in self.body.state_dict().items()}, average, self.settings.fed_lr)
        self.averaged_bodies = True
        average = {k: torch.from_numpy(v) for k, v in average.items()}
        self.body.load_state_dict(average)
        for state in self.clients.values():
            state.body.load_state_dict(average)

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

    def count_active(self) -> None:
        """splitfed_split_active_clients, set when a client joins, goes silent or comes back (not per batch)."""
        self.active.set(sum(1 for s in self.clients.values() if self.present(s.name)))

    # -- round-robin turns ------------------------------------------------------------------

    def present(self, name: str) -> bool:
        return self.clients[name].greeted and not self.clients[name].gone

    def pass_turn(self) -> None:
        """Move the turn to the next client that is there; the turn that ended the epoch's
        pass closes the epoch, and the client that trained it evaluates."""
        finished_epoch = self.turns.epoch
        holder = self.turns.advance(self.present)
        if self.turns.epoch != finished_epoch or holder is None:
            included = [s for s in self.clients.values() if s.reported is not None]
            if included:
                self.record_epoch(included, evaluators=[self.turns.previous] if self.turns.previous else [])
                self.evaluation_body = copy.deepcopy(self.body)
            self.next_epoch()
        self.announce_turn()

    def announce_turn(self) -> None:
        """Tell every client whose turn it is: the previous holder hands its layers on (and
        evaluates, if its turn closed an epoch); for the others it says the server is alive."""
        holder, previous = self.turns.holder, self.turns.previous
        if holder is not None:
            self.clients[holder].heard = time.monotonic()
        if previous is not None:
            self.clients[previous].heard = time.monotonic()
        record = self.awaiting_evaluation
        evaluate = record.epoch if record is not None and previous in record.evaluators else 0
        # The holder first: its turn is in its queue before the previous holder can hand it anything.
        for state in sorted(self.clients.values(), key=lambda s: s.name != holder):
            if self.present(state.name):
                self.answer(state, TURN, epoch=self.turns.epoch, holder=holder or "", previous=previous or "", evaluate=evaluate)

    # -- evaluation and the end -------------------------------------------------------------

    def evaluated(self, state: ClientState, message: Message) -> None:
        record = self.awaiting_evaluation
        if not record.scores and record.epoch == self.epoch - 1:
            # A client scores the closed epoch before it trains the next one (in round-robin,
            # before it hands its layers on), so no training of the open epoch came before this
            # first score: the open epoch's time starts now, and is its training and evaluation.
            self.epoch_started = time.perf_counter()
        record.scores[state.name] = (message.meta["correct"], message.meta["loss_sum"], message.meta["samples"])
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
            self.on_progress(Progress("epoch", record.epoch, self.settings.epochs, record.train_loss, self.epoch_record(record)))

    def finish(self) -> None:
        for state in self.clients.values():
            if state.greeted:
                self.answer(state, DONE, batches=state.batches, compute_seconds=self.compute_seconds)
        if self.fed:
            self.endpoint.send(self.fed, DONE, to=FED)
        self.finished = True

    # -- silence ----------------------------------------------------------------------------

    def deadline(self, state: ClientState) -> float:
        """When `state`'s silence gives it up: --client-timeout once it has joined; a client yet to
        say hello gets the server's --timeout from the start (processes and pods start slowly)."""
        return state.heard + (self.settings.client_timeout if state.greeted else self.endpoint.timeout)

    def next_deadline(self) -> float:
        return min((self.deadline(s) for s in self.waited_for()), default=float("inf"))

    def waited_for(self) -> list[ClientState]:
        """The clients whose silence would hold the run up now."""
        waiting = []
        if self.awaiting_evaluation is not None:
            waiting += [self.clients[name] for name in self.awaiting_evaluation.waiting_for()]
        if self.turns is not None:
            if not self.turns.started:  # everyone's hello, before the first turn
                waiting += [s for s in self.clients.values() if not s.greeted and not s.gone]
            elif (name := self.turns.waiting_on()) is not None:
                waiting.append(self.clients[name])
        elif self.epoch <= self.settings.epochs:
            waiting += [s for s in self.clients.values() if s.reported is None and not s.gone]
        return waiting

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
        if self.turns is not None:
            self.move_turn_on()
        elif all(s.reported is not None or s.gone for s in self.clients.values()) and self.epoch <= self.settings.epochs:
            self.close_period()

    def move_turn_on(self) -> None:
        """Round-robin after a silence: before the first turn, start with the clients there; a
        silent holder loses its turn; a previous holder that never handed its layers on is
        passed over, and the holder starts from its own layers."""
        present = [s for s in self.clients.values() if self.present(s.name)]
        if len(present) < self.settings.quorum():
            raise RuntimeError(f"only {len(present)} of {self.settings.clients} clients are left (--min-clients {self.settings.quorum()})")
        if not self.turns.started:
            self.pass_turn()
        elif self.turns.holder is not None and self.clients[self.turns.holder].gone:
            self.pass_turn()
        elif self.turns.previous is not None and self.clients[self.turns.previous].gone:
            self.turns.previous = None
            self.announce_turn()

    # -- results ----------------------------------------------------------------------------

    def epoch_record(self, record: EpochLog) -> dict:
        return {
            "step": record.epoch, "accuracy": record.accuracy, "loss": record.loss, "train_loss": record.train_loss, "seconds": record.seconds,
            "included": record.included, "missing": record.missing, "samples": record.samples, "evaluators": record.evaluators,
            "evaluated_samples": record.evaluated_samples,
        }

    def result(self) -> dict:
        history = [self.epoch_record(record) for record in self.epochs]
        last = history[-1] if history else {}
        return {
            "accuracy": last.get("accuracy"),
            "loss": last.get("loss"),
            "schedule": self.settings.schedule,
            "clients": {s.name: {"batches": s.batches, "gone": s.gone} for s in self.clients.values()},
            "history": history,
            "batches": sum(s.batches for s in self.clients.values()),
            "compute_seconds": self.compute_seconds,
            "traffic": vars(self.endpoint.traffic),
        }


class _TurnOrder:
    """Round-robin: whose turn it is. Turns go epoch by epoch through the clients in index order,
    skipping those that are not there. `previous` is the client that finished the last turn and
    holds the newest client layers, which the holder starts from (None: the holder starts from
    its own, as in the first turn)."""

    def __init__(self, names: list[str], epochs: int):
        self.names = names
        self.epochs = epochs
        self.epoch = 1
        self.position = -1  # index into names of the holder
        self.holder: str | None = None  # None before the first turn and after the last
        self.previous: str | None = None
        self.handed_to: str | None = None  # the holder that previous has handed its layers to

    @property
    def started(self) -> bool:
        return self.position >= 0

    def advance(self, present: Callable[[str], bool]) -> str | None:
        """The next present client's turn, in this epoch or the next; None: the run is over."""
        while True:
            self.position += 1
            if self.position == len(self.names):
                self.position, self.epoch = 0, self.epoch + 1
            if self.epoch > self.epochs:
                self.holder = None
                return None
            if present(self.names[self.position]):
                self.holder, self.handed_to = self.names[self.position], None
                return self.holder

    def waiting_on(self) -> str | None:
        """Whose silence holds the turn up: the previous holder until it has handed its layers
        on, then the holder."""
        if self.holder is None:
            return None
        if self.previous not in (None, self.holder) and self.handed_to != self.holder:
            return self.previous
        return self.holder
