"""split-fed: the fed server of splitfed-v1 and v2 (Thapa et al.'s "fed server"). Each client sends
it its layers at the end of its share of a period (an epoch, or a part of one with
--syncs-per-epoch); when the split server closes the period it says whose shares it includes and
how many samples each trained on, and the fed sends every included client the weighted average of
exactly those layers. So the split server never sees a client's layers, and every client continues
from the same ones. With --fed-lr the layers it sends step from the last average it sent (where
every client began the period) by fed-lr times the change to the new average; the run's first
averaging has no last one and is the average itself. numpy only: no torch.

It follows the run of the newest split server (by the start time the server signs in its
hello), and drops layers of any other run. A client that reports a period after it closed (too
slow, given up) gets the newest layers the fed has sent when its own arrive, and goes on from
them with the others (the server tells it which period is open).

It holds no model: the server's hello states a client's layers (names, dtypes, shapes). From then
on a head must hold exactly those, and the fed accepts no message larger than they make. Before
any hello it keeps its transport's limit: the first chunks of heads queued behind the hello may
reach the transport before the fed has handled it.
"""

from __future__ import annotations

import logging

import numpy as np

from splitfed.learning.averaging import step_towards, weighted_average
from splitfed.learning.settings import SplitNNSettings
from splitfed.observability import metrics
from splitfed.protocol import MAX_MESSAGE_BYTES, Message, ProtocolError, TensorSpec, check_tensors
from splitfed.roles.base import Role
from splitfed.roles.declaration import Identity
from splitfed.roles.endpoint import Endpoint, queue_name
from splitfed.roles.limits import message_bytes, stated_layout
from splitfed.roles.split.common import AVERAGE, CLIENT, CLOSED, DONE, FED, HEAD, HELLO, SERVER, client_inbox, client_index, client_name
from splitfed.transport import Delivery, Transport

log = logging.getLogger(__name__)


