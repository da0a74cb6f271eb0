"""The RabbitMQ transport against the real broker: heartbeats, confirms, chunking, reconnects."""

import json
import logging
import struct
import subprocess
import time

import numpy as np
import pika
import pytest

from splitfed.observability.metrics import rejected_count
from splitfed.protocol import Message, decode, encode
from splitfed.protocol.codec import MAGIC
from splitfed.roles.endpoint import Endpoint
from splitfed.transport import TransportError
from splitfed.transport.chunks import CHUNK_COUNT, CHUNK_ID, CHUNK_INDEX
from splitfed.transport.rabbitmq import RabbitTransport


def test_publish_receive_ack_round_trip(broker_url, session):
    queue = f"splitfed.{session}.inbox"
    with RabbitTransport(broker_url, name="a") as sender, RabbitTransport(broker_url, name="b") as receiver:
        receiver.declare(queue)
        for i in range(20):
            sender.publish(queue, f"m{i}".encode())
        got = []
        for _ in range(20):
            delivery = receiver.receive(queue, timeout=10)
            got.append(delivery.body.decode())
            receiver.ack(delivery)
        assert got == [f"m{i}" for i in range(20)]
        assert receiver.receive(queue, timeout=0.2) is None
        receiver.delete(queue)


def test_unacked_message_comes_back_to_the_next_consumer(broker_url, session):
    queue = f"splitfed.{session}.inbox"
    with RabbitTransport(broker_url, name="sender") as sender:
        sender.declare(queue)
        sender.publish(queue, b"must not be lost")
        first = RabbitTransport(broker_url, name="dies-before-ack")
        assert first.receive(queue, timeout=10).body == b"must not be lost"
        first.close()  # no ack: the work was not done
        with RabbitTransport(broker_url, name="second") as second:
            delivery = second.receive(queue, timeout=10)
            assert delivery is not None and delivery.body == b"must not be lost"
            second.ack(delivery)
        sender.delete(queue)


def test_publish_to_a_missing_queue_is_an_error_not_a_silent_loss(broker_url, session):
    with RabbitTransport(broker_url) as transport, pytest.raises(TransportError, match="does not exist"):
        transport.publish(f"splitfed.{session}.nobody", b"x")


@pytest.fixture
def full_queue(broker_url, session):
    """A queue that holds one message and nacks every publish beyond it (reject-publish), as a
    quorum queue without a leader nacks: made with plain pika, since splitfed declares no such queue."""
    queue = f"splitfed.{session}.full"
    connection = pika.BlockingConnection(pika.URLParameters(broker_url))
    channel = connection.channel()
    channel.queue_declare(queue, arguments={"x-max-length": 1, "x-overflow": "reject-publish"})
    channel.basic_publish("", queue, b"fills it")
    try:
        yield queue, channel
    finally:
        channel.queue_delete(queue)
        connection.close()


class RoomAfterTheFirstNack(logging.Handler):
    """Purges the full queue, from a connection of its own, when the transport logs its first nack:
    the publish is refused at least once whatever the machine's load, then taken."""

    def __init__(self, broker_url: str, queue: str):
        super().__init__()
        self.broker_url, self.queue, self.nacks = broker_url, queue, 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("broker nacked a message"):
            self.nacks += 1
            if self.nacks == 1:
                with pika.BlockingConnection(pika.URLParameters(self.broker_url)) as connection:
                    connection.channel().queue_purge(self.queue)


def test_a_nacked_publish_is_sent_again_once_the_broker_takes_it(broker_url, full_queue):
    queue, channel = full_queue
    room = RoomAfterTheFirstNack(broker_url, queue)
    transport_log = logging.getLogger("splitfed.transport.rabbitmq")
    transport_log.addHandler(room)
    try:
        with RabbitTransport(broker_url, name="nacked") as transport:
            transport.publish(queue, b"taken on a later try")
    finally:
        transport_log.removeHandler(room)
    assert room.nacks == 1  # refused once, taken on the next try
    assert channel.basic_get(queue, auto_ack=True)[2] == b"taken on a later try"


def test_a_publish_the_broker_keeps_nacking_is_an_error_not_a_silent_loss(broker_url, full_queue):
    queue, channel = full_queue
    with RabbitTransport(broker_url, name="nacked", nack_patience=1.0) as transport, pytest.raises(TransportError, match="broker refused a message .* for 1 s"):
        transport.publish(queue, b"never taken")
    assert channel.basic_get(queue, auto_ack=True)[2] == b"fills it"


