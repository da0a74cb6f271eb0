"""Every role's message-size limit against the largest messages it can legitimately receive, built
here as the other parties send them (their real tensors, in the shapes the real model gives, with
a header as large as the codec takes) and measured encoded: the limit holds every one of them, and
spares no more than the allowance for each tensor's entry in the body. Over the in-memory
transport; tests/integration/test_role_message_limits.py refuses larger ones over RabbitMQ."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch

from splitfed.learning import calibration
from splitfed.learning.device import state_of
from splitfed.learning.hyperedge import sparsify, to_wire
from splitfed.learning.settings import WIRE_NUMPY_DTYPES, FederatedSettings, HyperedgeSettings, P2PSettings, SMPLSettings, SplitNNSettings
from splitfed.protocol import MAX_MESSAGE_BYTES, Message, ProtocolError, encode
from splitfed.protocol.codec import MAX_HEADER_BYTES
from splitfed.roles.deployment import Service, SigningService
from splitfed.roles.fedavg import ServerDeployment, WorkerDeployment
from splitfed.roles.fedavg.common import CONTROL, CONTROL_DELTA
from splitfed.roles.fedavg.server import FedAvgServer
from splitfed.roles.fedavg.worker import FedAvgWorker
from splitfed.roles.p2p import PeerDeployment, TrackerDeployment
from splitfed.roles.p2p.peer import P2PPeer
from splitfed.roles.p2p.smpl import SMPLPeer
from splitfed.roles.p2p.tracker import Tracker
from splitfed.roles.split import SplitClientParty, SplitParty
from splitfed.roles.split.client import SplitClient
from splitfed.roles.split.common import HELLO, shared
from splitfed.roles.split.fed import SplitFed
from splitfed.roles.split.relay import Relay
from splitfed.roles.split.server import SplitServer
from splitfed.transport import MemoryBroker, MemoryTransport
from tests.unit.test_split_tasks import own_data, settings_of  # noqa: F401 (own_data: a fixture, each client's own digits and a task)

SESSION = "limits"
ENTRY_SPARE = 256  # what the limit may spare per tensor: its entry in the body's header is allowed at its longest


def framed(tensors: dict[str, np.ndarray]) -> int:
    """Bytes of a message carrying `tensors` whose header is as large as the codec takes."""
    message = Message("any", SESSION, "a-sender", seq=1, meta={"pad": ""}, tensors=tensors)
    header = len(json.dumps(message.header(), sort_keys=True, separators=(",", ":")))
    message.meta["pad"] = "x" * (MAX_HEADER_BYTES - header)
    frame = encode(message)
    assert struct.unpack(">I", frame[4:8])[0] == MAX_HEADER_BYTES
    return len(frame)


def assert_holds(endpoint, messages: list[dict[str, np.ndarray]]) -> None:
    """The endpoint's limit holds the largest of `messages`, sparing at most the tensors' entry
    allowance, and a frame one byte over the limit is refused as oversized."""
    largest = max(framed(tensors) for tensors in messages)
    limit = endpoint.max_message_bytes
    assert largest <= limit <= largest + ENTRY_SPARE * max(len(tensors) for tensors in messages), (largest, limit)
    with pytest.raises(ProtocolError) as refused:
        endpoint.validate(b"\0" * (limit + 1), ("any",), None, None)
    assert refused.value.reason == "oversized"


def zeros(dtype: str, *shape: int) -> np.ndarray:
    return np.zeros(shape, dtype)


# -- split learning ---------------------------------------------------------------------------

SPLIT_SETTINGS = {
    "vanilla, evaluation batches larger": dict(mode="vanilla", batch_size=32, eval_batch_size=100),
    "vanilla, cut at the convolutions, label prior": dict(mode="vanilla", cut_layer="3", batch_size=16, eval_batch_size=8, label_dp=2.0, label_dp_prior="model"),
    "u-shaped, bf16 on the wire": dict(mode="u-shaped", cut_layer="3", batch_size=16, eval_batch_size=8, wire_dtype="bf16"),
    "u-shaped, splitfed-v2": dict(mode="u-shaped", batch_size=8, eval_batch_size=50, clients=2, schedule="splitfed-v2"),
    "round-robin": dict(mode="vanilla", batch_size=8, eval_batch_size=20, clients=2, schedule="round-robin"),
}


@pytest.fixture(params=SPLIT_SETTINGS.values(), ids=SPLIT_SETTINGS.keys())
def halves(request):
    """A split server and its first client (built, not run) for one of the settings above, with the
    shape of one sample at the cut and at the server half's output, as their layers compute them."""
    settings = SplitNNSettings(dataset="digits", limit=200, test_limit=100, **request.param)
    broker = MemoryBroker()
    server = SplitServer(settings, SplitParty(session=SESSION, via="direct"), MemoryTransport(broker))
    client = SplitClient(settings, SplitClientParty(session=SESSION, via="direct"), MemoryTransport(broker))
    with torch.no_grad():
        cut = client.parts.head.eval()(torch.zeros(1, *client.input_shape))
        out = server.body.eval()(cut)
    return settings, server, client, tuple(cut.shape[1:]), tuple(out.shape[1:])


