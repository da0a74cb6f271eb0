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
from splitfed.roles.fedavg.common import CONSENT, CONSENTS, KEYS, MASKED, NEIGHBOURS, REVEAL, SEALED, SERVER, SHARES, UNMASK
from splitfed.roles.fedavg.secure import RoundConfig, SecureRound, SecureTurn
from splitfed.security import keys

WORKERS = [f"worker-{i}" for i in range(5)]
SETTINGS = FederatedSettings(workers=5, partition="iid", secure_aggregation="secagg+", secagg_neighbours=2, secagg_threshold=2)


@pytest.fixture
def attempt() -> SecureRound:
    return SecureRound.start("run", 3, WORKERS, 2, 2, SETTINGS, parameters=10, trusted=None)


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
    for worker in WORKERS[1:]:
        attempt.take(Message(CONSENT, "s", worker, round=3))
    survivor = attempt.graph["worker-0"][0]  # worker-0 dropped: its neighbours are asked for its key share, nobody for its seed
    index = {v: attempt.share_index(v, survivor) for v in attempt.graph[survivor]}
    reveal = {f"seed/{v}": np.full(17, index[v], np.uint8) for v in attempt.graph[survivor] if v != "worker-0"} | {
        "key/worker-0": np.full(33, index["worker-0"], np.uint8)}
    good = Message(REVEAL, "s", survivor, round=3, meta={"attempt": attempt.config.attempt}, tensors=reveal)
    attempt.check(good)
    both = Message(REVEAL, "s", survivor, round=3, meta=good.meta, tensors={**reveal, "seed/worker-0": np.full(17, index["worker-0"], np.uint8)})
    assert refused(attempt.check, both) == "shape"  # a seed share of a dropped worker is never asked for
    other = {name: np.concatenate([[3 - array[0]], array[1:]]).astype(np.uint8) for name, array in reveal.items()}  # the other holder's index
    assert refused(attempt.check, Message(REVEAL, "s", survivor, round=3, meta=good.meta, tensors=other)) == "value"


def test_the_server_refuses_keys_no_exchange_can_use_and_unsigned_ones_with_a_key_list(tmp_path, attempt):
    low_order = keys_from(attempt, "worker-0")
    low_order.tensors["mask"] = np.zeros(32, np.uint8)
    assert refused(attempt.check, low_order) == "value"
    key_list = keys.KeyList.load(keys.generate(tmp_path, WORKERS))
    signed = SecureRound.start("run", 3, WORKERS, 2, 2, SETTINGS, parameters=10, trusted=key_list)
    assert refused(signed.check, keys_from(signed, "worker-0")) == "shape"  # no signature
    turn = SecureTurn.start("run", 3, signed.config, "worker-0")
    forged = Message(KEYS, "s", "worker-0", round=3, meta={"attempt": signed.config.attempt},
                     tensors=turn.advertisement(keys.load_private(tmp_path / "worker-1.key", "worker-1")))
    assert refused(signed.check, forged) == "signature"
    genuine = Message(KEYS, "s", "worker-0", round=3, meta=forged.meta, tensors=turn.advertisement(keys.load_private(tmp_path / "worker-0.key", "worker-0")))
    signed.check(genuine)


def consenting_round(tmp_path):
    """A round whose five workers all advertised, shared and sent an input: each one's turn, signer
    and the server's attempt, up to the unmask request."""
    key_list = keys.KeyList.load(keys.generate(tmp_path, WORKERS))
    signers = {worker: keys.load_private(tmp_path / f"{worker}.key", worker) for worker in WORKERS}
    server = SecureRound.start("run", 3, WORKERS, 2, 2, SETTINGS, parameters=4, trusted=key_list)
    turns = {worker: SecureTurn.start("run", 3, server.config, worker) for worker in WORKERS}
    meta = {"attempt": server.config.attempt}
    for worker, turn in turns.items():
        server.take(Message(KEYS, "s", worker, round=3, meta=meta, tensors=turn.advertisement(signers[worker])))
    for worker, turn in turns.items():
        message = Message(NEIGHBOURS, "s", SERVER, round=3, meta=meta, tensors=server.neighbour_keys(worker))
        turn.check(message, key_list)
        turn.answered.add(NEIGHBOURS)
        server.take(Message(SHARES, "s", worker, round=3, meta=meta, tensors=turn.shares(message)))
    for worker, turn in turns.items():
        turn.input = np.zeros(4 + 3, np.uint32)
        message = Message(SEALED, "s", SERVER, round=3, meta=meta, tensors=server.sealed_for(worker))
        turn.check(message, key_list)
        turn.answered.add(SEALED)
        server.take(Message(MASKED, "s", worker, round=3, meta=meta, tensors=turn.masked(message)))
    return key_list, signers, server, turns


