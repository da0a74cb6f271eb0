"""What the FedAvg roles share: queue names, message kinds, model tensors on the wire.

worker --join{samples, nonce, fingerprint}--> server --welcome{round, fingerprint, evaluate}--> worker   (or --refused{reason, ref}--> worker)
server --model{round, params [, control/*], recipe{prox_mu, absent_scale, calibration_tau, frozen_head, control_variates} [, score]}--> each sampled worker
worker --update{round, params [, control-delta/*], samples, train_loss}--> server   (signed, persistent, durable queue)
server --calibrate{round: rounds + 1, params}--> each worker heard from, with --calibration ccvr
worker --statistics{round, class_counts, class_means, class_covariances, samples}--> server   (signed, persistent, durable queue)
server --done--> every worker after the last round (and the calibration)

A fingerprint (learning.tasks.fingerprint: the model's tensor names, shapes and dtypes hashed, and
the class list) goes both ways: the server refuses a join whose fingerprint differs from its own,
and a worker leaves a server whose welcome carries another.

With --evaluate parties or both every live worker scores each round's global model on its own
evaluation data, at no extra model transfer where it can: the model of round r + 1 is the global
model after round r, so a model message with `score` asks the worker to score it before it trains.
Live workers that are sent no model (not sampled), the last round's model and the calibrated one
are sent the model alone:
server --evaluate{round r, params}--> worker
worker --evaluated{round r, correct, loss_sum, samples}--> server   (signed, persistent, durable queue)
Every queue is durable and every update persistent: a restarted server or broker loses nothing.

With --secure-aggregation secagg+ a worker sends no update: the model message states the attempt's
parameters and the worker's masked change travels in the protocol of roles.fedavg.secure.
With --dp, a model message's `privacy` states the mode and this round's clip; a worker whose own
settings differ refuses the round.
"""

from __future__ import annotations

import json
import re


from splitfed.config import NAME
from splitfed.roles.endpoint import queue_name
from splitfed.learning.settings import worker_ids

SERVER, WORKER = "fedavg-server", "fedavg-worker"

JOIN, WELCOME, REFUSED, MODEL, UPDATE, DONE = "join", "welcome", "refused", "model", "update", "done"
CALIBRATE, STATISTICS = "calibrate", "statistics"
EVALUATE, EVALUATED = "evaluate", "evaluated"
# Secure aggregation's stages (roles.fedavg.secure): in place of an update.
KEYS, NEIGHBOURS, SHARES, SEALED, MASKED, UNMASK, CONSENT, CONSENTS, REVEAL = (
    "secagg-keys", "secagg-neighbours", "secagg-shares", "secagg-sealed", "secagg-masked", "secagg-unmask", "secagg-consent", "secagg-consents",
    "secagg-reveal",
)
PRIVACY = "privacy"  # a model message's meta entry: {secure_aggregation, dp, clip}, which the worker checks against its own settings
RECIPE = "recipe"  # a model message's meta entry: the strategy's local recipe (learning.strategies.LocalRecipe), field by field
SCORE = "score"  # a model message's meta entry: True asks the worker to score the model (the global model after round - 1) before it trains
# A fingerprint travels in a join's header, which the codec caps at 64 KiB: its class list must
# leave room for the rest, and a name must stay short enough for a refusal to quote it.
MAX_FINGERPRINT_BYTES = 32 * 1024
MAX_CLASS_NAME = 200
FINGERPRINT_FIELDS = {"model", "tensors", "parameters", "classes"}
WORKER_ID = re.compile(NAME)  # fullmatch: a worker id becomes part of a queue name


def fingerprint_problem(fingerprint: object) -> str | None:
    """What is wrong with the form of a fingerprint (learning.tasks.fingerprint) that has its
    fields, or None; one without them is for `fingerprint_difference` to describe."""
    if not isinstance(fingerprint, dict) or set(fingerprint) != FINGERPRINT_FIELDS:
        return None
    model, classes = fingerprint["model"], fingerprint["classes"]
    if not isinstance(model, str) or len(model) > 64:
        return f"its fingerprint's model is {model!r:.80}, not a short hash"
    for name in ("tensors", "parameters"):
        value = fingerprint[name]
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            return f"its fingerprint's {name} is {value!r:.80}, not a count"
    if not isinstance(classes, list) or not all(isinstance(name, str) for name in classes):
        return "its fingerprint's classes are not a list of names"
    if (longest := max(map(len, classes), default=0)) > MAX_CLASS_NAME:
        return f"its fingerprint names a class of {longest} characters (at most {MAX_CLASS_NAME})"
    if (size := len(json.dumps(fingerprint))) > MAX_FINGERPRINT_BYTES:
        return f"its fingerprint's {len(classes)} classes take {size} bytes (at most {MAX_FINGERPRINT_BYTES})"
    return None


class CheckpointError(RuntimeError):
    """The server cannot write or use its checkpoint; the message says why and what is intact."""


def server_queue(session: str) -> str:
    return queue_name(session, SERVER)


def worker_queue(session: str, worker_id: str) -> str:
    return queue_name(session, WORKER, worker_id)


CONTROL, CONTROL_DELTA = "control/", "control-delta/"  # SCAFFOLD tensors travel beside the model's, by prefix


def with_prefix(prefix: str, state: dict) -> dict:
    return {prefix + name: value for name, value in state.items()}


def without_prefix(prefix: str, tensors: dict) -> dict:
    return {name[len(prefix):]: value for name, value in tensors.items() if name.startswith(prefix)}


def session_queues(session: str, workers: int) -> list[str]:
    return [server_queue(session), *(worker_queue(session, worker) for worker in worker_ids(workers))]