def test_heartbeats_survive_a_long_busy_step(broker_url, session):
    """2 s heartbeat, 10 s of pure-Python work on the caller's thread: the I/O thread keeps the
    connection alive, so the same connection (generation 1) still publishes and receives."""
    queue = f"splitfed.{session}.busy"
    with RabbitTransport(broker_url, heartbeat=2, name="busy") as transport:
        transport.declare(queue)
        deadline = time.monotonic() + 10
        spins = 0
        while time.monotonic() < deadline:  # a CPU-bound step holding the GIL as much as Python lets it
            spins += sum(range(1000))
        transport.publish(queue, b"after the busy step")
        delivery = transport.receive(queue, timeout=10)
        assert delivery.body == b"after the busy step"
        transport.ack(delivery)
        assert transport.generation == 1, "the connection was dropped and re-made during the busy step"
        transport.delete(queue)


def test_300_mib_tensor_travels_in_chunks_below_the_broker_limit(broker_url, session):
    queue = f"splitfed.{session}.big"
    tensor = np.random.default_rng(0).standard_normal(300 * 1024**2 // 4).astype(np.float32)  # 300 MiB
    frame = encode(Message("update", session, "w", seq=1, tensors={"w": tensor}))
    assert len(frame) > 128 * 1024**2  # above RabbitMQ's default max_message_size
    with RabbitTransport(broker_url, chunk_size=32 * 1024**2, name="big-sender") as sender, RabbitTransport(
        broker_url, chunk_size=32 * 1024**2, name="big-receiver"
    ) as receiver:
        receiver.declare(queue)
        sender.publish(queue, frame)
        delivery = receiver.receive(queue, timeout=120)
        receiver.ack(delivery)
        assert np.array_equal(decode(delivery.body).tensors["w"], tensor)
        receiver.delete(queue)


def test_reconnects_after_the_broker_closes_the_connection(broker_url, session):
    queue = f"splitfed.{session}.reconnect"
    name = f"reconnect-{session}"
    with RabbitTransport(broker_url, name=name) as transport:
        transport.declare(queue)
        closed = subprocess.run(["rabbitmqctl", "close_connection", _connection_pid(name), "test closes it"], capture_output=True, text=True)
        assert closed.returncode == 0, closed.stderr
        transport.publish(queue, b"after reconnect")  # retried on the new connection
        delivery = transport.receive(queue, timeout=20)
        assert delivery.body == b"after reconnect"
        transport.ack(delivery)
        assert transport.generation >= 2
        transport.delete(queue)


def _connection_pid(name: str) -> str:
    listing = subprocess.run(["rabbitmqctl", "list_connections", "pid", "client_properties", "--no-table-headers"], capture_output=True, text=True, check=True)
    for line in listing.stdout.splitlines():
        if name in line:
            return line.split()[0]
    raise AssertionError(f"connection {name} not listed:\n{listing.stdout}")


# -- chunk reassembly, fed raw chunks straight through the broker ------------------------------
# A chunked message is reassembled by its chunk index, whatever order the chunks arrive in. A chunk
# that repeats an index already held (a duplicate or a conflicting copy) or disagrees on the count
# is refused (acked, reported as malformed) and the chunks held first are kept; a chunk with bad
# headers is refused on its own; chunks adding up to more than max_message_bytes are refused
# together (oversized). Nothing refused is redelivered: the queue is empty afterwards.

CHUNK_RECEIVER = {"chunk_size": 16, "max_message_bytes": 256}  # at most 16 chunks per message


class ChunkBench:
    """A queue, a raw pika publisher for hand-made chunks, and a receiving RabbitTransport
    whose refusals are recorded."""

    def __init__(self, broker_url: str, session: str):
        self.queue = f"splitfed.{session}.chunks"
        self.rejections: list[tuple[str, str]] = []
        self.receiver = RabbitTransport(broker_url, name=f"chunk-receiver-{session}", on_reject=lambda *r: self.rejections.append(r), **CHUNK_RECEIVER)
        self.receiver.declare(self.queue)
        self.connection = pika.BlockingConnection(pika.URLParameters(broker_url))
        self.channel = self.connection.channel()

    def send(self, body: bytes, headers: dict | None = None) -> None:
        self.channel.basic_publish("", self.queue, body, pika.BasicProperties(headers=headers))

    def send_chunks(self, chunk_id: str, pieces: list[bytes], order: list[int], count: int | None = None) -> None:
        for index in order:
            self.send(pieces[index], {CHUNK_ID: chunk_id, CHUNK_INDEX: index, CHUNK_COUNT: count or len(pieces)})

    def receive_acked(self, timeout: float = 10) -> bytes:
        delivery = self.receiver.receive(self.queue, timeout)
        assert delivery is not None, "nothing was delivered"
        self.receiver.ack(delivery)
        return delivery.body

    def wait_for_rejections(self, count: int) -> list[str]:
        deadline = time.monotonic() + 10
        while len(self.rejections) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        return [reason for reason, _ in self.rejections]

    def close_and_count_left(self) -> int:
        """Close the receiver (anything it did not ack goes back) and count what the queue holds."""
        self.receiver.close()
        left = self.channel.queue_declare(self.queue, passive=True).method.message_count
        self.channel.queue_delete(self.queue)
        self.connection.close()
        return left


@pytest.fixture
def bench(broker_url, session):
    bench = ChunkBench(broker_url, session)
    yield bench
    if bench.connection.is_open:  # the test failed before closing it
        bench.receiver.close()
        bench.channel.queue_delete(bench.queue)
        bench.connection.close()


def pieces_of(payload: bytes, size: int = 16) -> list[bytes]:
    return [payload[start : start + size] for start in range(0, len(payload), size)]


def update_frame(session: str, seed: int) -> bytes:
    weights = np.random.default_rng(seed).standard_normal(12).astype(np.float32)
    return encode(Message("update", session, f"worker-{seed}", seq=seed, round=1, meta={"samples": 7}, tensors={"w": weights}))


def test_chunks_arriving_out_of_order_are_joined_by_index(bench, session):
    first, second = update_frame(session, 1), update_frame(session, 2)
    a, b = pieces_of(first), pieces_of(second)
    assert len(a) >= 8 and len(b) >= 8 and len(a) <= 16 and len(b) <= 16
    order_a = list(range(len(a)))[::-1]  # last chunk first
    order_b = [*range(1, len(b), 2), *range(0, len(b), 2)]  # odd indices, then even ones
    # Interleaved: every second chunk belongs to the other message; b's last chunk comes last.
    for index in range(max(len(a), len(b))):
        if index < len(a):
            bench.send_chunks("message-a", a, [order_a[index]])
        if index < len(b):
            bench.send_chunks("message-b", b, [order_b[index]])
    assert bench.receive_acked() == first
    assert bench.receive_acked() == second
    assert np.array_equal(decode(second).tensors["w"], np.random.default_rng(2).standard_normal(12).astype(np.float32))
    assert bench.rejections == []
    assert bench.close_and_count_left() == 0


def test_a_duplicate_chunk_is_refused_and_the_message_arrives_once(bench, session):
    payload = update_frame(session, 3)
    pieces = pieces_of(payload)
    bench.send_chunks("dup", pieces, [2, 0, 2, 1, *range(3, len(pieces))])  # chunk 2 twice, the second copy before the rest
    assert bench.receive_acked() == payload
    assert bench.wait_for_rejections(1) == ["malformed"] and "conflicts" in bench.rejections[0][1]
    assert bench.receiver.receive(bench.queue, 0.5) is None  # delivered once
    assert bench.close_and_count_left() == 0


def test_a_conflicting_chunk_is_refused_and_the_first_copy_kept(bench, session):
    payload = update_frame(session, 4)
    pieces = pieces_of(payload)
    other = bytes(byte ^ 0xFF for byte in pieces[1])  # same id, same index, different bytes
    bench.send_chunks("conflict", pieces, [0, 1])
    bench.send(other, {CHUNK_ID: "conflict", CHUNK_INDEX: 1, CHUNK_COUNT: len(pieces)})
    bench.send(pieces[2], {CHUNK_ID: "conflict", CHUNK_INDEX: 2, CHUNK_COUNT: len(pieces) + 1})  # same id, another count
    bench.send_chunks("conflict", pieces, list(range(2, len(pieces))))
    assert bench.receive_acked() == payload
    assert bench.wait_for_rejections(2) == ["malformed", "malformed"]
    assert bench.receiver.receive(bench.queue, 0.5) is None
    assert bench.close_and_count_left() == 0


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        pytest.param({CHUNK_ID: "x", CHUNK_INDEX: "0", CHUNK_COUNT: 2}, "malformed", id="index-not-a-number"),
        pytest.param({CHUNK_ID: "x", CHUNK_INDEX: -1, CHUNK_COUNT: 2}, "malformed", id="negative-index"),
        pytest.param({CHUNK_ID: "x", CHUNK_INDEX: 2, CHUNK_COUNT: 2}, "malformed", id="index-past-count"),
        pytest.param({CHUNK_ID: "x", CHUNK_INDEX: 0, CHUNK_COUNT: 0}, "malformed", id="zero-count"),
        pytest.param({CHUNK_ID: "x", CHUNK_COUNT: 2}, "malformed", id="no-index"),
        pytest.param({CHUNK_ID: 12345, CHUNK_INDEX: 0, CHUNK_COUNT: 2}, "malformed", id="id-not-a-string"),
        pytest.param({CHUNK_ID: "x", CHUNK_INDEX: 0, CHUNK_COUNT: 17}, "oversized", id="more-chunks-than-the-limit"),
    ],
)
def test_a_chunk_with_bad_headers_is_refused_and_the_transport_goes_on(bench, headers, reason):
    bench.send(b"0123456789abcdef", headers)
    bench.send(b"the next message")
    assert bench.receive_acked() == b"the next message"
    assert bench.wait_for_rejections(1) == [reason]
    assert bench.close_and_count_left() == 0