def test_a_worker_reveals_only_after_t_survivors_signed_the_lists_it_was_sent(tmp_path):
    key_list, signers, server, turns = consenting_round(tmp_path)
    meta = {"attempt": server.config.attempt}
    victim = "worker-0"
    neighbour = server.graph[victim][0]
    # The server tells the victim's neighbour it dropped (for its key share) and the others it survived (for its seed's).
    lied = Message(UNMASK, "s", SERVER, round=3, meta={**meta, "survivors": [w for w in WORKERS if w != victim], "dropped": [victim]})
    honest = Message(UNMASK, "s", SERVER, round=3, meta={**meta, "survivors": WORKERS, "dropped": []})
    for worker, turn in turns.items():
        request = lied if worker == neighbour else honest
        turn.check(request, key_list)
        turn.answered.add(UNMASK)
        server.consents[worker] = turn.consent(request, signers[worker])["signature"]
    forwarded = Message(CONSENTS, "s", SERVER, round=3, meta=meta, tensors={w: sig for w, sig in server.consents.items() if w != victim})
    with pytest.raises(ProtocolError, match="fewer than 2 consents") as error:
        turns[neighbour].check(forwarded, key_list)
    assert error.value.reason == "signature"
    others_only = Message(CONSENTS, "s", SERVER, round=3, meta=meta, tensors={neighbour: server.consents[neighbour]})
    assert refused(lambda m: turns[neighbour].check(m, key_list), others_only) == "value"  # fewer than t consented to its lists
    agreeing = {w: server.consents[w] for w in WORKERS if w != neighbour}
    turns["worker-2"].check(Message(CONSENTS, "s", SERVER, round=3, meta=meta, tensors=agreeing), key_list)  # the others' lists agree


def test_a_worker_answers_each_request_once_and_in_order(tmp_path):
    key_list, signers, server, turns = consenting_round(tmp_path)
    meta = {"attempt": server.config.attempt}
    turn = turns["worker-1"]
    again = Message(SEALED, "s", SERVER, round=3, meta=meta, tensors=server.sealed_for("worker-1"))
    assert refused(lambda m: turn.check(m, key_list), again) == "duplicate"
    early = Message(CONSENTS, "s", SERVER, round=3, meta=meta, tensors={})
    assert refused(lambda m: turn.check(m, key_list), early) == "out-of-order"
    leaves_out = Message(UNMASK, "s", SERVER, round=3, meta={**meta, "survivors": ["worker-1"], "dropped": []})
    assert refused(lambda m: turn.check(m, key_list), leaves_out) == "value"  # its neighbours shared with it: where did they go?


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
        RoundConfig.received({**attempt.config.meta(), **change}, "worker-0", SETTINGS, None)


def test_a_worker_refuses_a_round_whose_participants_are_not_all_workers(tmp_path, attempt):
    key_list = keys.KeyList.load(keys.generate(tmp_path, [*WORKERS, "split-client"]))
    for stranger in ("fedavg-server", "split-client"):
        participants = sorted(["worker-0", stranger])
        with pytest.raises(ProtocolError, match="does not allow as a worker"):
            RoundConfig.received({**attempt.config.meta(), "participants": participants, "neighbours": 1, "threshold": 1}, "worker-0", SETTINGS, key_list)