def test_the_split_halves_hold_the_largest_batches_they_exchange(halves):
    settings, server, client, cut, out = halves
    wire, batch, evaluation = WIRE_NUMPY_DTYPES[settings.wire_dtype], settings.batch_size, settings.eval_batch_size
    training = {"x": zeros(wire, batch, *cut), **({"y": zeros("int64", batch)} if settings.mode == "vanilla" else {})}
    to_server = [training, {"x": zeros(wire, evaluation, *cut)}]  # a label prior's query is a training batch without labels
    to_client = [{"g": zeros(wire, batch, *cut)}, {"h": zeros(wire, evaluation, *out)}]
    if settings.mode == "u-shaped":
        to_server.append({"g": zeros(wire, batch, *out)})
        to_client.append({"h": zeros(wire, batch, *out)})
    if settings.label_dp_prior == "model":
        to_client.append({"h": zeros(wire, batch, *out)})
    if settings.clients > 1:  # the fed's average, or the hand-off of the client before
        to_client.append(client.layers())
    assert_holds(server.endpoint, to_server)
    assert_holds(client.endpoint, to_client)


def test_a_server_without_data_accepts_metadata_until_a_hello_gives_it_its_model(own_data):
    """A task that declares neither input shape nor classes, on each client's own data: the server
    builds its model from the first client's hello, accepts nothing larger than metadata before
    it, then the clients' largest batches; it names its run to the fed only then, with the bytes
    of a client's layers."""
    settings = settings_of(own_data, schedule="splitfed-v2", eval_batch_size=40)
    broker = MemoryBroker()
    server = SplitServer(settings, SplitParty(session=SESSION, via="direct"), MemoryTransport(broker))
    fed = SplitFed(settings, SigningService(session=SESSION), MemoryTransport(broker))
    assert server.body is None and server.endpoint.max_message_bytes == framed({})
    assert broker.queue(fed.endpoint.inbox).empty()  # no hello yet: the server cannot say how large a client's layers are
    client = SplitClient(settings, SplitClientParty(session=SESSION, via="direct", client_index=0), MemoryTransport(broker))
    hello = Message(HELLO, SESSION, client.name, meta={"nonce": "n", "fingerprint": client.fingerprint, "input_shape": list(client.input_shape),
                                                       "receives": client.endpoint.max_message_bytes, **shared(settings)})
    server.check(hello)
    server.take(hello)
    with torch.no_grad():
        cut = tuple(client.parts.head(torch.zeros(1, *client.input_shape)).shape[1:])
    training = {"x": zeros("float32", settings.batch_size, *cut), "y": zeros("int64", settings.batch_size)}
    assert_holds(server.endpoint, [training, {"x": zeros("float32", settings.eval_batch_size, *cut)}])
    message, delivery = fed.endpoint.receive(*fed.expecting(), fed.check, wait=5)
    fed.handle(message, delivery)
    assert_holds(fed.endpoint, [client.layers()])


