"""split-client: a data owner. Holds its data, the labels and the first layers (and in u-shaped
mode the last layer too), drives training batch by batch against the split server and, when the
server asks it to, evaluates.

Alone, a client trains epoch after epoch and evaluates after each (the same computation as
centralized training). Among several, the schedule decides what happens between epochs:
splitfed-v1 and v2 send their layers to the fed and continue from the average it sends back;
round-robin clients wait for their turn and start it from the layers of the client before them.
"""

from __future__ import annotations

import functools
import logging
import math
import time
import uuid
from pathlib import Path

import numpy as np
import torch

from splitfed.errors import Refused, RunAborted
from splitfed.learning import clients, cutting, data, models, train
from splitfed.learning.defences import Defences
from splitfed.learning.device import from_numpy, to_numpy
from splitfed.learning.settings import WIRE_NUMPY_DTYPES, SplitNNSettings
from splitfed.learning.tasks import Task, fingerprint
from splitfed.learning.train import EpochRecord
from splitfed.observability import metrics
from splitfed.protocol import Message, ProtocolError, TensorSpec, check_tensors
from splitfed.roles.base import LATER, Role
from splitfed.roles.declaration import Identity, Progress, ProgressSink
from splitfed.roles.endpoint import Endpoint, queue_name
from splitfed.roles.limits import message_bytes
from splitfed.roles.split.common import (
    ABORT, ACTIVATIONS, AVERAGE, CLIENT, CLOSED, DONE, EVALUATED, FED, GRADIENTS, HANDED, HANDOFF, HANDSHAKE, HEAD, HELLO, OUTPUTS, SERVER,
    TRAINED, TURN, client_inbox, client_index, client_name, largest_messages, peer_queue, save_parts, shared,
)
from splitfed.transport import Delivery, Transport

log = logging.getLogger(__name__)


