"""What the split server accepts from a client: one check per message kind, each raising
ProtocolError before the message touches the model or the run's state (the server's
`check` hook). The turn rules are the schedule's (`Schedule.check_turn`)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Protocol

import numpy as np

from splitfed.learning.settings import WIRE_NUMPY_DTYPES
from splitfed.protocol import Message, ProtocolError, TensorSpec, check_tensors
from splitfed.roles.p2p.common import fingerprint_of
from splitfed.roles.split.common import ACTIVATIONS, EVALUATED, GRADIENTS, HANDED, HELLO, TRAINED

# One sample's input shape as a client's hello states it: (C, H, W) images or (F,) features, a few
# more dimensions at most, each side and the whole sample within what a party could train on.
MAX_DIMENSIONS, MAX_SIDE, MAX_SAMPLE_VALUES = 5, 65536, 1 << 28

if TYPE_CHECKING:
    from splitfed.learning.settings import SplitNNSettings
    from splitfed.roles.split.records import ClientState, EpochLog
    from splitfed.roles.split.schedules import Schedule


class ServerView(Protocol):
    """What the checks read of the split server."""

    settings: SplitNNSettings
    in_shape: tuple[int, ...] | None  # per sample, at the cut (None until the server has its model: no client is greeted before)
    out_shape: tuple[int, ...] | None  # per sample, at the server half's output
    classes: int
    schedule: Schedule
    epoch: int
    period: int
    awaiting_evaluation: EpochLog | None


def check_client_message(server: ServerView, state: ClientState, message: Message) -> None:
    """A hello needs a nonce, the client's fingerprint and one sample's input shape; anything else
    comes after the client's hello and passes its kind's check."""
    if message.kind == HELLO:
        if not isinstance(message.meta.get("nonce"), str) or len(message.meta["nonce"]) > 64:
            raise ProtocolError("malformed", "hello without a nonce")
        if message.meta["nonce"] in state.hellos:
            raise ProtocolError("replay", f"a hello from {state.name} seen before (nonce {message.meta['nonce']})")
        fingerprint_of(message.meta)
        input_shape_of(message.meta)
        return
    if not state.greeted:
        raise ProtocolError("kind", f"{message.kind} from {state.name} before its hello")
    BY_KIND[message.kind](server, state, message)


def input_shape_of(meta: dict) -> tuple[int, ...]:
    """One sample's input shape as a hello states it: a short list of positive sides."""
    shape = meta.get("input_shape")
    if not (isinstance(shape, list) and 1 <= len(shape) <= MAX_DIMENSIONS
            and all(isinstance(side, int) and not isinstance(side, bool) and 1 <= side <= MAX_SIDE for side in shape)
            and math.prod(shape) <= MAX_SAMPLE_VALUES):
        raise ProtocolError("malformed", f"hello needs one sample's input shape: 1 to {MAX_DIMENSIONS} sides of 1..{MAX_SIDE}, "
                                         f"at most {MAX_SAMPLE_VALUES} values in all")
    return tuple(shape)


def check_activations(server: ServerView, state: ClientState, message: Message) -> None:
    """A batch at the cut (with its labels when the server half ends the model), one at a time per client."""
    training = message.meta.get("train") is True
    vanilla_train = server.settings.mode == "vanilla" and training
    specs = {"x": TensorSpec(WIRE_NUMPY_DTYPES[server.settings.wire_dtype], (None, *server.in_shape))}
    if vanilla_train:
        specs["y"] = TensorSpec("int64", (None,))
    check_tensors(message, specs)
    if vanilla_train and not np.all((message.tensors["y"] >= 0) & (message.tensors["y"] < server.classes)):
        raise ProtocolError("value", f"labels outside 0..{server.classes - 1}")
    if message.meta.get("prior", False) is not False and (message.meta["prior"] is not True or training or server.settings.mode != "vanilla"):
        raise ProtocolError("malformed", "prior (a label prior's query of the current layers) is true only on a vanilla client's batch that does not train")
    if training and state.pending is not None:
        raise ProtocolError("kind", "new activations while gradients for the last batch are outstanding")
    server.schedule.check_turn(state, message)


def check_gradients(server: ServerView, state: ClientState, message: Message) -> None:
    """u-shaped: the gradients at the server half's output, for the batch outstanding."""
    if state.pending is None:
        raise ProtocolError("kind", "gradients with no batch outstanding")
    check_tensors(message, {"g": TensorSpec(WIRE_NUMPY_DTYPES[server.settings.wire_dtype], (len(state.pending[1]), *server.out_shape))})


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
    """A score asked for: of the epoch awaiting its evaluation, from one of its evaluators, in whole
    counts: of its part of the test set (`correct`, `loss_sum`, `samples`) if it was given one,
    and of its own test data (`own`) if it was asked for that."""
    pending = server.awaiting_evaluation
    if pending is None or state.name not in pending.waiting_for() or message.meta.get("epoch") != pending.epoch:
        raise ProtocolError("kind", f"an evaluation from {state.name} that was not asked for")
    if state.name in pending.evaluators:
        check_counts(message.meta)
    own = message.meta.get("own")
    if state.name in pending.party_evaluators:
        if not isinstance(own, dict):
            raise ProtocolError("malformed", "evaluated needs the counts of the client's own test data (own)")
        check_counts(own)
    elif own is not None:
        raise ProtocolError("kind", f"an evaluation of {state.name}'s own test data, which was not asked for")


def check_counts(meta: dict) -> None:
    correct, loss_sum, samples = (meta.get(k) for k in ("correct", "loss_sum", "samples"))
    if not (isinstance(samples, int) and isinstance(correct, int) and 0 <= correct <= samples and isinstance(loss_sum, float) and loss_sum >= 0):
        raise ProtocolError(
            "malformed",
            f"evaluated needs whole counts 0 <= correct <= samples and a float loss_sum >= 0, not {correct!r:.20}, {samples!r:.20}, {loss_sum!r:.30}",
        )


BY_KIND = {ACTIVATIONS: check_activations, GRADIENTS: check_gradients, TRAINED: check_trained, HANDED: check_handed, EVALUATED: check_evaluated}
