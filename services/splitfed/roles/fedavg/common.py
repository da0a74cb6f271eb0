"""What the FedAvg roles share: queue names, message kinds, model tensors on the wire.

worker --join--> server --welcome{round}--> worker          (or --refused{reason, ref}--> worker)
server --model{round, params [, control/*], recipe{prox_mu, absent_scale, calibration_tau, frozen_head, control_variates}}--> each sampled worker
worker --update{round, params [, control-delta/*], samples, train_loss}--> server   (signed, persistent, durable queue)
server --calibrate{round: rounds + 1, params}--> each worker heard from, with --calibration ccvr
worker --statistics{round, class_counts, class_means, class_covariances, samples}--> server   (signed, persistent, durable queue)
server --done--> every worker after the last round (and the calibration)
Every queue is durable and every update persistent: a restarted server or broker loses nothing.
"""

from __future__ import annotations

import re

import numpy as np

from splitfed.config import NAME
from splitfed.roles.endpoint import queue_name, to_numpy
from splitfed.learning.settings import worker_ids

SERVER, WORKER = "fedavg-server", "fedavg-worker"

JOIN, WELCOME, REFUSED, MODEL, UPDATE, DONE = "join", "welcome", "refused", "model", "update", "done"
CALIBRATE, STATISTICS = "calibrate", "statistics"
RECIPE = "recipe"  # a model message's meta entry: the strategy's local recipe (learning.strategies.LocalRecipe), field by field
WORKER_ID = re.compile(NAME)  # fullmatch: a worker id becomes part of a queue name


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


def to_wire(state: dict) -> dict[str, np.ndarray]:
    return {name: to_numpy(value) for name, value in state.items()}