def test_a_relay_takes_its_limit_from_hellos_and_refuses_one_that_states_none():
    """Without a model, the relay keeps its transport's limit until the halves' hellos say what
    they accept (tests/integration/test_role_message_limits.py runs one through it)."""
    relay = Relay(Service(session=SESSION), MemoryTransport(MemoryBroker()))
    assert relay.endpoint.max_message_bytes == MAX_MESSAGE_BYTES
    for receives in (None, True, 10, 3 * 1024**3):
        meta = {"nonce": "n"} if receives is None else {"nonce": "n", "receives": receives}
        hello = Message("hello", SESSION, "split-client", meta=meta)
        with pytest.raises(ProtocolError) as refused:
            relay.check(hello)
        assert refused.value.reason == "malformed", receives


def test_the_split_fed_holds_a_clients_layers_as_the_servers_hello_states_them():
    settings = SplitNNSettings(dataset="digits", mode="u-shaped", cut_layer="3", clients=2, schedule="splitfed-v1", limit=200, test_limit=100)
    broker = MemoryBroker()
    fed = SplitFed(settings, SigningService(session=SESSION), MemoryTransport(broker))
    assert fed.endpoint.max_message_bytes == MAX_MESSAGE_BYTES  # before the server's hello: its transport's
    SplitServer(settings, SplitParty(session=SESSION, via="direct"), MemoryTransport(broker))  # it holds its model at once, and says hello
    client = SplitClient(settings, SplitClientParty(session=SESSION, via="direct"), MemoryTransport(broker))
    message, delivery = fed.endpoint.receive(*fed.expecting(), fed.check, wait=5)
    fed.handle(message, delivery)
    assert_holds(fed.endpoint, [client.layers()])


# -- FedAvg -----------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy, calibrated", [("fedavg", False), ("scaffold", False), ("fedavg", True)])
def test_fedavg_roles_hold_models_control_variates_and_statistics(strategy, calibrated, tmp_path):
    settings = FederatedSettings(dataset="digits", workers=2, partition="iid", limit=200, test_limit=100, strategy=strategy,
                                 calibration="ccvr" if calibrated else "none")
    broker = MemoryBroker()
    server = FedAvgServer(settings, ServerDeployment(session=SESSION, checkpoint_dir=tmp_path), MemoryTransport(broker))
    worker = FedAvgWorker(settings, WorkerDeployment(session=SESSION, worker_id="worker-0", index=0), MemoryTransport(broker))
    model = state_of(worker.model)
    update = {**model, **({CONTROL_DELTA + name: array for name, array in model.items()} if strategy == "scaffold" else {})}
    to_server = [update]
    if calibrated:
        shapes = calibration.statistics_shapes(server.model, len(server.fingerprint["classes"]))
        to_server.append({name: zeros("float32", *shape) for name, shape in shapes.items()})
    assert_holds(server.endpoint, to_server)
    # The worker is not told the strategy: it holds a model with SCAFFOLD's control variates whatever the run's.
    assert_holds(worker.endpoint, [model, {**model, **{CONTROL + name: array for name, array in model.items()}}])


# -- decentralized ----------------------------------------------------------------------------


def test_a_p2p_peer_holds_a_peers_model():
    peer = P2PPeer(P2PSettings(dataset="digits", peers=2, limit=200, test_limit=100), PeerDeployment(session=SESSION), MemoryTransport(MemoryBroker()))
    assert_holds(peer.endpoint, [state_of(peer.model)])


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
def test_an_smpl_peer_holds_a_start_model_and_a_members_change(sparsity):
    """The change a member sends, sparsified as peers sparsify it: at high sparsity the start
    model is the larger, at 0.5 the change (each entry kept with its index)."""
    peer = SMPLPeer(SMPLSettings(dataset="digits", peers=2, sparsity=sparsity, limit=200, test_limit=100), PeerDeployment(session=SESSION),
                    MemoryTransport(MemoryBroker()))
    model = state_of(peer.model)
    rng = np.random.default_rng(0)
    change = to_wire(sparsify({name: rng.standard_normal(array.shape).astype(array.dtype) for name, array in model.items()}, sparsity))
    assert_holds(peer.endpoint, [model, change])


def test_the_tracker_holds_metadata_and_nothing_more():
    tracker = Tracker(HyperedgeSettings(), TrackerDeployment(session=SESSION), MemoryTransport(MemoryBroker()))
    assert_holds(tracker.endpoint, [{}])
    assert tracker.endpoint.max_message_bytes < framed({"x": zeros("uint8", 1)})
