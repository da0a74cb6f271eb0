"""split-client: the data owner. Holds the data, the labels and the first layers (and in
u-shaped mode the last layer too), drives training batch by batch and evaluates."""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path

import numpy as np
import torch

from splitfed.errors import RunAborted
from splitfed.learning import data, models, split, train
from splitfed.learning.settings import SplitSettings
from splitfed.learning.train import EpochRecord
from splitfed.observability import metrics
from splitfed.protocol import Message, ProtocolError, TensorSpec, check_tensors
from splitfed.roles.declaration import Identity, Progress, ProgressSink
from splitfed.roles.endpoint import Endpoint, queue_name, to_numpy
from splitfed.roles.split.common import (
    ABORT, ACTIVATIONS, CLIENT, DONE, GRADIENTS, HANDSHAKE, HELLO, OUTPUTS, SERVER, peer_queue, save_parts, shared,
)
from splitfed.transport import Transport

log = logging.getLogger(__name__)



class SplitClient:
    def __init__(
        self, settings: SplitSettings, deployment, transport: Transport, identity: Identity = Identity(),  # noqa: ANN001 (roles.split.SplitParty)
        on_progress: ProgressSink | None = None,
    ):
        self.settings = settings
        self.save: Path | None = deployment.save
        self.on_progress = on_progress
        meta = data.info(settings.dataset)
        self.parts = split.cut(models.build(settings.model, meta, settings.seed), settings.cut_layer, settings.mode)
        params = list(self.parts.head.parameters()) + (list(self.parts.tail.parameters()) if self.parts.tail else [])
        self.opt = train.optimizer(params, settings.optimizer, settings.lr)
        self.cut_shape = models.output_shape(self.parts.head, meta.shape)
        self.server_out_shape = models.output_shape(self.parts.body, self.cut_shape)
        self.train_data = data.load(settings.dataset, train=True, data_dir=settings.data_dir, limit=settings.limit)
        self.test_data = data.load(settings.dataset, train=False, data_dir=settings.data_dir, limit=settings.test_limit)
        self.session = deployment.session
        self.endpoint = Endpoint(
            transport, session=self.session, role=CLIENT, inbox=queue_name(self.session, CLIENT), timeout=deployment.timeout,
            signer=identity.signer, trusted=identity.trusted, peer_roles=(SERVER,), handshake=HANDSHAKE,
        )
        self.server = peer_queue(self.session, deployment.via, SERVER)
        transport.declare(self.server)
        self.round_trip = metrics.ROUND_TRIP.labels(CLIENT, self.session)
        self.round_trips: list[float] = []

    # -- one exchange with the server -----------------------------------------------------

    def exchange(self, kind: str, tensors: dict[str, np.ndarray], reply_kind: str, reply_spec: dict[str, TensorSpec] | None, **meta) -> Message:
        started = time.perf_counter()
        self.endpoint.send(self.server, kind, tensors, to=SERVER, **meta)
        reply = self.reply(reply_kind, reply_spec)
        self.round_trips.append(time.perf_counter() - started)
        self.round_trip.observe(self.round_trips[-1])
        return reply

    def reply(self, kind: str, spec: dict[str, TensorSpec] | None) -> Message:
        """The server's next message, of `kind` (with tensors as in `spec`); RunAborted when
        the server says it does not know this run."""

        def check(message: Message) -> None:
            if message.kind == ABORT and message.meta.get("run") != self.endpoint.run:
                raise ProtocolError("replay", "abort for another run")
            if message.kind == kind and spec is not None:
                check_tensors(message, spec)

        reply, delivery = self.endpoint.receive((kind, ABORT), (SERVER,), check)
        self.endpoint.ack(delivery)
        if reply.kind == ABORT:
            raise RunAborted(f"the split-server ended run {self.endpoint.run}: {reply.meta.get('reason')}")
        return reply

    def remote_forward(self, activations: torch.Tensor, train_step: bool) -> torch.Tensor:
        """The server's layers applied to `activations` (B, *cut_shape) -> (B, *server_out_shape)."""
        spec = {"h": TensorSpec("float32", (len(activations), *self.server_out_shape))}
        reply = self.exchange(ACTIVATIONS, {"x": to_numpy(activations)}, OUTPUTS, spec, train=train_step)
        return torch.from_numpy(reply.tensors["h"])

    # -- training -------------------------------------------------------------------------

    def train_batch(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        self.parts.head.train()
        self.opt.zero_grad(set_to_none=True)
        activations = self.parts.head(images)  # (B, *cut_shape)
        cut_spec = {"g": TensorSpec("float32", (len(images), *self.cut_shape))}
        if self.parts.tail is None:
            reply = self.exchange(ACTIVATIONS, {"x": to_numpy(activations), "y": labels.numpy()}, GRADIENTS, cut_spec, train=True)
            loss = float(reply.meta.get("loss", float("nan")))
        else:
            features = self.remote_forward(activations, train_step=True).requires_grad_(True)
            batch_loss = train.loss_fn(self.parts.tail(features), labels)  # labels stay here
            batch_loss.backward()
            reply = self.exchange(GRADIENTS, {"g": to_numpy(features.grad)}, GRADIENTS, cut_spec)
            loss = batch_loss.item()
        activations.backward(torch.from_numpy(reply.tensors["g"]))
        self.opt.step()
        return loss

    def handshake(self) -> None:
        """Wait for the server, check that both halves were configured as one model, and join
        the run the server names in its answer to this hello (and to no other)."""
        nonce = uuid.uuid4().hex

        def check(message: Message) -> None:
            if message.meta.get("ref") != nonce or not isinstance(message.meta.get("run"), str):
                raise ProtocolError("replay", "hello answering another hello")

        self.endpoint.send(self.server, HELLO, nonce=nonce, **shared(self.settings))
        reply, delivery = self.endpoint.receive((HELLO,), (SERVER,), check)
        self.endpoint.ack(delivery)
        if reply.meta.get("ok") is not True:
            if reply.meta.get("begun") is True:
                raise RunAborted(f"the split-server refused this client: {reply.meta.get('problem')}")
            raise ValueError(f"the split-server was configured differently: {reply.meta.get('problem')}")
        self.endpoint.resync(reply.sender)
        self.endpoint.bind(reply.meta["run"])
        log.info("split-client joined run %s", self.endpoint.run)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits of the whole split model, for evaluation."""
        self.parts.head.eval()
        outputs = self.remote_forward(self.parts.head(images), train_step=False)
        return self.parts.tail(outputs) if self.parts.tail is not None else outputs

    def batch_done(self, done: int, total: int, loss: float) -> None:
        if self.on_progress:
            self.on_progress(Progress("batch", done, total, loss))

    def epoch_done(self, record: EpochRecord) -> None:
        metrics.EPOCH.labels(CLIENT, self.session).set(record.step)
        metrics.TRAIN_LOSS.labels(CLIENT, self.session).set(record.train_loss)
        metrics.TEST_ACCURACY.labels(CLIENT, self.session).set(record.accuracy)
        metrics.TEST_LOSS.labels(CLIENT, self.session).set(record.loss)
        if self.on_progress:
            self.on_progress(Progress("epoch", record.step, self.settings.epochs, record.train_loss, vars(record)))

    def run(self) -> dict:
        started = time.perf_counter()
        self.handshake()
        history = train.fit(self.train_data, self.test_data, self.settings, self.train_batch, self.forward, self.batch_done, self.epoch_done)
        self.endpoint.send(self.server, DONE, to=SERVER)
        done = self.reply(DONE, None)
        if self.save:
            parts = [(self.parts.head.state_dict(), 0)]
            if self.parts.tail is not None:
                parts.append((self.parts.tail.state_dict(), self.parts.tail_start))
            save_parts(self.save, parts)
        return {
            "accuracy": history[-1].accuracy,
            "loss": history[-1].loss,
            "wall_seconds": time.perf_counter() - started,
            "history": [vars(r) for r in history],
            "traffic": vars(self.endpoint.traffic),
            "timing": {
                "round_trips": len(self.round_trips),
                "round_trip_seconds": sum(self.round_trips),
                "round_trip_p50_ms": 1000 * float(np.median(self.round_trips)),
                "server_compute_seconds": float(done.meta.get("compute_seconds", 0.0)),
            },
        }