class SplitClient:
    def __init__(
        self, settings: SplitNNSettings, deployment, transport: Transport, identity: Identity = Identity(),  # noqa: ANN001 (roles.split.SplitParty)
        on_progress: ProgressSink | None = None,
    ):
        self.settings = settings
        self.index = deployment.client_index
        if not 0 <= self.index < settings.clients:
            raise ValueError(f"--client-index {self.index} is not one of the {settings.clients} clients (0..{settings.clients - 1})")
        self.name = client_name(self.index, settings.clients)
        self.save: Path | None = deployment.save
        self.on_progress = on_progress
        clients.check_evaluation(settings)
        self.task = Task(settings)
        self.context = clients.client_context(settings, self.index)
        self.loss_of = self.task.loss(self.context)
        self.compute = self.task.compute
        self.wire = settings.wire_dtype  # activations out, gradients back: the server expects the same
        whole = self.task.sequential(self.context)
        # What the server checks this client's model against, and what it builds its own from
        # when it holds no data: the whole model and the classes, and one sample's shape.
        classes = self.task.classes(self.context)
        self.fingerprint = fingerprint(whole, classes)
        self.input_shape = self.task.data_shape(self.context).shape
        self.parts = cutting.cut(whole, settings.cut_layer, settings.mode)
        self.layout = layer_specs(self.parts)  # its layers' names, dtypes and shapes, which never change
        params = list(self.parts.head.parameters()) + (list(self.parts.tail.parameters()) if self.parts.tail else [])
        self.opt = train.optimizer(params, settings.optimizer, settings.lr)
        self.cut_shape = models.output_shape(self.parts.head, self.input_shape)
        self.server_out_shape = models.output_shape(self.parts.body, self.cut_shape)
        self.train_data = clients.client_share(self.task, self.context)
        clients.check_periods(math.ceil(len(self.train_data) / settings.batch_size), settings.syncs_per_epoch, f"{self.name}'s share")  # before the handshake
        self.test_data = self.task.data(self.context, train=False)
        self.defences = Defences(settings, self.index, len(self.train_data), len(classes))
        self.generator = data.party_generator(settings.seed, self.index)
        self.session = deployment.session
        several = settings.clients > 1
        self.peers = [client_name(i, settings.clients) for i in range(settings.clients) if i != self.index]
        self.fed = queue_name(self.session, FED) if several and settings.schedule != "round-robin" else None
        self.round_robin = several and settings.schedule == "round-robin"
        peer_roles = (SERVER, FED, CLIENT) if several else (SERVER,)
        # The largest it receives: the server's gradients or outputs and, among several, a client's
        # layers (the fed's average, or the client before it handing them on).
        receives = largest_messages(settings, self.cut_shape, self.server_out_shape).to_client
        self.endpoint = Endpoint(
            transport, session=self.session, role=CLIENT, name=self.name, inbox=client_inbox(self.session, self.index, settings.clients),
            timeout=deployment.timeout, signer=identity.signer, trusted=identity.trusted, peer_roles=peer_roles, handshake=HANDSHAKE,
            max_message_bytes=max(receives, message_bytes(self.layout)) if several else receives,
        )
        self.server = peer_queue(self.session, deployment.via, SERVER) if not several else queue_name(self.session, SERVER)
        transport.declare(self.server)
        if self.fed:
            transport.declare(self.fed)
        self.round_trip = metrics.ROUND_TRIP.labels(CLIENT, self.session, self.name)
        self.round_trips: list[float] = []
        self.history: list[EpochRecord] = []
        self.epoch_started = time.perf_counter()
        self.train_losses: dict[int, float] = {}  # epoch -> mean training loss
        self.epoch_losses: list[float] = []  # the current epoch's batch losses so far

    # -- one exchange with the server -----------------------------------------------------

    def exchange(self, kind: str, tensors: dict[str, np.ndarray], reply_kind: str, reply_spec: dict[str, TensorSpec] | None, **meta) -> Message:
        started = time.perf_counter()
        self.endpoint.send(self.server, kind, tensors, to=SERVER, **meta)
        reply = self.reply(reply_kind, reply_spec)
        self.round_trips.append(time.perf_counter() - started)
        self.round_trip.observe(self.round_trips[-1])
        return reply

    def reply(self, kind: str, spec: dict[str, TensorSpec] | None) -> Message:
        """The server's next message, of `kind` (with tensors as in `spec`); RunAborted when the
        server says it does not know this run, or has ended it without this client."""

        def check(message: Message) -> None:
            self.check_origin(message)
            if message.kind == kind and spec is not None:
                check_tensors(message, spec)

        reply, delivery = self.endpoint.receive((kind, ABORT, DONE) if kind != DONE else (DONE, ABORT), (SERVER,), check)
        self.endpoint.ack(delivery)
        if reply.kind == ABORT:
            raise RunAborted(f"the split-server ended run {self.endpoint.run}: {reply.meta.get('reason')}")
        if reply.kind == DONE and kind != DONE:
            raise RunAborted(f"the split-server ended run {self.endpoint.run} without {self.name}'s share (it was too slow, or silent)")
        return reply

    def remote_forward(self, activations: torch.Tensor, train_step: bool, **meta: object) -> torch.Tensor:
        """The server's layers applied to `activations` (B, *cut_shape) -> (B, *server_out_shape)."""
        spec = {"h": TensorSpec(WIRE_NUMPY_DTYPES[self.wire], (len(activations), *self.server_out_shape))}
        reply = self.exchange(ACTIVATIONS, {"x": to_numpy(activations, self.wire)}, OUTPUTS, spec, train=train_step, **meta)
        return from_numpy(reply.tensors["h"], self.compute.device, torch.float32)

    # -- training -------------------------------------------------------------------------

    def train_batch(self, indices: torch.Tensor, images: torch.Tensor, labels: torch.Tensor) -> float:
        """One batch (the samples at `indices` of this client's share) with the defences the
        settings ask for: on the activations that leave, the gradients returned, the labels sent,
        and NoPeek's term in this client's loss."""
        self.parts.head.train()
        self.opt.zero_grad(set_to_none=True)
        with self.compute.autocast():
            activations = self.parts.head(images)  # (B, *cut_shape)
        sent = self.defences.outgoing(activations)
        cut_spec = {"g": TensorSpec(WIRE_NUMPY_DTYPES[self.wire], (len(images), *self.cut_shape))}
        if self.parts.tail is None:
            # The labels' prior: the server's current layers on the very activations it is about to train on (it learns nothing new).
            prior = self.remote_forward(sent.detach(), train_step=False, prior=True) if self.defences.needs_prior(indices) else None
            released = self.defences.release(indices, labels, prior)
            reply = self.exchange(ACTIVATIONS, {"x": to_numpy(sent, self.wire), "y": to_numpy(released)}, GRADIENTS, cut_spec, train=True)
            loss = float(reply.meta.get("loss", float("nan")))
        else:
            features = self.remote_forward(sent, train_step=True).requires_grad_(True)
            with self.compute.autocast():
                batch_loss = self.loss_of(self.parts.tail(features), labels)  # labels stay here
            batch_loss.backward()
            reply = self.exchange(GRADIENTS, {"g": to_numpy(self.defences.returned(features.grad), self.wire)}, GRADIENTS, cut_spec)
            loss = batch_loss.item()
        outputs, grads = [sent], [from_numpy(reply.tensors["g"], self.compute.device, sent.dtype)]
        penalty = self.defences.penalty(images, activations)
        if penalty is not None:
            outputs.append(penalty)
            grads.append(torch.ones_like(penalty))
        torch.autograd.backward(outputs, grads)
        self.opt.step()
        return loss

    def epoch_periods(self) -> list[list[torch.Tensor]]:
        """This epoch's batches (a fresh order), cut into the runs between averagings."""
        self.epoch_started = time.perf_counter()
        batches = data.batch_order(len(self.train_data), self.settings.batch_size, self.generator)
        return clients.periods(batches, self.settings.syncs_per_epoch)

    def train_share(self, epoch: int, period: int, batches: list[torch.Tensor], done_before: int, total: int) -> None:
        """Train `batches`, this client's share of one period of `epoch` (of the whole epoch,
        without --syncs-per-epoch), then `trained` to the server. Progress counts batches over
        the epoch: `done_before` of `total` are done."""
        losses = []
        for done, indices in enumerate(batches, done_before + 1):
            losses.append(self.train_batch(indices, *self.train_data.batch(indices)))  # (B, C, H, W), (B,) on the device
            if self.on_progress:
                self.on_progress(Progress("batch", done, total, losses[-1]))
        self.epoch_losses.extend(losses)
        self.train_losses[epoch] = float(np.mean(self.epoch_losses))
        metrics.EPOCH.labels(CLIENT, self.session).set(epoch)
        metrics.TRAIN_LOSS.labels(CLIENT, self.session).set(self.train_losses[epoch])
        samples = sum(len(indices) for indices in batches)
        if self.fed:  # before `trained`: by the time the server closes the period, the fed holds these layers
            self.endpoint.send(self.fed, HEAD, self.layers(), to=FED, epoch=epoch, period=period, samples=samples)
        self.endpoint.send(self.server, TRAINED, to=SERVER, epoch=epoch, period=period, train_loss=float(np.mean(losses)))

    def handshake(self) -> None:
        """Wait for the server, check that both halves were configured as one model, and join
        the run the server names in its answer to this hello (and to no other)."""
        nonce = uuid.uuid4().hex

        def check(message: Message) -> None:
            if message.meta.get("ref") != nonce or not isinstance(message.meta.get("run"), str):
                raise ProtocolError("replay", "hello answering another hello")

        self.endpoint.send(self.server, HELLO, nonce=nonce, fingerprint=self.fingerprint, input_shape=list(self.input_shape),
                           receives=self.endpoint.max_message_bytes, **shared(self.settings))
        reply, delivery = self.endpoint.receive((HELLO,), (SERVER,), check)
        self.endpoint.ack(delivery)
        if reply.meta.get("ok") is not True:
            if reply.meta.get("begun") is True:
                raise RunAborted(f"the split-server refused this client: {reply.meta.get('problem')}")
            raise Refused(f"the split-server refused {self.name}: {reply.meta.get('problem')}")
        self.endpoint.resync(reply.sender)
        self.endpoint.bind(reply.meta["run"])
        log.info("%s joined run %s", self.name, self.endpoint.run)

    def check_origin(self, message: Message) -> None:
        """Each kind comes from one party: averages from the fed, hand-offs from another client,
        everything else from the server; an abort must name this client's run."""
        expected = (FED,) if message.kind == AVERAGE else tuple(self.peers) if message.kind == HANDOFF else (SERVER,)
        if message.sender not in expected:
            raise ProtocolError("sender", f"{message.kind} from {message.sender}")
        if message.kind == ABORT and message.meta.get("run") != self.endpoint.run:
            raise ProtocolError("replay", "abort for another run")

    # -- layers between clients -----------------------------------------------------------

    def layers(self) -> dict[str, np.ndarray]:
        return client_layers(self.parts)

    def load_layers(self, tensors: dict[str, np.ndarray]) -> None:
        for prefix, part in named_parts(self.parts):
            own = part.state_dict()
            part.load_state_dict({k: torch.from_numpy(tensors[prefix + k].copy()).reshape(v.shape) for k, v in own.items()})

    def check_layers(self, message: Message) -> None:
        """Layers from the fed or another client: exactly this client's names, shapes and dtypes."""
        if set(message.tensors) != set(self.layout):
            raise ProtocolError("shape", f"{message.kind} from {message.sender} does not hold this client's layers")
        for name, spec in self.layout.items():
            spec.check(name, message.tensors[name])

    # -- alone, or splitfed-v1 and v2 -----------------------------------------------------

    def train_epochs(self) -> None:
        """Epoch after epoch, period after period (--syncs-per-epoch): this client's share, then
        (among several) the fed's layers; after an epoch's last period, the evaluation when the
        server names this client to do it. A client whose share came too late is told where the
        run has got to, and goes on from there."""
        epoch, first_period = 1, 1
        while epoch <= self.settings.epochs:
            runs, self.epoch_losses = self.epoch_periods(), []
            total = sum(len(batches) for batches in runs)
            for period in range(first_period, len(runs) + 1):
                self.train_share(epoch, period, runs[period - 1], sum(len(batches) for batches in runs[: period - 1]), total)
                closed = self.period_closed(epoch, period)
                if "resume" in closed.meta:  # late: the periods in between closed without this client
                    log.warning("%s: epoch %d period %d closed without it; it goes on at %s", self.name, epoch, period, closed.meta["resume"])
                    epoch, first_period = closed.meta["resume"]
                    break
            else:
                part, parts = closed.meta.get("evaluate", [0, 0])
                if parts or closed.meta.get("own") is True:
                    self.evaluate(epoch, part, parts, own=closed.meta.get("own") is True)
                epoch, first_period = epoch + 1, 1

    def period_closed(self, epoch: int, period: int) -> Message:
        """The server's `closed` for this period of `epoch` and, among several, the fed's layers
        (loaded), in whichever order they come (a late client's layers can overtake the server's
        answer, and be of a later period)."""
        closed: Message | None = None
        averaged = self.fed is None

        def check(message: Message) -> None:
            self.check_origin(message)
            if message.kind not in (CLOSED, AVERAGE):
                return
            said = (message.meta.get("epoch"), message.meta.get("period"))
            if not all(isinstance(number, int) for number in said):
                raise ProtocolError("malformed", f"{message.kind} needs an integer epoch and period")
            if message.kind == CLOSED and said != (epoch, period) or message.kind == AVERAGE and said < (epoch, period):
                raise ProtocolError("kind", f"{message.kind} for epoch {said[0]} period {said[1]} while {self.name} is in epoch {epoch} period {period}")
            if message.kind == CLOSED and "resume" in message.meta:
                self.check_resume(message.meta["resume"], (epoch, period))
            if message.kind == CLOSED:
                part = message.meta.get("evaluate", [0, 0])
                if not (isinstance(part, list) and len(part) == 2 and all(isinstance(n, int) for n in part) and 0 <= part[0] < max(1, part[1])
                        and part[1] <= self.settings.clients):
                    raise ProtocolError("malformed", "closed names no part [index, count] of the test set to evaluate")
                if not isinstance(message.meta.get("own", False), bool):
                    raise ProtocolError("malformed", "closed says whether to score the client's own test data (own) with true or false")
            if message.kind == AVERAGE:
                self.check_layers(message)

        while closed is None or not averaged:
            message, delivery = self.endpoint.receive((CLOSED, AVERAGE, DONE, ABORT), (SERVER, FED) if self.fed else (SERVER,), check)
            self.endpoint.ack(delivery)
            if message.kind == ABORT:
                raise RunAborted(f"the split-server ended run {self.endpoint.run}: {message.meta.get('reason')}")
            if message.kind == DONE:
                raise RunAborted(f"the split-server ended run {self.endpoint.run} without {self.name}'s share (it was too slow, or silent)")
            if message.kind == CLOSED:
                closed = message
            else:
                self.load_layers(message.tensors)
                averaged = True
        return closed

    def check_resume(self, resume: object, late: tuple[int, int]) -> None:
        """Where a late client goes on: an (epoch, period) of this run after the one it was late for."""
        if not (isinstance(resume, list) and len(resume) == 2 and all(isinstance(n, int) for n in resume)
                and tuple(resume) > late and 1 <= resume[1] <= self.settings.syncs_per_epoch and resume[0] <= self.settings.epochs + 1):
            raise ProtocolError("malformed", f"closed names no (epoch, period) of this run after {late} to go on at")

    # -- round-robin ----------------------------------------------------------------------

    def start_turn(self, epoch: int, handoff: Message | None) -> None:
        """Train this client's turn of `epoch`, from the layers handed on (None: its own)."""
        log.info("%s: turn of epoch %d, from %s layers", self.name, epoch, f"{handoff.sender}'s" if handoff else "its own")
        if handoff is not None:
            self.load_layers(handoff.tensors)
        [batches], self.epoch_losses = self.epoch_periods(), []  # round-robin: one period per epoch
        self.train_share(epoch, 1, batches, 0, len(batches))

    def check_turn_message(self, message: Message) -> None:
        self.check_origin(message)
        if message.kind == TURN:
            meta = message.meta
            names = ("", *self.peers, self.name)
            if meta.get("holder") not in names or meta.get("previous") not in names or not isinstance(meta.get("epoch"), int) or not isinstance(meta.get("evaluate"), int):
                raise ProtocolError("malformed", "turn needs an epoch, an evaluate epoch and a holder and previous among this run's clients")
        elif message.kind == HANDOFF:
            self.check_layers(message)

    # -- evaluation -----------------------------------------------------------------------

    def forward(self, images: torch.Tensor, noise: torch.Generator) -> torch.Tensor:
        """Logits of the whole split model, for evaluation; `noise`: the evaluation's activation noise."""
        self.parts.head.eval()
        outputs = self.remote_forward(self.defences.outgoing(self.parts.head(images), noise), train_step=False)
        if self.parts.tail is None:
            return outputs
        self.parts.tail.eval()
        return self.parts.tail(outputs)

    def evaluate(self, epoch: int, part: int, parts: int, own: bool = False) -> None:
        """Score part `part` of `parts` of the test set (the clients that close an epoch together
        hold the same layers, so they share the evaluation out) and, when `own`, the whole of this
        client's own test data (--evaluate parties or both), on the model as it was when `epoch`
        closed (the server answers with its layers of then); tell the server the counts, in one
        message: it adds them up. A client that scores a whole set keeps the record too."""
        counts: dict[str, object] = {}
        whole = None
        forward = functools.partial(self.forward, noise=self.defences.evaluation_stream(epoch))
        if parts:
            size = len(self.test_data)
            share = self.test_data.subset(slice(part * size // parts, (part + 1) * size // parts))
            evaluation = train.evaluate(forward, share, self.settings.eval_batch_size, self.loss_of, self.compute) if len(share) else train.Evaluation(0.0, 0.0)
            counts.update(scored_counts(evaluation, len(share)))
            whole = evaluation if parts == 1 else None
        if own:
            if whole is None:
                whole = train.evaluate(forward, self.test_data, self.settings.eval_batch_size, self.loss_of, self.compute)
            counts["own"] = scored_counts(whole, len(self.test_data))
        self.endpoint.send(self.server, EVALUATED, to=SERVER, epoch=epoch, **counts)
        if whole is None:
            return
        record = EpochRecord(epoch, whole.accuracy, whole.loss, self.train_losses.get(epoch, float("nan")), time.perf_counter() - self.epoch_started)
        self.history.append(record)
        metrics.TEST_ACCURACY.labels(CLIENT, self.session).set(record.accuracy)
        metrics.TEST_LOSS.labels(CLIENT, self.session).set(record.loss)
        if self.on_progress:
            self.on_progress(Progress("epoch", record.step, self.settings.epochs, record.train_loss, vars(record)))

    # -- the run --------------------------------------------------------------------------

    def run(self) -> dict:
        started = time.perf_counter()
        self.handshake()
        if self.round_robin:
            Turns(self).consume()  # until the server's done
            done = None
        else:
            self.train_epochs()
            done = self.reply(DONE, None)
        if self.save:
            parts = [(self.parts.head.state_dict(), 0)]
            if self.parts.tail is not None:
                parts.append((self.parts.tail.state_dict(), self.parts.tail_start))
            save_parts(self.save, parts)
        last = self.history[-1] if self.history else None
        return {
            "client": self.name,
            "samples": len(self.train_data),
            "accuracy": last.accuracy if last else None,
            "loss": last.loss if last else None,
            "wall_seconds": time.perf_counter() - started,
            "history": [vars(r) for r in self.history],
            "train_losses": self.train_losses,
            "traffic": vars(self.endpoint.traffic),
            **({"label_dp": counts} if (counts := self.defences.label_counts(self.train_data.labels)) else {}),
            "timing": {
                "round_trips": len(self.round_trips),
                "round_trip_seconds": sum(self.round_trips),
                "round_trip_p50_ms": 1000 * float(np.median(self.round_trips)) if self.round_trips else None,
                "server_compute_seconds": float(done.meta.get("compute_seconds", 0.0)) if done else None,
            },
        }


def named_parts(parts: cutting.Parts) -> list[tuple[str, torch.nn.Module]]:
    """A client's parts under the prefixes its layers travel with: the head, and the tail in u-shaped mode."""
    return [("head.", parts.head)] + ([("tail.", parts.tail)] if parts.tail is not None else [])


def client_layers(parts: cutting.Parts) -> dict[str, np.ndarray]:
    """A client's layers as named tensors, as they travel to the fed or to the next client.
    Scalars (BatchNorm's batch counters) travel as one-element arrays, as safetensors keeps them."""
    return {f"{prefix}{k}": to_numpy(v).reshape(v.shape or (1,)) for prefix, part in named_parts(parts) for k, v in part.state_dict().items()}


def layer_specs(parts: cutting.Parts) -> dict[str, TensorSpec]:
    """What a client's layers are on the wire (names, dtypes, shapes): every client's are the same."""
    return {name: TensorSpec(array.dtype.name, array.shape) for name, array in client_layers(parts).items()}


def scored_counts(evaluation: train.Evaluation, samples: int) -> dict[str, object]:
    """An evaluation as the server adds it up: whole counts of correct answers and samples, and the loss summed over them."""
    return {"correct": round(evaluation.accuracy * samples), "loss_sum": float(evaluation.loss * samples), "samples": samples}


class Turns(Role):
    """Round-robin, on the one receive loop: turns from the server and hand-offs from the client
    before, until the server says the run is over. A turn starts from the layers the client
    before hands on (or from the client's own, when there is none); once the turn has passed on,
    the client hands its layers to the next holder whenever the server asks (again, if that
    holder went silent), and evaluates when its turn closed an epoch."""

    def __init__(self, client: SplitClient):
        self.client = client
        self.endpoint = client.endpoint
        self.turn: dict = {}
        self.handoff: Message | None = None  # the last hand-off that came, kept in case it came before its turn
        self.evaluated: set[int] = set()

    def expecting(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        return (TURN, HANDOFF, DONE, ABORT), (SERVER, *self.client.peers)

    def check(self, message: Message) -> None:
        self.client.check_turn_message(message)

    def handle(self, message: Message, delivery: Delivery) -> str:
        """Acked at once (LATER: by this role): a turn's training has exchanges of its own on this inbox."""
        self.endpoint.ack(delivery)
        if message.kind == DONE:
            self.finished = True
        elif message.kind == ABORT:
            raise RunAborted(f"the split-server ended run {self.endpoint.run}: {message.meta.get('reason')}")
        elif message.kind == HANDOFF:
            self.handed(message)
        else:
            self.take(message.meta)
        return LATER

    def handed(self, handoff: Message) -> None:
        """Train the turn it is for, if that turn is this client's now; else keep it for its turn."""
        self.handoff = handoff
        turn = self.turn
        if turn.get("holder") == self.client.name and turn.get("previous") == handoff.sender and turn.get("epoch") == handoff.meta.get("epoch"):
            self.client.start_turn(turn["epoch"], handoff)
            self.handoff = None

    def take(self, turn: dict) -> None:
        client, handoff = self.client, self.handoff
        self.turn = turn
        holder, previous = turn["holder"], turn["previous"]
        # The closed epoch's evaluation first, then the hand-off: as in centralized training,
        # the next epoch waits for it, rather than its first turn sharing the cores and the
        # server with the evaluation (measured on 2 cores: the turn took 2.3 s instead of 1.0).
        if previous == client.name and turn["evaluate"] and turn["evaluate"] not in self.evaluated:
            self.evaluated.add(turn["evaluate"])
            client.evaluate(turn["evaluate"], 0, 1)
        if previous == client.name and holder not in ("", client.name):
            settings = client.settings
            self.endpoint.send(client_inbox(client.session, client_index(holder), settings.clients), HANDOFF, client.layers(), to=holder, epoch=turn["epoch"])
            self.endpoint.send(client.server, HANDED, to=SERVER, holder=holder)
        if holder == client.name and previous in ("", client.name):
            client.start_turn(turn["epoch"], None)
        elif holder == client.name and handoff is not None and handoff.sender == previous and handoff.meta.get("epoch") == turn["epoch"]:
            client.start_turn(turn["epoch"], handoff)
            self.handoff = None
