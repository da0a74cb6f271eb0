"""An SMPL peer takes a hyperedge's start model from its source alone (any other member could
otherwise overwrite it): the real peer's `check`, on a peer built over the in-memory transport."""

import time
import uuid

import pytest

from splitfed.learning.peers import state_of
from splitfed.learning.settings import SMPLSettings
from splitfed.protocol import Message, ProtocolError
from splitfed.roles.p2p import PeerDeployment
from splitfed.roles.p2p.common import START
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