def test_chunks_adding_up_past_the_limit_are_refused_together(bench):
    big = [bytes([index]) * 100 for index in range(3)]  # 300 bytes in 3 chunks > max_message_bytes 256
    bench.send_chunks("big", big, [0, 1, 2])
    bench.send(b"the next message")
    assert bench.receive_acked() == b"the next message"
    assert bench.wait_for_rejections(1) == ["oversized"]
    assert bench.close_and_count_left() == 0


def test_a_huge_float_in_the_header_is_refused_not_a_crash(broker_url, session):
    """1e400 is valid JSON but no float holds it (json reads it as inf): refused as nonfinite in
    the metadata, as malformed where an integer field is expected; the next frame still arrives."""
    inbox = f"splitfed.{session}.fedavg-server"
    valid = Message("update", session, "worker-0", seq=1, round=1, meta={"samples": 3, "train_loss": 0.25})
    header = json.dumps(valid.header(), sort_keys=True).encode()
    frames = {
        "nonfinite": header.replace(b'"train_loss": 0.25', b'"train_loss": 1e400'),
        "malformed": header.replace(b'"round": 1', b'"round": 1e400'),
    }
    assert all(frame != header for frame in frames.values())
    with RabbitTransport(broker_url, name=f"huge-float-{session}") as transport:
        endpoint = Endpoint(transport, session=session, role="fedavg-server", inbox=inbox, ordered=False)
        try:
            for raw in frames.values():
                transport.publish(inbox, MAGIC + struct.pack(">I", len(raw)) + raw)
            transport.publish(inbox, encode(valid))
            message, delivery = endpoint.receive(("update",), None, wait=10)
            endpoint.ack(delivery)
            assert (message.round, message.meta) == (1, {"samples": 3, "train_loss": 0.25})
            for reason in frames:
                assert rejected_count("fedavg-server", session, reason) == 1, reason
        finally:
            transport.delete(inbox)


