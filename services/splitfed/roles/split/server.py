"""split-server: holds the model's middle (u-shaped) or last layers (vanilla) and no data."""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path

import numpy as np
import torch

from splitfed.learning import data, models, split, train
from splitfed.learning.settings import SplitSettings
from splitfed.protocol import Message, ProtocolError, TensorSpec, check_tensors
from splitfed.roles.base import Role
from splitfed.roles.declaration import Identity, ProgressSink
from splitfed.roles.endpoint import Endpoint, Rejection, queue_name, to_numpy
from splitfed.roles.split.common import (
    ABORT, ACTIVATIONS, CLIENT, DONE, GRADIENTS, HANDSHAKE, HELLO, OUTPUTS, SERVER, peer_queue, save_parts, shared,
)
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
            signer=identity.signer, trusted=identity.trusted, peer_roles=(CLIENT,), handshake=HANDSHAKE,
        )
        self.endpoint.bind(uuid.uuid4().hex)  # this server's run: drawn afresh at every start
        self.started_at = time.time()  # stated in its hello, so a relay follows the newest run
        self.reply_to = peer_queue(deployment.session, deployment.via, CLIENT)
        transport.declare(self.reply_to)
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None  # u-shaped: (input, output) awaiting gradients
        self.batches = 0
        self.greeted = False  # nothing but a matching hello is accepted before the handshake
        self.begun = False  # a batch has come: a hello can no longer (re)start the run
        self.compute_seconds = 0.0  # time spent handling messages: the server's share of a round trip

    def run(self) -> dict:
        log.info("split-server ready: %s mode, layers %d.., input %s", self.settings.mode, self.cut_layer, self.in_shape)
        self.consume()
        if self.save:
            save_parts(self.save, [(self.body.state_dict(), self.cut_layer)])
        log.info("split-server done after %d training batches", self.batches)
        return {"batches": self.batches, "traffic": vars(self.endpoint.traffic)}

    def expecting(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        return ((HELLO, ACTIVATIONS, GRADIENTS, DONE) if self.greeted else (HELLO,)), (CLIENT,)

    def check(self, message: Message) -> None:
        """Refuse what this server cannot apply, before it touches the model."""
        if message.kind == HELLO and not isinstance(message.meta.get("nonce"), str):
            raise ProtocolError("malformed", "hello without a nonce")
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

    def on_reject(self, rejection: Rejection) -> None:
        """A client message of another run: this server restarted (or never saw the run's
        hello), so that run cannot go on; say so to the client rather than leave it waiting.
        An authentic message of an old run gets one abort naming that run, which the client of
        the current run refuses: replaying them costs the attacker a message per abort."""
        message = rejection.message
        if rejection.reason == "replay" and message is not None and message.sender == CLIENT and message.kind not in HANDSHAKE:
            run = message.meta.get("run")
            reason = f"this split-server (run {self.endpoint.run}) does not know run {run}: it restarted, or the run began with another server"
            self.endpoint.send(self.reply_to, ABORT, run=run if isinstance(run, str) else "", reason=reason)

    def handle(self, message: Message, delivery: Delivery) -> bool:
        started = time.perf_counter()
        finished = self.apply(message)
        self.compute_seconds += time.perf_counter() - started
        return finished

    def apply(self, message: Message) -> bool:
        if message.kind == HELLO:
            return self.greet(message)
        self.begun = True
        if message.kind == DONE:
            self.answer(DONE, batches=self.batches, compute_seconds=self.compute_seconds)
            return True
        if message.kind == GRADIENTS:  # u-shaped, second half of a training batch
            inputs, outputs = self.pending
            self.pending = None
            outputs.backward(torch.from_numpy(message.tensors["g"]))
            self._step()
            self.answer(GRADIENTS, {"g": to_numpy(inputs.grad)})
            return False
        inputs = torch.from_numpy(message.tensors["x"])  # (B, *in_shape)
        if message.meta.get("train") is not True:
            self.body.eval()
            with torch.no_grad():
                outputs = self.body(inputs)  # (B, *out_shape)
            self.answer(OUTPUTS, {"h": to_numpy(outputs)})
            return False
        self.body.train()
        self.opt.zero_grad(set_to_none=True)
        inputs.requires_grad_(True)
        outputs = self.body(inputs)
        if self.settings.mode == "u-shaped":
            self.pending = (inputs, outputs)
            self.answer(OUTPUTS, {"h": to_numpy(outputs)})
            return False
        loss = train.loss_fn(outputs, torch.from_numpy(message.tensors["y"]))
        loss.backward()
        self._step()
        self.answer(GRADIENTS, {"g": to_numpy(inputs.grad)}, loss=loss.item())
        return False

    def answer(self, kind: str, tensors: dict[str, np.ndarray] | None = None, **meta: object) -> None:
        """Send the client `kind`, bound to this run like every answer but the handshakes."""
        self.endpoint.send(self.reply_to, kind, tensors, to=CLIENT, **meta)

    def greet(self, message: Message) -> bool:
        """Answer a hello with this server's run, if the settings match and the run has not
        begun; True when the server is finished (the client was configured differently). A hello
        once the run has begun comes from a restarted client (or is replayed): its answer says
        the run cannot go on, and the run of the client already here is untouched. (A client's
        hello is unnumbered, so accepting one expects the client's numbered messages from 1.)"""
        ours = shared(self.settings)
        differing = sorted(k for k in ours if message.meta.get(k) != ours[k])
        problem = ", ".join(f"{k}: client {message.meta.get(k)!r}, server {ours[k]!r}" for k in differing)
        if self.begun:
            problem = f"run {self.endpoint.run} is {self.batches} batches in; a restarted client cannot rejoin it: restart both halves"
            log.warning("split-server: a hello arrived %d batches into the run (a restarted client, or a replay); refused", self.batches)
        answer = {"ok": not problem, "problem": problem, "begun": self.begun, "ref": message.meta["nonce"], "run": self.endpoint.run, "started": self.started_at}
        self.endpoint.send(self.reply_to, HELLO, **answer)
        if self.begun:
            return False
        if differing:
            log.error("split-server: the client's settings differ (%s)", problem)
            return True
        self.greeted = True
        self.endpoint.resync(message.sender)
        return False

    def _step(self) -> None:
        self.opt.step()
        self.batches += 1
