"""fedavg-worker: holds one partition of the data; trains the global model it is sent and
returns a signed update for that round."""

from __future__ import annotations

import logging

import torch

from splitfed.learning import data, federated, models
from splitfed.protocol import Message, ProtocolError, TensorSpec, check_tensors
from splitfed.roles.endpoint import Endpoint
from splitfed.roles.fedavg_common import (
    DONE, JOIN, MODEL, REFUSED, SERVER, UPDATE, WELCOME, WORKER, FedAvgSettings, frame_digest, server_queue, to_wire, worker_queue,
)
from splitfed.security.keys import KeyList, Signer
from splitfed.transport import Transport

log = logging.getLogger(__name__)


class Refused(RuntimeError):
    """The server refused this worker; the message says why."""


class FedAvgWorker:
    def __init__(
        self, settings: FedAvgSettings, transport: Transport, worker_id: str, index: int, *,
        signer: Signer | None = None, trusted: KeyList | None = None,
    ):
        self.settings = settings
        self.worker_id = worker_id
        self.index = index
        meta = data.info(settings.dataset)
        self.model = models.build(settings.model, meta, settings.seed)
        self.specs = {name: TensorSpec("float32", tuple(value.shape)) for name, value in self.model.state_dict().items()}
        full = data.load(settings.dataset, train=True, data_dir=settings.data_dir, limit=settings.limit)
        mine = data.partition(full.labels, settings.partition, settings.workers, settings.seed)[index]
        self.data = data.Split(full.images[mine], full.labels[mine])  # only this worker's share is kept
        self.endpoint = Endpoint(
            transport, session=settings.session, role=WORKER, inbox=worker_queue(settings.session, worker_id), timeout=settings.timeout,
            signer=signer, trusted=trusted, ordered=False, durable=True, name=worker_id,
        )
        self.server = server_queue(settings.session)
        transport.declare(self.server, durable=True)
        self.last_round = 0  # the last round this worker sent an update for
        if trusted is None:
            log.warning("worker %s: no key list, messages from the server are not authenticated", worker_id)

    def run(self) -> dict:
        self.join()
        rounds = 0
        while True:
            message, delivery = self.endpoint.receive((MODEL, DONE, WELCOME), (SERVER,), self.check)
            if message.kind == MODEL and message.round > self.last_round:
                self.train_and_send(message)
                rounds += 1
            self.endpoint.ack(delivery)  # a model for a round already answered is a redelivery: nothing to do
            if message.kind == DONE:
                log.info("worker %s done after %d rounds", self.worker_id, rounds)
                return {"worker": self.worker_id, "rounds": rounds, "samples": len(self.data), "traffic": vars(self.endpoint.traffic)}

    def join(self) -> None:
        """Announce this worker; wait for the welcome (or a refusal naming this very join)."""
        sent = self.endpoint.send_message(self.server, Message(JOIN, "", "", meta={"samples": len(self.data)}), persistent=True)
        digest = frame_digest(self.endpoint.last_frame)
        while True:
            message, delivery = self.endpoint.receive((WELCOME, REFUSED, MODEL, DONE), (SERVER,))
            self.endpoint.ack(delivery)
            if message.kind == REFUSED and message.meta.get("ref") == digest:
                raise Refused(f"the server refused worker {self.worker_id}: {message.meta.get('reason')} ({message.meta.get('detail')})")
            if message.kind == WELCOME:
                log.info("worker %s joined at round %d (join seq %d)", self.worker_id, message.round, sent.seq)
                return
            # Anything else predates this join (a model queued while this worker was away): stale.

    def check(self, message: Message) -> None:
        if message.kind == MODEL:
            check_tensors(message, self.specs)
            mu = message.meta.get("prox_mu", 0.0)
            if not isinstance(mu, (int, float)) or mu < 0:
                raise ProtocolError("value", f"prox_mu {mu!r}")

    def train_and_send(self, message: Message) -> None:
        global_state = {name: torch.from_numpy(array.copy()) for name, array in message.tensors.items()}
        self.model.load_state_dict(global_state)
        seed = federated.round_seed(self.settings.seed, self.index, message.round)
        loss = federated.local_training(self.model, self.data, self.settings, float(message.meta.get("prox_mu", 0.0)), seed)
        update = Message(UPDATE, "", "", round=message.round, meta={"samples": len(self.data), "train_loss": loss}, tensors=to_wire(self.model.state_dict()))
        self.endpoint.send_message(self.server, update, persistent=True)
        self.last_round = message.round
        log.info("worker %s: round %d trained on %d samples, loss %.4f", self.worker_id, message.round, len(self.data), loss)