def test_a_watched_queue_refuses_an_oversized_message_at_its_first_chunk(bench):
    """A queue whose role expects at most 64 bytes: a message announcing 10 chunks of 16 is
    refused at the first chunk it sends, before anything is kept, and counted by that queue's hook."""
    counted = []
    bench.receiver.watch(bench.queue, max_bytes=64, on_reject=lambda reason, detail: counted.append(reason))
    bench.send_chunks("too-big", [b"x" * 16] * 10, [0])
    bench.send(b"the next message")
    assert bench.receive_acked() == b"the next message"
    deadline = time.monotonic() + 10
    while not counted and time.monotonic() < deadline:
        time.sleep(0.02)
    assert counted == ["oversized"] and bench.rejections == []  # the queue's hook, not the transport's
    assert bench.close_and_count_left() == 0


def test_partials_expire_and_a_flood_of_them_evicts_no_genuine_message(broker_url, session):
    """A genuine two-chunk message has sent its first chunk when 100 bogus chunk ids arrive, each
    the first of two: the transport keeps at most 64 partial messages per queue, so it refuses
    the newcomers (`partials`) instead of evicting anything, the genuine message completes when
    its second chunk arrives, and the bogus partials still held expire after the TTL (`expired`),
    their prefetch slots freed. The receiver's prefetch window (16 messages beside the chunks it
    sets aside for partials) is narrower than the flood, which cannot stall it: partials reserve
    the chunks they announce, and a newcomer that would not fit is refused."""
    bench = ChunkBench.__new__(ChunkBench)
    bench.queue, bench.rejections = f"splitfed.{session}.chunks", []
    bench.receiver = RabbitTransport(broker_url, name=f"flooded-{session}", on_reject=lambda *r: bench.rejections.append(r), partial_ttl=2.0, prefetch=16, **CHUNK_RECEIVER)
    bench.receiver.declare(bench.queue)
    bench.connection = pika.BlockingConnection(pika.URLParameters(broker_url))
    bench.channel = bench.connection.channel()
    try:
        genuine = pieces_of(b"g" * 32)
        bench.send_chunks("genuine", genuine, [0])
        for flood in range(100):
            bench.send_chunks(f"bogus-{flood}", [b"b" * 16, b"b" * 16], [0])
        bench.send_chunks("genuine", genuine, [1])
        assert bench.receive_acked() == b"g" * 32
        reasons = bench.wait_for_rejections(100)
        # 32 chunks are set aside for partials (two 256-byte messages): the genuine one reserved 2, 15 bogus ones the other 30
        assert reasons.count("partials") == 100 - 15 and reasons.count("expired") == 15
        assert bench.close_and_count_left() == 0
    finally:
        if bench.connection.is_open:
            bench.receiver.close()
            bench.channel.queue_delete(bench.queue)
            bench.connection.close()


