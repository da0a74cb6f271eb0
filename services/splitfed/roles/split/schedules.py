"""How several split clients share one split server (--schedule): what the server holds for them
and when an epoch closes, as one object per schedule behind the small interface of `Schedule`.

- OneClient: a lone client (whatever --schedule says); its batches train the server's layers, and
  a period closes when it has reported its share.
- SplitFedV2: one set of server layers trained by every client's batches in the order they
  arrive; a period closes when every client that is there has reported; a split-fed averages the
  clients' layers.
- SplitFedV1: as v2, but one copy of the server layers per client, averaged (weighted by the
  samples each trained on) when a period closes, every copy restarting from the average.
- RoundRobin: clients train one at a time, in turns the server passes; the previous holder hands
  its layers to the next one directly, and an epoch closes with the turn that ends its pass.

The server calls its schedule where they differ (which layers a client trains, whether a batch
waits for the shared layers, the turn rules of a message, a client joined or reported, whose
silence holds the run up, what to do once a client is given up); the schedule calls back the
server's own steps (answer a client, close an epoch, open the next period)."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Protocol

import torch

from splitfed.learning import train
from splitfed.learning.averaging import step_towards, weighted_average
from splitfed.learning.device import numpy_state
from splitfed.learning.settings import SplitNNSettings
from splitfed.protocol import Message, ProtocolError
from splitfed.roles.split.common import ACTIVATIONS, CLOSED, HANDED, TRAINED, TURN

if TYPE_CHECKING:
    import numpy as np

    from splitfed.roles.split.records import ClientState, EpochLog


class ServerSteps(Protocol):
    """What a schedule reads of the split server, and the server's own steps it calls back."""

    clients: dict[str, ClientState]
    body: torch.nn.Sequential
    epoch: int
    period: int
    awaiting_evaluation: EpochLog | None

    def answer(self, state: ClientState, kind: str, tensors: dict[str, np.ndarray] | None = None, **meta: object) -> None: ...
    def close_epoch(self, included: list[ClientState], evaluators: list[str]) -> EpochLog: ...
    def next_period(self) -> None: ...
    def next_epoch(self) -> None: ...
    def present(self, name: str) -> bool: ...
    def tell_fed(self, kind: str, **meta: object) -> None: ...


class Schedule:
    fed = False  # a split-fed averages the clients' layers: it hears of every period closed, and of the end

    def __init__(self, settings: SplitNNSettings):
        self.settings = settings

    def layers(self, shared: torch.nn.Sequential, opt: torch.optim.Optimizer) -> tuple[torch.nn.Sequential, torch.optim.Optimizer]:
        """The server layers (and optimiser) a client's batches train: the shared ones."""
        return shared, opt

    def must_wait(self, message: Message, clients: Iterable[ClientState]) -> bool:
        """u-shaped with one shared server half: a batch's forward and backward are two messages
        apart, and the layers must not step in between, so another client's training batch waits
        until no batch is half done (as if the clients took turns per batch)."""
        return (message.kind == ACTIVATIONS and message.meta.get("train") is True and self.settings.mode == "u-shaped"
                and any(state.pending is not None for state in clients))

    def check_turn(self, state: ClientState, message: Message) -> None:
        """Raise ProtocolError for a training batch, `trained` or `handed` out of turn. Only
        round-robin has turns, and only it asks a client to hand its layers on."""
        if message.kind == HANDED:
            raise ProtocolError("kind", f"handed from {state.name}, which was not asked to hand on its layers")

    def handed(self, server: ServerSteps) -> None:
        """The previous holder has handed its layers on (round-robin; refused elsewhere by `check_turn`)."""

    def joined(self, server: ServerSteps) -> None:
        """A client's hello was accepted."""

    def reported(self, server: ServerSteps, state: ClientState) -> None:
        """`state` reported its share of the open period."""
        raise NotImplementedError

    def late(self, server: ServerSteps, state: ClientState, epoch: int, period: int) -> None:
        """`state` reported its share of a period that closed without it."""

    def waited_for(self, server: ServerSteps) -> list[ClientState]:
        """The clients whose silence holds the training up now."""
        raise NotImplementedError

    def after_silence(self, server: ServerSteps) -> None:
        """Clients were given up (enough remain): move the run on without them."""
        raise NotImplementedError


