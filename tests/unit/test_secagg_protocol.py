"""What each side of a secure round refuses (roles.fedavg.secure): another attempt's messages, a
worker that is not at the stage it claims, malformed tensors, share indices out of range, keys the
server forwards that their owner did not sign, and parameters that would let a server unmask one
worker. The whole protocol over the broker is tested in tests/integration/test_fedavg_secagg.py."""

from __future__ import annotations

import numpy as np
import pytest

from splitfed.learning.secagg import SEALED_BYTES
from splitfed.learning.settings import FederatedSettings
from splitfed.protocol import Message, ProtocolError
from splitfed.roles.fedavg.common import KEYS, MASKED, NEIGHBOURS, REVEAL, SHARES
from splitfed.roles.fedavg.secure import RoundConfig, SecureRound, SecureTurn
from splitfed.security import keys

WORKERS = [f"worker-{i}" for i in range(5)]
SETTINGS = FederatedSettings(workers=5, partition="iid", secure_aggregation="secagg+", secagg_neighbours=2, secagg_threshold=2)


@pytest.fixture
def attempt() -> SecureRound:
    return SecureRound.start("run", 3, WORKERS, 2, 2, SETTINGS, parameters=10)


def keys_from(current: SecureRound, worker: str, **meta) -> Message:
    turn = SecureTurn.start("run", 3, current.config, worker)
    return Message(KEYS, "s", worker, round=meta.pop("round", 3), meta={"attempt": current.config.attempt, **meta}, tensors=turn.advertisement(None))


def refused(check, message: Message) -> str:
    with pytest.raises(ProtocolError) as error:
        check(message)
    return error.value.reason


def test_the_server_refuses_other_attempts_and_workers_out_of_their_stage(attempt):
    assert refused(attempt.check, keys_from(attempt, "worker-0", attempt="0" * 32)) == "stale"
    assert refused(attempt.check, keys_from(attempt, "worker-0", round=2)) == "stale"
    stranger = keys_from(attempt, "worker-0")
    stranger.sender = "worker-9"
    assert refused(attempt.check, stranger) == "sender"  # not a participant
    shares = Message(SHARES, "s", "worker-0", round=3, meta={"attempt": attempt.config.attempt})
    assert refused(attempt.check, shares) == "sender"  # shares before its keys
    masked = Message(MASKED, "s", "worker-0", round=3, meta={"attempt": attempt.config.attempt}, tensors={"masked": np.zeros(13, np.uint32)})
    assert refused(attempt.check, masked) == "sender"


def test_the_server_refuses_malformed_stages(attempt):
    message = keys_from(attempt, "worker-0")
    message.tensors["cipher"] = np.zeros(31, np.uint8)
    assert refused(attempt.check, message) == "shape"
    for worker in WORKERS:
        attempt.check(keys_from(attempt, worker))
        attempt.take(keys_from(attempt, worker))
    neighbours = attempt.graph["worker-0"]
    wrong = Message(SHARES, "s", "worker-0", round=3, meta={"attempt": attempt.config.attempt},
                    tensors={name: np.zeros(SEALED_BYTES, np.uint8) for name in [neighbours[0], "worker-0"]})
    assert refused(attempt.check, wrong) == "shape"  # a box for itself, none for a neighbour
    for worker in WORKERS:
        attempt.take(Message(SHARES, "s", worker, round=3, tensors={v: np.zeros(SEALED_BYTES, np.uint8) for v in attempt.graph[worker]}))
    for worker in WORKERS[1:]:
        attempt.take(Message(MASKED, "s", worker, round=3, tensors={"masked": np.zeros(13, np.uint32)}))
    survivor = attempt.graph["worker-0"][0]  # worker-0 dropped: its neighbours are asked for its key share, nobody for its seed
    reveal = {f"seed/{v}": np.zeros(17, np.uint8) for v in attempt.graph[survivor] if v != "worker-0"} | {"key/worker-0": np.zeros(33, np.uint8)}
    good = Message(REVEAL, "s", survivor, round=3, meta={"attempt": attempt.config.attempt}, tensors={k: v + 1 for k, v in reveal.items()})
    attempt.check(good)
    both = Message(REVEAL, "s", survivor, round=3, meta={"attempt": attempt.config.attempt}, tensors={**good.tensors, "seed/worker-0": np.ones(17, np.uint8)})
    assert refused(attempt.check, both) == "shape"  # a seed share of a dropped worker is never asked for
    out_of_range = Message(REVEAL, "s", survivor, round=3, meta={"attempt": attempt.config.attempt}, tensors={k: v + 9 for k, v in reveal.items()})
    assert refused(attempt.check, out_of_range) == "value"


def test_a_worker_takes_only_keys_their_owners_signed(tmp_path, attempt):
    key_list = keys.KeyList.load(keys.generate(tmp_path, WORKERS))
    signers = {worker: keys.load_private(tmp_path / f"{worker}.key", worker) for worker in WORKERS}
    me = "worker-0"
    turn = SecureTurn.start("run", 3, attempt.config, me)
    adverts = {v: SecureTurn.start("run", 3, attempt.config, v).advertisement(signers[v]) for v in turn.party.neighbours}
    forwarded = {f"{v}/{name}": array for v, advert in adverts.items() for name, array in advert.items()}
    good = Message(NEIGHBOURS, "s", "fedavg-server", round=3, meta={"attempt": attempt.config.attempt}, tensors=forwarded)
    turn.check(good, key_list)
    assert set(turn.shares(good)) == set(turn.party.neighbours)
    victim = turn.party.neighbours[0]
    swapped = dict(forwarded)
    swapped[f"{victim}/mask"] = SecureTurn.start("run", 3, attempt.config, victim).advertisement(None)["mask"]  # the server's own key
    assert refused(lambda m: turn.check(m, key_list), Message(NEIGHBOURS, "s", "fedavg-server", round=3, meta=good.meta, tensors=swapped)) == "signature"
    unsigned = {name: array for name, array in forwarded.items() if not name.endswith("/signature")}
    assert refused(lambda m: turn.check(m, key_list), Message(NEIGHBOURS, "s", "fedavg-server", round=3, meta=good.meta, tensors=unsigned)) == "shape"


@pytest.mark.parametrize("change, says", [
    ({"threshold": 1}, "t must be above k/2"),
    ({"neighbours": 5}, "k below the participants"),
    ({"participants": ["worker-1", "worker-2", "worker-3"]}, "naming this one"),
    ({"participants": ["worker-2", "worker-0", "worker-1"]}, "sorted list"),
    ({"clip": 2.0}, "the server encodes with clip 2.0"),
    ({"attempt": "x"}, "attempt"),
])
def test_a_worker_refuses_parameters_that_would_expose_it(change, says, attempt):
    with pytest.raises(ProtocolError, match=says):
        RoundConfig.received({**attempt.config.meta(), **change}, "worker-0", SETTINGS)