class SplitFed(Role):
    def __init__(self, settings: SplitNNSettings, deployment, transport: Transport, identity: Identity = Identity()):  # noqa: ANN001 (roles.deployment.SigningService)
        self.settings = settings
        self.session = deployment.session
        self.clients = [client_name(index, settings.clients) for index in range(settings.clients)]
        self.endpoint = Endpoint(
            transport, session=self.session, role=FED, inbox=queue_name(self.session, FED), timeout=deployment.timeout,
            signer=identity.signer, trusted=identity.trusted, peer_roles=(CLIENT, SERVER), handshake=(HELLO,),
            max_message_bytes=MAX_MESSAGE_BYTES,  # until a server's hello says how large the clients' layers are (`follow`)
        )
        for index in range(settings.clients):
            transport.declare(client_inbox(self.session, index, settings.clients))
        self.server_started = float("-inf")  # the start time of the server whose run this fed follows
        self.layout: dict[str, TensorSpec] | None = None  # every client's layers: names, dtypes, shapes (from the server's hello)
        self.heads: dict[str, tuple[int, dict[str, np.ndarray]]] = {}  # client -> (samples it claims, its layers) for the open period
        self.newest: tuple[tuple[int, int], list[str], dict[str, np.ndarray]] | None = None  # the last layers sent: (period, included, layers)
        self.open = (1, 1)  # the (epoch, period) whose layers are being gathered
        self.averaged_periods = 0
        self.averaged = metrics.AVERAGED_CLIENTS.labels(FED, self.session)

    def run(self) -> dict:
        """Average until the server's `done`."""
        log.info("split-fed ready for %d clients", self.settings.clients)
        self.consume()
        return {"averaged_periods": self.averaged_periods, "traffic": vars(self.endpoint.traffic)}

    def expecting(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        return (HELLO, HEAD, CLOSED, DONE), (SERVER, *self.clients)

    def check(self, message: Message) -> None:
        if message.kind != HELLO and self.endpoint.run is None:
            raise ProtocolError("replay", f"{message.kind} from {message.sender} before the server named its run")
        if message.kind in (HELLO, CLOSED, DONE) and message.sender != SERVER or message.kind == HEAD and message.sender == SERVER:
            raise ProtocolError("sender", f"{message.kind} from {message.sender}")
        if message.kind == HELLO and not (isinstance(message.meta.get("run"), str) and isinstance(message.meta.get("started"), float)
                                          and stated_layout(message.meta.get("layout")) is not None):
            raise ProtocolError("malformed", "a server hello names its run, its start time and a client's layers' dtypes and shapes")
        if message.kind == HELLO and message.meta["started"] <= self.server_started:
            raise ProtocolError("replay", f"a hello of a server started no later than the one followed (run {self.endpoint.run})")
        if message.kind == HEAD:
            self.check_head(message)
        if message.kind == CLOSED:
            self.check_closed(message)

    def check_head(self, message: Message) -> None:
        period, samples = period_of(message), message.meta.get("samples")
        if not isinstance(samples, int) or samples < 1:
            raise ProtocolError("malformed", "head needs an integer sample count")
        if period > self.open:
            raise ProtocolError("kind", f"layers for (epoch, period) {period} from {message.sender} while {self.open} is open")
        check_tensors(message, self.layout)

    def check_closed(self, message: Message) -> None:
        included, samples = message.meta.get("included"), message.meta.get("samples")
        if period_of(message) != self.open or not isinstance(included, list) or not isinstance(samples, dict):
            raise ProtocolError("kind", f"closed for (epoch, period) {period_of(message)} while {self.open} is open")
        if not included or any(name not in self.clients or not isinstance(samples.get(name), int) or samples[name] < 0 for name in included):
            raise ProtocolError("malformed", "closed names clients of this run, each with its samples")

    def handle(self, message: Message, delivery: Delivery) -> None:
        if message.kind == HELLO:
            self.follow(message)
        elif message.kind == HEAD:
            self.keep(message)
        elif message.kind == CLOSED:
            self.average(period_of(message), message.meta["included"], message.meta["samples"])
        self.finished = message.kind == DONE

    def follow(self, message: Message) -> None:
        """A server's hello: follow its run (`check` has refused the hellos of servers older than
        the one followed, replays among them)."""
        self.server_started = message.meta["started"]
        self.endpoint.bind(message.meta["run"])
        self.layout = stated_layout(message.meta["layout"])
        self.endpoint.limit(message_bytes(self.layout))  # a head is a client's layers; the rest is metadata
        for sender in (SERVER, *self.clients):  # a new run's parties number their messages afresh
            self.endpoint.resync(sender)
        self.heads, self.newest, self.open, self.averaged_periods = {}, None, (1, 1), 0
        log.info("split-fed follows run %s", self.endpoint.run)

    def keep(self, message: Message) -> None:
        if period_of(message) < self.open:
            if self.newest is not None and message.sender not in self.newest[1]:
                self.send_average(self.newest[0], self.newest[2], [message.sender])  # late: it goes on from the newest layers
            return
        self.heads[message.sender] = (message.meta["samples"], message.tensors)

    def average(self, period: tuple[int, int], included: list[str], samples: dict[str, int]) -> None:
        """The included clients' layers, weighted by the samples the server saw from each (then
        the --fed-lr step from the last layers sent). Clients whose layers came but who were left
        out (late by a hair) get them too, and go on from them."""
        present = [name for name in included if name in self.heads]
        if missing := sorted(set(included) - set(present)):
            log.warning("split-fed: epoch %d period %d: no layers from %s; averaging the others", *period, ", ".join(missing))
        if present:
            average = weighted_average([self.heads[name][1] for name in present], [samples[name] for name in present])
            if self.newest is not None:
                average = step_towards(self.newest[2], average, self.settings.fed_lr)
            self.send_average(period, average, included + sorted(set(self.heads) - set(included)))
            self.newest = (period, present, average)
            self.averaged_periods += 1
            self.averaged.set(len(present))
        self.heads = {}
        epoch, number = period
        self.open = (epoch, number + 1) if number < self.settings.syncs_per_epoch else (epoch + 1, 1)

    def send_average(self, period: tuple[int, int], average: dict[str, np.ndarray], recipients: list[str]) -> None:
        """The same layers to every recipient: encoded once (Endpoint.send_messages), each message
        numbered and signed for its recipient."""
        epoch, number = period
        self.endpoint.send_messages([
            (client_inbox(self.session, client_index(name), self.settings.clients),
             Message(AVERAGE, self.session, FED, meta={"epoch": epoch, "period": number}, tensors=average), name)
            for name in recipients
        ])


def period_of(message: Message) -> tuple[int, int]:
    """The (epoch, period) a head or closed speaks of, checked to be two positive integers."""
    epoch, period = message.meta.get("epoch"), message.meta.get("period")
    if not (isinstance(epoch, int) and isinstance(period, int) and epoch >= 1 and period >= 1):
        raise ProtocolError("malformed", f"{message.kind} needs a positive integer epoch and period")
    return epoch, period
