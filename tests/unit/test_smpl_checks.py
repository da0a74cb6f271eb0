"""An SMPL peer takes a hyperedge's start model from its source alone (any other member could
otherwise overwrite it), and a member's change sent whole only with every value: the real peer's
`check`, on a peer built over the in-memory transport."""

import time
import uuid

import numpy as np
import pytest

from splitfed.learning.hyperedge import sparsify, to_wire
from splitfed.learning.device import state_of
from splitfed.learning.settings import SMPLSettings
from splitfed.protocol import Message, ProtocolError
from splitfed.roles.p2p import PeerDeployment
from splitfed.roles.p2p.common import DELTA, START
from splitfed.roles.p2p.smpl import Edge, SMPLPeer
from splitfed.transport import MemoryBroker, MemoryTransport

SOURCE, OTHER = "smpl-peer-1", "smpl-peer-2"


@pytest.fixture(scope="module")
def peer():
    settings = SMPLSettings(dataset="digits", model="tiny", peers=3, hyperedge_size=3, limit=60, test_limit=20)
    smpl = SMPLPeer(settings, PeerDeployment(session="smpl-checks", peer_index=0), MemoryTransport(MemoryBroker()))
    smpl.membership.peers = {name: {"incarnation": uuid.uuid4().hex} for name in (SOURCE, OTHER)}  # as the tracker lists them
    smpl.edges["e1"] = Edge("e1", [SOURCE, OTHER], {SOURCE: 20, OTHER: 20}, SOURCE, time.monotonic() + 60)
    return smpl


def start_from(peer: SMPLPeer, sender: str) -> Message:
    return Message(START, "smpl-checks", sender, seq=1, meta={"edge": "e1", "incarnation": peer.membership.peers[sender]["incarnation"]},
                   tensors=state_of(peer.model))


def test_the_start_model_is_taken_from_the_hyperedges_source(peer):
    peer.check(start_from(peer, SOURCE))


def test_a_start_model_from_another_member_is_refused(peer):
    with pytest.raises(ProtocolError) as caught:
        peer.check(start_from(peer, OTHER))
    assert caught.value.reason == "sender"


def delta_from(peer: SMPLPeer, sender: str, tensors: dict) -> Message:
    return Message(DELTA, "smpl-checks", sender, seq=1, meta={"edge": "e1", "incarnation": peer.membership.peers[sender]["incarnation"]}, tensors=tensors)


def test_a_change_sent_whole_is_taken_as_it_is(peer):
    change = {name: np.full(value.shape, 0.5, value.dtype) for name, value in state_of(peer.model).items()}
    message = delta_from(peer, OTHER, to_wire(sparsify(change, 0.0)))
    assert not any(name.endswith("/indices") for name in message.tensors)  # whole: values alone
    peer.check(message)
    assert all(np.array_equal(message.tensors[name], change[name]) for name in change)


def test_a_change_sent_whole_with_too_few_values_is_refused_as_shape(peer):
    tensors = to_wire(sparsify({name: np.ones(value.shape, value.dtype) for name, value in state_of(peer.model).items()}, 0.0))
    first = next(iter(tensors))
    tensors[first] = tensors[first][:-1]
    with pytest.raises(ProtocolError) as caught:
        peer.check(delta_from(peer, OTHER, tensors))
    assert caught.value.reason == "shape" and "sent whole" in str(caught.value)


def test_with_the_mean_start_each_member_sends_one_start_model():
    """--start mean: every member sends its model once, while the hyperedge is starting; a second
    one from the same member, or one from a party not in the hyperedge, is refused as sender."""
    settings = SMPLSettings(dataset="digits", model="tiny", peers=3, hyperedge_size=3, limit=60, test_limit=20, start="mean")
    smpl = SMPLPeer(settings, PeerDeployment(session="smpl-checks", peer_index=0), MemoryTransport(MemoryBroker()))
    smpl.membership.peers = {name: {"incarnation": uuid.uuid4().hex} for name in (SOURCE, OTHER, "smpl-peer-3")}
    smpl.edges["e1"] = Edge("e1", [SOURCE, OTHER], {SOURCE: 20, OTHER: 20}, SOURCE, time.monotonic() + 60)
    smpl.check(start_from(smpl, OTHER))  # not the source, but a member: taken
    smpl.edges["e1"].starts[OTHER] = state_of(smpl.model)
    for sender in (OTHER, "smpl-peer-3"):
        with pytest.raises(ProtocolError) as caught:
            smpl.check(start_from(smpl, sender))
        assert caught.value.reason == "sender"
