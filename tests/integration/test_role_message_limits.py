"""Every role's message-size limit over the real broker, in real runs of each family (every role
in this process, each on its own RabbitMQ connection, chunking at 16 KiB so that the limits span
many chunks): once a role has declared its last limit to its transport, the first chunk of a
message one chunk longer than that limit allows arrives on its inbox. Every role refuses it at that
first chunk (`oversized`) and counts it, and the run goes on to its end: the largest messages the
parties really exchanged, which come within a header's allowance of each limit, were accepted."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pika
import pytest

from splitfed.learning.settings import FederatedSettings, P2PSettings, SMPLSettings, SplitNNSettings
from splitfed.observability.metrics import rejected_count
from splitfed.protocol import Message, encode
from splitfed.roles.limits import FRAME_HEADER_BYTES
from splitfed.roles.p2p.common import P2P_PEER, SMPL_PEER, TRACKER
from splitfed.roles.split.common import CLIENT, FED, RELAY, SERVER
from splitfed.scenarios import fedavg, p2p, split, splitnn
from splitfed.scenarios.launch import Launch, RunSettings, run_threads
from splitfed.transport.chunks import CHUNK_COUNT, chunk_count
from splitfed.transport.chunks import split as chunks_of
from splitfed.transport.rabbitmq import RabbitTransport

CHUNK = 16 * 1024
TRANSPORT_MAX = 64 * 1024**2  # the connections' own cap, far above every role's limit here
SPARE = FRAME_HEADER_BYTES + 8 * 1024  # how far below a limit the largest real message may fall: the header allowance and the tensors' entries
# How many limits a role declares for its inbox, the last being the one it keeps: the split-server
# one before and one once it holds its model; the fed its transport's, then the server's hello's;
# the relay its transport's, then one per hello of the two halves. The others one, from the start.
DECLARATIONS = {SERVER: 2, FED: 2, RELAY: 3}


def one_chunk_too_many(session: str, limit: int) -> tuple[bytes, dict]:
    """The first chunk, and its headers, of a frame one chunk longer than a message within `limit`
    can be: the smallest message a role with that limit refuses at its first chunk."""
    size = chunk_count(limit, CHUNK) * CHUNK + 1
    padding = size
    while len(frame := encode(Message("oversized", session, "someone", seq=1, tensors={"x": np.zeros(padding, np.uint8)}))) != size:
        padding += size - len(frame)
    first, headers = next(chunks_of(frame, CHUNK))
    assert headers[CHUNK_COUNT] == chunk_count(limit, CHUNK) + 1
    return first, headers


class Parties:
    """The connections of one run's parties, as `run_threads` asks for them: each notes the limits
    its role declares for its inbox and the largest frame it sends to each queue, and once its
    role has declared its last limit, sends that inbox one message one chunk too long (its first
    chunk), on the role's next wait for a message."""

    def __init__(self, broker_url: str, session: str):
        self.broker_url, self.session = broker_url, session
        self.connections: dict[str, Declaring] = {}
        self.largest_sent: dict[str, int] = defaultdict(int)  # queue -> the largest frame any party sent it

    def connect(self, party: str) -> RabbitTransport:
        self.connections[party] = Declaring(self, party, DECLARATIONS.get(party, 1))  # these roles' parties go by their role's name
        return self.connections[party]

    def send_first_chunk_over(self, inbox: str, limit: int) -> None:
        first, headers = one_chunk_too_many(self.session, limit)
        connection = pika.BlockingConnection(pika.URLParameters(self.broker_url))
        try:
            connection.channel().basic_publish("", inbox, first, pika.BasicProperties(headers=headers))
        finally:
            connection.close()

    def run(self, launches: list[Launch]) -> dict:
        return run_threads(launches, self.connect, None, 120)

    def limit_of(self, party: str) -> int:
        """The limit the party's role kept for its inbox."""
        return self.connections[party].declared[-1][1]

    def assert_refused_and_tight(self, roles: dict[str, list[str]]) -> None:
        """For each role (its parties): one refusal at the first chunk per party, counted as
        oversized, and its inbox's largest real message within the allowance below its limit."""
        for role, parties in roles.items():
            assert rejected_count(role, self.session, "oversized") == len(parties), role
            for party in parties:
                connection = self.connections[party]
                inbox, limit = connection.declared[-1]
                assert connection.injected == limit, party
                assert limit - SPARE <= self.largest_sent[inbox] <= limit, (party, limit, self.largest_sent[inbox])


