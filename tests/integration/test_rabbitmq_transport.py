"""The RabbitMQ transport against the real broker: heartbeats, confirms, chunking, reconnects."""

import subprocess
import time

import numpy as np
import pytest

from splitfed.protocol import Message, decode, encode
from splitfed.transport import TransportError
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