class Periods(Schedule):
    """Clients train in parallel; a period closes once every client that is there has reported
    its share, and the server tells the included clients (and the fed) it closed."""

    def reported(self, server: ServerSteps, state: ClientState) -> None:
        if everyone_reported(server):
            self.close_period(server)

    def late(self, server: ServerSteps, state: ClientState, epoch: int, period: int) -> None:
        """It was left out of the average: the answer says where the run is, and the client goes
        on there from the fed's newest layers."""
        server.answer(state, CLOSED, epoch=epoch, period=period, evaluator="", resume=[server.epoch, server.period])

    def waited_for(self, server: ServerSteps) -> list[ClientState]:
        if server.epoch > self.settings.epochs:
            return []
        return [s for s in server.clients.values() if s.reported is None and not s.gone]

    def after_silence(self, server: ServerSteps) -> None:
        if everyone_reported(server) and server.epoch <= self.settings.epochs:
            self.close_period(server)

    def close_period(self, server: ServerSteps) -> None:
        """Every client that is still there has reported: average the server layers (splitfed-v1),
        tell the included clients and the fed; at an epoch's end, name who evaluates."""
        included = [s for s in server.clients.values() if s.reported is not None]
        if len(included) < self.settings.quorum():
            raise RuntimeError(
                f"epoch {server.epoch} period {server.period}: only {len(included)} of {self.settings.clients} clients finished it "
                f"(--min-clients {self.settings.quorum()})"
            )
        samples = {s.name: s.samples for s in included}
        self.closing(server, included)
        closed = {"epoch": server.epoch, "period": server.period, "included": list(samples), "samples": samples}
        evaluators: list[str] = []
        own: list[str] = []
        if server.period == self.settings.syncs_per_epoch:
            # Every included client holds the same layers now (the fed's average): each scores a
            # part of the test set, so the evaluation costs the epoch 1/N of its time, and (with
            # --evaluate parties or both) its whole own test data.
            record = server.close_epoch(included, evaluators=list(samples))
            evaluators, own = record.evaluators, record.party_evaluators
        for state in included:
            part = [evaluators.index(state.name), len(evaluators)] if state.name in evaluators else [0, 0]
            server.answer(state, CLOSED, **closed, evaluate=part, own=state.name in own)
        server.tell_fed(CLOSED, **closed)
        server.next_period()

    def closing(self, server: ServerSteps, included: list[ClientState]) -> None:
        """The period closes with `included`, before anyone is told."""


class OneClient(Periods):
    """A lone client: the server's layers are its alone, and there is nothing to average."""


class SplitFedV2(Periods):
    fed = True


class SplitFedV1(Periods):
    fed = True

    def __init__(self, settings: SplitNNSettings):
        super().__init__(settings)
        self.averaged = False  # the server's own layers are an average (not the initial ones) once this is set

    def layers(self, shared: torch.nn.Sequential, opt: torch.optim.Optimizer) -> tuple[torch.nn.Sequential, torch.optim.Optimizer]:
        """A copy of the server layers per client, with its own optimiser."""
        body = copy.deepcopy(shared)
        return body, train.optimizer(body.parameters(), self.settings.optimizer, self.settings.lr)

    def must_wait(self, message: Message, clients: Iterable[ClientState]) -> bool:
        """A half-done batch holds only its own client's copy of the layers."""
        return False

    def closing(self, server: ServerSteps, included: list[ClientState]) -> None:
        """Every client's copy of the layers restarts from their average, weighted by the samples
        each trained on, stepped by --fed-lr from the last average (as the fed steps the client
        halves: the run's first averaging is the average itself)."""
        states = [numpy_state(s.body.state_dict()) for s in included]
        average = weighted_average(states, [s.samples for s in included])
        if self.averaged:
            average = step_towards(numpy_state(server.body.state_dict()), average, self.settings.fed_lr)
        self.averaged = True
        average = {k: torch.from_numpy(v) for k, v in average.items()}
        server.body.load_state_dict(average)
        for state in server.clients.values():
            state.body.load_state_dict(average)