class Declaring(RabbitTransport):
    def __init__(self, parties: Parties, party: str, declarations: int):
        super().__init__(parties.broker_url, name=f"{party}-{parties.session}", chunk_size=CHUNK, max_message_bytes=TRANSPORT_MAX)
        self.parties, self.declarations = parties, declarations
        self.declared: list[tuple[str, int]] = []  # (inbox, limit), as the role declared them
        self.injected: int | None = None  # the limit the message one chunk too long was sent against

    def watch(self, queue, *, max_bytes, on_reject, admit=None):
        super().watch(queue, max_bytes=max_bytes, on_reject=on_reject, admit=admit)
        self.declared.append((queue, max_bytes))

    def publish(self, queue, body, *, persistent=False, must_exist=False):
        super().publish(queue, body, persistent=persistent, must_exist=must_exist)
        self.parties.largest_sent[queue] = max(self.parties.largest_sent[queue], len(body))

    def receive(self, queue, timeout):
        if self.injected is None and len(self.declared) == self.declarations and queue == self.declared[-1][0]:
            self.injected = self.declared[-1][1]
            assert self.injected < TRANSPORT_MAX, f"{queue}: its role declared no limit of its own"
            self.parties.send_first_chunk_over(queue, self.injected)
        return super().receive(queue, timeout)


@pytest.fixture
def parties(broker_url, session):
    return Parties(broker_url, session)


def run_settings(cls: type[RunSettings], broker_url: str, session: str, **extra) -> RunSettings:
    """A run's settings with every role a thread of this process, on `broker_url`."""
    return cls(broker=broker_url, launch="threads", session=session, timeout=60, **extra).resolved()


SPLIT = dict(dataset="digits", epochs=1, batch_size=32, eval_batch_size=64, limit=96, test_limit=64)


def test_a_split_run_through_the_relay(parties, tmp_path: Path):
    """The split-server, the split-client and the relay, which holds the larger of the two
    limits the halves' hellos state."""
    settings = SplitNNSettings(**SPLIT, mode="u-shaped")
    result = parties.run(split.plan(settings, run_settings(split.SplitRun, parties.broker_url, parties.session, via="relay"), tmp_path))
    assert result["history"][-1]["accuracy"] is not None
    parties.assert_refused_and_tight({SERVER: [SERVER], CLIENT: [CLIENT], RELAY: [RELAY]})
    assert parties.limit_of(RELAY) == max(parties.limit_of(SERVER), parties.limit_of(CLIENT))


def test_a_splitfed_run_and_its_fed(parties, tmp_path: Path):
    """Two clients of splitfed-v1: their layers go to the fed, which holds what the server's
    hello says they take."""
    settings = SplitNNSettings(**{**SPLIT, "test_limit": 128}, clients=2, schedule="splitfed-v1")  # each client scores half the test set: one full evaluation batch
    parties.run(splitnn.plan(settings, run_settings(splitnn.SplitNNRun, parties.broker_url, parties.session), tmp_path))
    parties.assert_refused_and_tight({SERVER: [SERVER], FED: [FED], CLIENT: ["split-client-0", "split-client-1"]})


def test_a_fedavg_run_with_control_variates(parties, tmp_path: Path):
    """SCAFFOLD: the workers' updates carry control deltas, the server's models control variates."""
    settings = FederatedSettings(dataset="digits", workers=1, partition="iid", rounds=1, limit=96, test_limit=64, strategy="scaffold")
    parties.run(fedavg.plan(settings, run_settings(fedavg.FedAvgRun, parties.broker_url, parties.session, checkpoint_dir=tmp_path / "checkpoints"), tmp_path))
    parties.assert_refused_and_tight({"fedavg-server": ["fedavg-server"], "fedavg-worker": ["worker-0"]})


PEERS = dict(dataset="digits", peers=2, partition="iid", limit=96, test_limit=64)


@pytest.mark.parametrize("role, settings", [
    (P2P_PEER, P2PSettings(**PEERS, epochs=1, sync_wait=30.0)),  # each waits for the other's model: both models are exchanged
    (SMPL_PEER, SMPLSettings(**PEERS, hyperepochs=1, sparsity=0.5)),  # a change larger than the model: half its entries, each with its index
], ids=[P2P_PEER, SMPL_PEER])
def test_a_decentralized_run_and_its_tracker(parties, tmp_path: Path, role, settings):
    plan = p2p.planner(role)
    result = parties.run(plan(settings, run_settings(p2p.PeerRun, parties.broker_url, parties.session), tmp_path))
    assert all(peer["history"] for peer in result["peers"].values())
    parties.assert_refused_and_tight({TRACKER: [TRACKER], role: [f"{role}-0", f"{role}-1"]})
