"""Who takes part in a FedAvg run: the rules for a worker's join (its fingerprint among them),
what admitting one changes in the server's state, and which refusals are worth telling. No I/O:
the server checkpoints, welcomes and refuses."""

from __future__ import annotations

import bisect
import re
from typing import Any

from splitfed.learning.tasks import fingerprint_difference
from splitfed.protocol import Message, ProtocolError
from splitfed.roles.endpoint import Rejection
from splitfed.roles.fedavg.checkpoints import ServerState
from splitfed.roles.fedavg.common import JOIN, REFUSED, WORKER_ID, fingerprint_problem

JOIN_NONCES_KEPT = 16
NONCE = re.compile(r"[0-9a-f]{32}")


def check_join(state: ServerState, join: Message, places: int, anyone_may_join: bool, fingerprint: dict[str, Any]) -> None:
    """A join must name a worker, carry a fresh nonce, build what the server builds (its
    `fingerprint`: the same model and classes), and (`anyone_may_join`: without a key list) find
    a free place among the `places` the run was set up for."""
    worker, nonce = join.sender, join.meta.get("nonce")
    if not WORKER_ID.fullmatch(worker):
        raise ProtocolError("sender", f"worker id {worker[:80]!r} is not a valid name")
    if not isinstance(nonce, str) or not NONCE.fullmatch(nonce):
        raise ProtocolError("value", f"join from {worker} carries no valid nonce")
    if nonce in state.join_nonces.get(worker, ()):
        raise ProtocolError("replay", f"join from {worker} was seen before (nonce {nonce})")
    theirs = join.meta.get("fingerprint")
    if problem := fingerprint_problem(theirs):
        raise ProtocolError("value", f"join from {worker}: {problem}")
    if difference := fingerprint_difference(fingerprint, theirs):
        raise ProtocolError("fingerprint", f"{worker} does not build the server's model and classes: {difference} (the worker's against the server's)")
    if anyone_may_join and not state.is_member(worker) and len(state.workers) >= places:
        raise ProtocolError("full", f"{worker} cannot join: all {places} places are taken")


def admit(state: ServerState, join: Message) -> None:
    """Admit (or re-admit) the sender of a join that passed `check_join`: its nonce is kept
    (a replay is refused), a worker given up on is waited for again, and the size of its
    evaluation data is learnt afresh from its next score."""
    worker = join.sender
    state.join_nonces[worker] = [*state.join_nonces.get(worker, ()), join.meta["nonce"]][-JOIN_NONCES_KEPT:]
    if not state.is_member(worker):
        bisect.insort(state.workers, worker)  # kept sorted: a join costs log N, not N log N
    state.missed = [w for w in state.missed if w != worker]
    state.evaluation_samples.pop(worker, None)


def refusal(rejection: Rejection) -> Message | None:
    """What to tell the sender of a refused frame: only a join's, naming the join by its digest
    (the worker checks `ref`). A replayed join gets nothing, so a replay costs the server no
    message; a frame that does not name a valid worker has nobody to tell."""
    message = rejection.message
    if message is None or message.kind != JOIN or rejection.reason == "replay" or not WORKER_ID.fullmatch(message.sender):
        return None
    return Message(REFUSED, "", "", meta={"reason": rejection.reason, "detail": rejection.detail, "ref": rejection.digest})
