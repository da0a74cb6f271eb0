"""What p2p-peer and smpl-peer share: a share of the data and a whole model (and their
fingerprint, which the tracker holds to the run's), an endpoint on the peer's own queue, its
membership at the tracker, the inbox polled while it trains, and how an epoch (or hyperedge) is
recorded (scored on the peer's own test data), reported and exported."""

from __future__ import annotations

import time
from collections.abc import Callable, Collection

from splitfed.errors import Refused
from splitfed.learning import train
from splitfed.learning.device import state_of
from splitfed.learning.peers import learner, peer_context, scoring_data
from splitfed.learning.tasks import Task, fingerprint, fingerprint_difference
from splitfed.learning.settings import PeerSettings
from splitfed.observability import metrics
from splitfed.protocol import Message, TensorSpec
from splitfed.roles.declaration import Identity, Progress, ProgressSink
from splitfed.roles.endpoint import Endpoint
from splitfed.roles.p2p.common import TRACKER, peer_name, peer_queue
from splitfed.roles.p2p.membership import Membership
from splitfed.transport import Transport

POLL_SECONDS = 0.5  # how often a training peer looks at its inbox (messages to keep or answer)


class Peer:
    KINDS: Collection[str] = ()  # what the peer's inbox takes

    def __init__(self, role: str, settings: PeerSettings, deployment, transport: Transport, identity: Identity, on_progress: ProgressSink | None, planned: int):  # noqa: ANN001 (roles.p2p.PeerDeployment)
        """`planned`: the epochs (or hyperepochs) this peer means to report."""
        self.role = role
        self.settings = settings
        self.session = deployment.session
        self.name = peer_name(role, deployment.peer_index)
        self.on_progress = on_progress
        self.planned = planned
        task = Task(settings)
        context = peer_context(settings, role, deployment.peer_index)
        self.learner = learner(task, context, settings)
        # What the peer reads most often, named once: the learner's model, share, scoring loss and device never change.
        self.model, self.share, self.loss_of, self.compute = self.learner.model, self.learner.share, self.learner.loss_of, self.learner.compute
        self.test = scoring_data(task, context)
        self.fingerprint = fingerprint(self.model, task.classes(context))
        self.specs = {name: TensorSpec(array.dtype.name, array.shape) for name, array in state_of(self.model).items()}  # its model as it travels
        self.endpoint = Endpoint(
            transport, session=self.session, role=role, inbox=peer_queue(self.session, self.name), timeout=deployment.timeout,
            signer=identity.signer, trusted=identity.trusted, ordered=False, name=self.name, peer_roles=(TRACKER, role),
            max_message_bytes=self.largest_message(),
        )
        self.membership = Membership(self.endpoint, role, self.name, len(self.share), planned, deployment.peer_timeout, self.fingerprint)
        self.history: list[dict] = []
        self.next_poll = 0.0
        self.counted = {event: metrics.PEER_MODELS.labels(role, self.session, event) for event in ("sent", "received", "averaged", "dropped")}
        metrics.LOCAL_SAMPLES.labels(role, self.session).set(len(self.share))

    def run(self) -> dict:
        """The peer's work (`train`), and its heartbeats stopped however that ends."""
        try:
            return self.train()
        finally:
            self.membership.stop()

    def largest_message(self) -> int:
        """The largest message this peer can legitimately receive, from its model and settings (the
        tracker's are metadata alone)."""
        raise NotImplementedError

    def train(self) -> dict:
        raise NotImplementedError

    def check(self, message: Message) -> None:
        raise NotImplementedError

    def handle(self, message: Message) -> None:
        raise NotImplementedError

    def refused(self, message: Message) -> None:
        """The tracker refused this peer's register: its model or classes are not the run's (those
        of the first peer it accepted). The peer stops, saying how they differ."""
        difference = fingerprint_difference(message.meta["fingerprint"], self.fingerprint)
        raise Refused(f"the p2p-tracker refused {self.name}: its model and classes are not the run's: {difference} ({self.name}'s against the run's)")

    def poll(self, until: float, done: Callable[[], bool] | None = None) -> None:
        """Handle what is in the inbox, waiting for more until `until` (monotonic) or until `done()`."""
        self.membership.poll(until, self.KINDS, self.check, self.handle, done)
        self.next_poll = time.monotonic() + POLL_SECONDS

    def poll_if_due(self) -> None:
        if time.monotonic() >= self.next_poll:
            self.poll(until=time.monotonic())

    def record(self, record: dict, before: train.Evaluation, after: train.Evaluation) -> None:
        """One epoch (or hyperedge) done: kept, reported to the tracker, exported, shown."""
        record = {"epoch": len(self.history) + 1, "accuracy_before": before.accuracy, "accuracy": after.accuracy, "loss": after.loss,
                  "test_samples": len(self.test), **record}
        self.history.append(record)
        self.membership.epoch = record["epoch"]
        self.membership.report(**{key: value for key, value in record.items() if key != "epoch"})
        metrics.EPOCH.labels(self.role, self.session).set(record["epoch"])
        if record.get("train_loss") is not None:
            metrics.TRAIN_LOSS.labels(self.role, self.session).set(record["train_loss"])
        metrics.TEST_ACCURACY.labels(self.role, self.session).set(after.accuracy)
        metrics.PEER_ACCURACY.labels(self.role, self.session, "before").set(before.accuracy)
        metrics.PEER_ACCURACY.labels(self.role, self.session, "after").set(after.accuracy)
        if self.on_progress:
            self.on_progress(Progress("epoch", record["epoch"], self.planned, record.get("train_loss") or 0.0, record))

    def result(self) -> dict:
        return {"peer": self.name, "incarnation": self.membership.incarnation, "accuracy": self.history[-1]["accuracy"],
                "loss": self.history[-1]["loss"], "history": self.history, "traffic": vars(self.endpoint.traffic)}