def test_an_endpoint_counts_refused_chunks_by_reason(broker_url, session):
    inbox = f"splitfed.{session}.split-server"
    with RabbitTransport(broker_url, name=f"endpoint-{session}", chunk_size=16, max_message_bytes=256, partial_ttl=1.0) as transport:
        Endpoint(transport, session=session, role="split-server", inbox=inbox, timeout=5, max_message_bytes=64)
        connection = pika.BlockingConnection(pika.URLParameters(broker_url))
        try:
            channel = connection.channel()
            for chunk_id, count in (("abandoned", 2), ("announced-too-big", 10)):
                channel.basic_publish("", inbox, b"x" * 16, pika.BasicProperties(headers={CHUNK_ID: chunk_id, CHUNK_INDEX: 0, CHUNK_COUNT: count}))
            assert transport.receive(inbox, timeout=3) is None  # neither is ever delivered
            deadline = time.monotonic() + 10
            while rejected_count("split-server", session, "expired") < 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert rejected_count("split-server", session, "expired") == 1
            assert rejected_count("split-server", session, "oversized") == 1
            channel.queue_delete(inbox)
        finally:
            connection.close()


# -- with a key list, a chunked message is judged by its signed first chunk ------------------


def resident_bytes() -> int:
    """This process's resident set, as the kernel counts it."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


class KeyedInbox:
    """A split-server's Endpoint with a key list, over a transport chunking at 64 KiB, and a raw
    pika publisher for what an attacker with guest access can put on its queue."""

    CHUNK = 64 * 1024

    def __init__(self, broker_url: str, session: str, keys_dir):
        from splitfed.security import keys

        key_list = keys.generate(keys_dir, ["split-client", "split-server"])
        self.client = keys.load_private(keys_dir / "split-client.key", "split-client")
        self.session, self.inbox = session, f"splitfed.{session}.split-server"
        self.transport = RabbitTransport(broker_url, name=f"keyed-{session}", chunk_size=self.CHUNK, max_message_bytes=16 * 1024**2, partial_ttl=5.0)
        self.endpoint = Endpoint(
            self.transport, session=session, role="split-server", inbox=self.inbox, timeout=30, max_message_bytes=16 * 1024**2,
            trusted=keys.KeyList.load(key_list), peer_roles=("split-client",),
        )
        self.connection = pika.BlockingConnection(pika.URLParameters(broker_url))
        self.channel = self.connection.channel()

    def signed_frame(self, seq: int, megabytes: int, signer=None) -> bytes:
        from splitfed.protocol import encode_body, signed_bytes

        tensors = {"x": np.full((megabytes * 1024**2 // 4,), seq, np.float32)}
        message = Message("activations", self.session, "split-client", seq=seq, meta={"train": True}, tensors=tensors)
        body = encode_body(tensors)
        message.sig = (signer or self.client).sign(signed_bytes(message, body))
        return encode(message, body)

    def publish_chunks(self, frame: bytes, chunk_id: str, indices=None) -> None:
        pieces = [frame[start : start + self.CHUNK] for start in range(0, len(frame), self.CHUNK)]
        for index in range(len(pieces)) if indices is None else indices:
            headers = {CHUNK_ID: chunk_id, CHUNK_INDEX: index, CHUNK_COUNT: len(pieces)}
            self.channel.basic_publish("", self.inbox, pieces[index], pika.BasicProperties(headers=headers))

    def close(self) -> None:
        self.channel.queue_delete(self.inbox)
        self.connection.close()
        self.transport.close()


@pytest.fixture
def keyed(broker_url, session, tmp_path):
    inbox = KeyedInbox(broker_url, session, tmp_path / "keys")
    yield inbox
    inbox.close()


def test_with_a_key_list_forged_first_chunks_are_refused_before_anything_is_kept(keyed):
    """An attacker without a key floods the queue with 160 MiB of first chunks, each announcing a
    message of 16 MiB: garbage, a well-formed header signed by a stranger, and a genuine frame's
    later chunks with no first one. Each is refused as it arrives (the transport keeps nothing
    unauthenticated); the process's resident memory grows by at most the prefetch window (33 MiB
    of chunks in flight), not by what was sent; and the genuine 2 MiB message behind the flood
    arrives whole."""
    from splitfed.security import keys

    stranger = keys.Signer("split-client", keys.Ed25519PrivateKey.generate())
    forged = keyed.signed_frame(1, 1, signer=stranger)[: keyed.CHUNK]
    garbage = b"\x00" * keyed.CHUNK
    before = resident_bytes()
    for flood in range(2560):  # 160 MiB of first chunks
        body = garbage if flood % 2 else forged
        keyed.channel.basic_publish("", keyed.inbox, body, pika.BasicProperties(headers={CHUNK_ID: f"flood-{flood}", CHUNK_INDEX: 0, CHUNK_COUNT: 256}))
    genuine = keyed.signed_frame(1, 2)
    keyed.publish_chunks(genuine, "orphan", indices=[1, 2])  # no first chunk: nothing vouches for them
    keyed.publish_chunks(genuine, "genuine")
    message, delivery = keyed.endpoint.receive(("activations",), ("split-client",), wait=60)
    keyed.endpoint.ack(delivery)
    grown = resident_bytes() - before
    assert message.seq == 1 and message.tensors["x"].nbytes == 2 * 1024**2
    session = keyed.session
    assert rejected_count("split-server", session, "malformed") == 1280 + 2  # garbage, and the two orphans
    assert rejected_count("split-server", session, "signature") == 1280
    assert rejected_count("split-server", session, "partials") == 0 and rejected_count("split-server", session, "expired") == 0
    assert grown < 48 * 1024**2, f"resident memory grew by {grown / 1024**2:.0f} MiB under a 160 MiB flood"


def test_a_listed_sender_holds_at_most_a_few_partial_messages(keyed):
    """A listed client (its key stolen, say) opens six messages it never finishes: four are held,
    the rest refused (`partials`); once the four expire, its next complete message gets through."""
    for seq in range(1, 7):
        keyed.publish_chunks(keyed.signed_frame(seq, 1), f"unfinished-{seq}", indices=[0])
    assert keyed.endpoint.receive(("activations",), ("split-client",), wait=2) is None
    assert rejected_count("split-server", keyed.session, "partials") == 2
    deadline = time.monotonic() + 30
    while rejected_count("split-server", keyed.session, "expired") < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert rejected_count("split-server", keyed.session, "expired") == 4
    keyed.publish_chunks(keyed.signed_frame(1, 1), "finished")
    message, delivery = keyed.endpoint.receive(("activations",), ("split-client",), wait=30)
    keyed.endpoint.ack(delivery)
    assert message.seq == 1
