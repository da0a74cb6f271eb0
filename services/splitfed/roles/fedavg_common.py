"""What the FedAvg roles share: settings, queue names, message kinds, model tensors on the wire.

worker --join--> server --welcome{round}--> worker          (or --refused{reason, ref}--> worker)
server --model{round, params, prox_mu}--> each active worker
worker --update{round, params, samples, train_loss}--> server   (signed, persistent, durable queue)
server --done--> every worker after the last round
Every queue is durable and every update persistent: a restarted server or broker loses nothing.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import numpy as np

from splitfed.learning.settings import TrainSettings
from splitfed.roles.endpoint import queue_name, to_numpy

SERVER, WORKER = "fedavg-server", "fedavg-worker"
JOIN, WELCOME, REFUSED, MODEL, UPDATE, DONE = "join", "welcome", "refused", "model", "update", "done"
WORKER_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@dataclass
class FedAvgSettings(TrainSettings):
    session: str = "local"
    workers: int = 3
    partition: str = "classes:0-3,4-6,7-9"
    rounds: int = 10
    local_epochs: int = 1
    strategy: str = "fedavg"
    prox_mu: float = 0.01
    trim: float = 0.2
    byzantine: int = 1
    min_workers: int | None = None  # None: every worker
    round_timeout: float = 120.0
    timeout: float = 600.0

    @property
    def quorum(self) -> int:
        return self.min_workers or self.workers


def server_queue(session: str) -> str:
    return queue_name(session, SERVER)


def worker_queue(session: str, worker_id: str) -> str:
    return queue_name(session, WORKER, worker_id)


def frame_digest(frame: bytes) -> str:
    """Names one frame, so a refusal can say which join it answers."""
    return hashlib.sha256(frame).hexdigest()


def to_wire(state: dict) -> dict[str, np.ndarray]:
    return {name: to_numpy(value) for name, value in state.items()}
