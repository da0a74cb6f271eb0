"""split-server: holds the model's middle (u-shaped) or last layers (vanilla) and no data."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from splitfed.learning import data, models, split, train
from splitfed.learning.settings import SplitSettings
from splitfed.protocol import Message, ProtocolError, TensorSpec, check_tensors
from splitfed.roles.base import Role
from splitfed.roles.declaration import Identity, ProgressSink
from splitfed.roles.endpoint import Endpoint, queue_name, to_numpy
from splitfed.roles.split.common import ACTIVATIONS, CLIENT, DONE, GRADIENTS, HELLO, OUTPUTS, SERVER, peer_queue, save_parts, shared
from splitfed.transport import Delivery, Transport

log = logging.getLogger(__name__)


class SplitServer(Role):
    def __init__(
        self, settings: SplitSettings, deployment, transport: Transport, identity: Identity = Identity(),  # noqa: ANN001 (roles.split.SplitParty)
        on_progress: ProgressSink | None = None,
    ):
        self.settings = settings
        self.save: Path | None = deployment.save
        meta = data.info(settings.dataset)
        self.classes = meta.classes
        parts = split.cut(models.build(settings.model, meta, settings.seed), settings.cut_layer, settings.mode)
        self.body = parts.body
        self.cut_layer = parts.cut_layer
        self.opt = train.optimizer(self.body.parameters(), settings.optimizer, settings.lr)
        self.in_shape = models.output_shape(parts.head, meta.shape)  # per sample, at the cut
        self.out_shape = models.output_shape(self.body, self.in_shape)
        self.endpoint = Endpoint(
            transport, session=deployment.session, role=SERVER, inbox=queue_name(deployment.session, SERVER), timeout=deployment.timeout,
            signer=identity.signer, trusted=identity.trusted, peer_roles=(CLIENT,),
        )
        self.reply_to = peer_queue(deployment.session, deployment.via, CLIENT)
        transport.declare(self.reply_to)
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None  # u-shaped: (input, output) awaiting gradients
        self.batches = 0
        self.greeted = False  # nothing but a matching hello is accepted before the handshake
        self.compute_seconds = 0.0  # time spent handling messages: the server's share of a round trip

    def run(self) -> dict:
        log.info("split-server ready: %s mode, layers %d.., input %s", self.settings.mode, self.cut_layer, self.in_shape)
        self.consume()
        if self.save:
            save_parts(self.save, [(self.body.state_dict(), self.cut_layer)])
        log.info("split-server done after %d training batches", self.batches)
        return {"batches": self.batches, "traffic": vars(self.endpoint.traffic)}

    def expecting(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        return ((ACTIVATIONS, GRADIENTS, DONE) if self.greeted else (HELLO,)), (CLIENT,)

    def check(self, message: Message) -> None:
        """Refuse what this server cannot apply, before it touches the model."""
        vanilla_train = self.settings.mode == "vanilla" and message.meta.get("train") is True
        if message.kind == ACTIVATIONS:
            specs = {"x": TensorSpec("float32", (None, *self.in_shape))}
            if vanilla_train:
                specs["y"] = TensorSpec("int64", (None,))
            check_tensors(message, specs)
            if vanilla_train and not np.all((message.tensors["y"] >= 0) & (message.tensors["y"] < self.classes)):
                raise ProtocolError("value", f"labels outside 0..{self.classes - 1}")
            if message.meta.get("train") is True and self.pending is not None:
                raise ProtocolError("kind", "new activations while gradients for the last batch are outstanding")
        elif message.kind == GRADIENTS:
            if self.pending is None:
                raise ProtocolError("kind", "gradients with no batch outstanding")
            check_tensors(message, {"g": TensorSpec("float32", (len(self.pending[1]), *self.out_shape))})

    def handle(self, message: Message, delivery: Delivery) -> bool:
        started = time.perf_counter()
        finished = self.apply(message)
        self.compute_seconds += time.perf_counter() - started
        return finished

    def apply(self, message: Message) -> bool:
        if message.kind == HELLO:
            ours = shared(self.settings)
            differing = sorted(k for k in ours if message.meta.get(k) != ours[k])
            problem = ", ".join(f"{k}: client {message.meta.get(k)!r}, server {ours[k]!r}" for k in differing)
            self.endpoint.send(self.reply_to, HELLO, ok=not differing, problem=problem)
            if differing:
                log.error("split-server: the client's settings differ (%s)", problem)
            self.greeted = not differing
            return bool(differing)
        if message.kind == DONE:
            self.endpoint.send(self.reply_to, DONE, batches=self.batches, compute_seconds=self.compute_seconds)
            return True
        if message.kind == GRADIENTS:  # u-shaped, second half of a training batch
            inputs, outputs = self.pending
            self.pending = None
            outputs.backward(torch.from_numpy(message.tensors["g"]))
            self._step()
            self.endpoint.send(self.reply_to, GRADIENTS, {"g": to_numpy(inputs.grad)})
            return False
        inputs = torch.from_numpy(message.tensors["x"])  # (B, *in_shape)
        if message.meta.get("train") is not True:
            self.body.eval()
            with torch.no_grad():
                outputs = self.body(inputs)  # (B, *out_shape)
            self.endpoint.send(self.reply_to, OUTPUTS, {"h": to_numpy(outputs)})
            return False
        self.body.train()
        self.opt.zero_grad(set_to_none=True)
        inputs.requires_grad_(True)
        outputs = self.body(inputs)
        if self.settings.mode == "u-shaped":
            self.pending = (inputs, outputs)
            self.endpoint.send(self.reply_to, OUTPUTS, {"h": to_numpy(outputs)})
            return False
        loss = train.loss_fn(outputs, torch.from_numpy(message.tensors["y"]))
        loss.backward()
        self._step()
        self.endpoint.send(self.reply_to, GRADIENTS, {"g": to_numpy(inputs.grad)}, loss=loss.item())
        return False

    def _step(self) -> None:
        self.opt.step()
        self.batches += 1