class RoundRobin(Schedule):
    """One set of server layers; the server passes the turn (`turn`), and the previous holder
    hands its layers to the next one directly. The turn that ends an epoch's pass closes the
    epoch, and the client that trained it evaluates."""

    def __init__(self, settings: SplitNNSettings, names: list[str]):
        super().__init__(settings)
        self.turns = TurnOrder(names, settings.epochs)

    def check_turn(self, state: ClientState, message: Message) -> None:
        if message.kind == ACTIVATIONS and message.meta.get("train") is True and self.turns.holder != state.name:
            raise ProtocolError("kind", f"a training batch from {state.name}, whose turn it is not")
        if message.kind == TRAINED and self.turns.holder != state.name:
            raise ProtocolError("kind", f"trained from {state.name}, whose turn it is not")
        if message.kind == HANDED and (self.turns.previous != state.name or message.meta.get("holder") != self.turns.holder):
            raise ProtocolError("kind", f"handed from {state.name}, which was not asked to hand on its layers")

    def handed(self, server: ServerSteps) -> None:
        self.turns.handed_to = self.turns.holder
        server.clients[self.turns.holder].heard = time.monotonic()  # its turn starts now that it has the layers

    def joined(self, server: ServerSteps) -> None:
        """The first turn once every client has said hello."""
        if not self.turns.started and all(s.greeted for s in server.clients.values()):
            self.pass_turn(server)

    def reported(self, server: ServerSteps, state: ClientState) -> None:
        self.turns.previous = state.name  # it holds the newest layers now
        self.pass_turn(server)

    def waited_for(self, server: ServerSteps) -> list[ClientState]:
        if not self.turns.started:  # everyone's hello, before the first turn
            return [s for s in server.clients.values() if not s.greeted and not s.gone]
        if (name := self.turns.waiting_on()) is not None:
            return [server.clients[name]]
        return []

    def after_silence(self, server: ServerSteps) -> None:
        """Before the first turn, start with the clients there; a silent holder loses its turn; a
        previous holder that never handed its layers on is passed over, and the holder starts
        from its own layers."""
        present = [s for s in server.clients.values() if server.present(s.name)]
        if len(present) < self.settings.quorum():
            raise RuntimeError(f"only {len(present)} of {self.settings.clients} clients are left (--min-clients {self.settings.quorum()})")
        if not self.turns.started:
            self.pass_turn(server)
        elif self.turns.holder is not None and server.clients[self.turns.holder].gone:
            self.pass_turn(server)
        elif self.turns.previous is not None and server.clients[self.turns.previous].gone:
            self.turns.previous = None
            self.announce_turn(server)

    def pass_turn(self, server: ServerSteps) -> None:
        """Move the turn to the next client that is there; the turn that ended the epoch's pass
        closes the epoch, and the client that trained it evaluates."""
        finished_epoch = self.turns.epoch
        holder = self.turns.advance(server.present)
        if self.turns.epoch != finished_epoch or holder is None:
            included = [s for s in server.clients.values() if s.reported is not None]
            if included:
                server.close_epoch(included, evaluators=[self.turns.previous] if self.turns.previous else [])
            server.next_epoch()
        self.announce_turn(server)

    def announce_turn(self, server: ServerSteps) -> None:
        """Tell every client whose turn it is: the previous holder hands its layers on (and
        evaluates, if its turn closed an epoch); for the others it says the server is alive."""
        holder, previous = self.turns.holder, self.turns.previous
        if holder is not None:
            server.clients[holder].heard = time.monotonic()
        if previous is not None:
            server.clients[previous].heard = time.monotonic()
        record = server.awaiting_evaluation
        evaluate = record.epoch if record is not None and previous in record.evaluators else 0
        # The holder first: its turn is in its queue before the previous holder can hand it anything.
        for state in sorted(server.clients.values(), key=lambda s: s.name != holder):
            if server.present(state.name):
                server.answer(state, TURN, epoch=self.turns.epoch, holder=holder or "", previous=previous or "", evaluate=evaluate)


class TurnOrder:
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


def everyone_reported(server: ServerSteps) -> bool:
    """Every client has reported its share of the open period, or been given up."""
    return all(s.reported is not None or s.gone for s in server.clients.values())


def schedule_for(settings: SplitNNSettings, names: list[str]) -> Schedule:
    """The schedule of a run of these settings, its clients named `names` in index order."""
    if settings.clients == 1:
        return OneClient(settings)
    if settings.schedule == "round-robin":
        return RoundRobin(settings, names)
    return {"splitfed-v1": SplitFedV1, "splitfed-v2": SplitFedV2}[settings.schedule](settings)
