"""What the split server accepts from a client: one check per message kind, each raising
ProtocolError before the message touches the model or the run's state (the server's
`check` hook). The turn rules are the schedule's (`Schedule.check_turn`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import numpy as np

from splitfed.protocol import Message, ProtocolError, TensorSpec, check_tensors
from splitfed.roles.split.common import ACTIVATIONS, EVALUATED, GRADIENTS, HANDED, HELLO, TRAINED

if TYPE_CHECKING:
    from splitfed.learning.settings import SplitNNSettings
    from splitfed.roles.split.records import ClientState, EpochLog
    from splitfed.roles.split.schedules import Schedule


class ServerView(Protocol):
    """What the checks read of the split server."""

    settings: SplitNNSettings
    in_shape: tuple[int, ...]  # per sample, at the cut
    out_shape: tuple[int, ...]  # per sample, at the server half's output
    classes: int
    schedule: Schedule
    epoch: int
    period: int
    awaiting_evaluation: EpochLog | None


def check_client_message(server: ServerView, state: ClientState, message: Message) -> None:
    """A hello needs a nonce; anything else comes after the client's hello and passes its kind's check."""
    if message.kind == HELLO:
        if not isinstance(message.meta.get("nonce"), str):
            raise ProtocolError("malformed", "hello without a nonce")
        return
    if not state.greeted:
        raise ProtocolError("kind", f"{message.kind} from {state.name} before its hello")
    BY_KIND[message.kind](server, state, message)


def check_activations(server: ServerView, state: ClientState, message: Message) -> None:
    """A batch at the cut (with its labels when the server half ends the model), one at a time per client."""
    training = message.meta.get("train") is True
    vanilla_train = server.settings.mode == "vanilla" and training
    specs = {"x": TensorSpec("float32", (None, *server.in_shape))}
    if vanilla_train:
        specs["y"] = TensorSpec("int64", (None,))
    check_tensors(message, specs)
    if vanilla_train and not np.all((message.tensors["y"] >= 0) & (message.tensors["y"] < server.classes)):
        raise ProtocolError("value", f"labels outside 0..{server.classes - 1}")
    if training and state.pending is not None:
        raise ProtocolError("kind", "new activations while gradients for the last batch are outstanding")
    server.schedule.check_turn(state, message)


def check_gradients(server: ServerView, state: ClientState, message: Message) -> None:
    """u-shaped: the gradients at the server half's output, for the batch outstanding."""
    if state.pending is None:
        raise ProtocolError("kind", "gradients with no batch outstanding")
    check_tensors(message, {"g": TensorSpec("float32", (len(state.pending[1]), *server.out_shape))})


def check_trained(server: ServerView, state: ClientState, message: Message) -> None:
    """A share of a period of this run, not ahead of the one open."""
    epoch, period, loss = message.meta.get("epoch"), message.meta.get("period"), message.meta.get("train_loss")
    syncs = server.settings.syncs_per_epoch
    if not isinstance(epoch, int) or not isinstance(period, int) or not 1 <= period <= syncs or not isinstance(loss, float):
        raise ProtocolError("malformed", f"trained needs an integer epoch, a period in 1..{syncs} and a float train_loss")
    server.schedule.check_turn(state, message)
    if (epoch, period) > (server.epoch, server.period):
        raise ProtocolError("kind", f"trained for epoch {epoch} period {period} from {state.name} while epoch {server.epoch} period {server.period} is open")


def check_handed(server: ServerView, state: ClientState, message: Message) -> None:
    server.schedule.check_turn(state, message)


def check_evaluated(server: ServerView, state: ClientState, message: Message) -> None:
    """A score asked for: of the epoch awaiting its evaluation, from one of its evaluators, in whole counts."""
    pending = server.awaiting_evaluation
    if pending is None or state.name not in pending.waiting_for() or message.meta.get("epoch") != pending.epoch:
        raise ProtocolError("kind", f"an evaluation from {state.name} that was not asked for")
    correct, loss_sum, samples = (message.meta.get(k) for k in ("correct", "loss_sum", "samples"))
    if not (isinstance(samples, int) and isinstance(correct, int) and 0 <= correct <= samples and isinstance(loss_sum, float) and loss_sum >= 0):
        raise ProtocolError(
            "malformed",
            f"evaluated needs whole counts 0 <= correct <= samples and a float loss_sum >= 0, not {correct!r:.20}, {samples!r:.20}, {loss_sum!r:.30}",
        )


BY_KIND = {ACTIVATIONS: check_activations, GRADIENTS: check_gradients, TRAINED: check_trained, HANDED: check_handed, EVALUATED: check_evaluated}
