"""A RabbitMQ cluster of three nodes of the test's own, quorum queues and several broker
addresses: persistent messages survive the SIGKILL of their queue's leader, and a client whose
node is killed carries on through another node. Plus the checks on broker lists."""

from __future__ import annotations

import shutil
import time

import pytest

from splitfed.transport import AmqpBroker, Connection, TransportError
from splitfed.transport.broker import NotAmqp
from splitfed.transport.rabbitmq import RabbitTransport, TLSOptions
from tests.own_broker import BrokerCluster, OwnBroker, make_tls_files
from tests.ports import free_port

N = 200  # messages per test, each carrying its number


@pytest.fixture
def cluster(tmp_path):
    with BrokerCluster(tmp_path / "cluster") as cluster:
        yield cluster


def quorum_transport(broker: str, name: str) -> RabbitTransport:
    return RabbitTransport(broker, queue_type="quorum", name=name, operation_timeout=60)


def publish_range(transport: RabbitTransport, queue: str, numbers: range) -> None:
    for number in numbers:
        transport.publish(queue, str(number).encode(), persistent=True)


def receive_until(transport: RabbitTransport, queue: str, seen: set[int], wanted: set[int], timeout: float = 60) -> None:
    """Receive and ack into `seen` until it holds `wanted` (duplicates allowed: at least once)."""
    deadline = time.monotonic() + timeout
    while not wanted <= seen:
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(wanted - seen)} messages never arrived, e.g. {sorted(wanted - seen)[:10]}")
        delivery = transport.receive(queue, timeout=1)
        if delivery is not None:
            seen.add(int(delivery.body))
            transport.ack(delivery)


def test_persistent_messages_survive_their_quorum_leader_being_killed(cluster, session):
    """The queue is led by node 0, where the publisher is connected; the consumer is on node 1.
    Half the messages are out and a quarter consumed when node 0 is SIGKILLed: the publisher
    reconnects to another node and sends the other half, the consumer goes on without a break,
    and every message arrives."""
    queue, transient = f"{session}.durable", f"{session}.transient"
    publisher = quorum_transport(cluster.broker(first=0), "publisher")
    consumer = None
    try:
        publisher.declare(queue, durable=True)
        publisher.declare(transient)
        assert cluster.queue_info(queue, "type") == "quorum" and cluster.queue_info(transient, "type") == "classic"
        leader = cluster.leader(queue)
        assert leader is cluster.nodes[0]
        publish_range(publisher, queue, range(N // 2))
        consumer = quorum_transport(cluster.broker(first=1), "consumer")
        seen: set[int] = set()
        receive_until(consumer, queue, seen, set(range(N // 4)))
        leader.kill()
        publish_range(publisher, queue, range(N // 2, N))  # through another node, once reconnected
        receive_until(consumer, queue, seen, set(range(N)))
        assert publisher.generation >= 2, "the publisher never lost its connection: was it on the killed node?"
        assert consumer.generation == 1, "the consumer, on a surviving node, should not have needed to reconnect"
        assert cluster.leader(queue) in cluster.nodes[1:]
    finally:
        for transport in (publisher, consumer):
            if transport is not None:
                transport.close()


def test_a_consumer_on_the_killed_node_fails_over_and_resumes(cluster, session):
    """The consumer is connected to node 0, the queue led by node 1 and the publisher on node 2.
    Node 0 is SIGKILLed mid-stream: the consumer reconnects to the next address, its unacked
    messages come back, and it receives the rest. A new connection whose first address is the
    dead node gets in through the others."""
    queue = f"{session}.durable"
    publisher = quorum_transport(cluster.broker(first=2), "publisher")
    consumer = None
    try:
        declarer = quorum_transport(cluster.broker(first=1), "declarer")
        declarer.declare(queue, durable=True)
        declarer.close()
        assert cluster.leader(queue) is cluster.nodes[1]
        consumer = quorum_transport(cluster.broker(first=0), "consumer")
        publish_range(publisher, queue, range(N // 2))
        seen: set[int] = set()
        receive_until(consumer, queue, seen, set(range(N // 4)))
        cluster.nodes[0].kill()
        publish_range(publisher, queue, range(N // 2, N))
        receive_until(consumer, queue, seen, set(range(N)))
        assert consumer.generation >= 2, "the consumer never reconnected"
        latecomer = quorum_transport(cluster.broker(first=0), "latecomer")
        latecomer.publish(queue, str(N).encode(), persistent=True)
        latecomer.close()
        receive_until(consumer, queue, seen, {N})
        assert publisher.generation == 1 and cluster.leader(queue) is cluster.nodes[1]
    finally:
        for transport in (publisher, consumer):
            if transport is not None:
                transport.close()


def test_broker_lists_are_checked_and_redacted():
    one, two = "amqp://u:secret@h1:5672/", "amqp://u:secret@h2:5673/"
    assert AmqpBroker.parse(f"{one},{two}", who="test").urls == (one, two)
    for not_amqp in (f"{one},memory", f"{one},"):
        with pytest.raises(NotAmqp):
            AmqpBroker.parse(not_amqp, who="test")
    assert str(AmqpBroker.parse(f"{one}, {two}", who="test")) == "amqp://***@h1:5672/,amqp://***@h2:5673/"
    Connection(broker=f"{one},{two}").amqp_broker("test")
    with pytest.raises(ValueError, match="mixes amqp:// and amqps://") as refused:
        Connection(broker=f"{one},amqps://u:secret@h2:5671/").amqp_broker("test")
    assert "secret" not in str(refused.value)
    with pytest.raises(ValueError, match="comma-separated list") as refused:
        Connection(broker=f"{one},http://u:secret@h2/").amqp_broker("test")
    assert "secret" not in str(refused.value)
    with pytest.raises(ValueError, match="queue_type"):
        RabbitTransport(one, queue_type="stream")


def test_a_transport_names_every_address_it_could_not_reach():
    ports = [free_port(), free_port()]  # nothing listens there
    with pytest.raises(TransportError, match="cannot connect") as refused:
        RabbitTransport(",".join(f"amqp://guest:guest@127.0.0.1:{port}/" for port in ports), connect_timeout=3)
    assert all(f"127.0.0.1:{port}" in str(refused.value) for port in ports)


def test_tls_holds_for_every_address_of_a_list(tmp_path, session):
    """amqps:// addresses each get TLS checked against their own host: a list whose first
    address is dead reaches the TLS-only node behind it (its certificate names 127.0.0.1 and
    localhost, not the first address's 127.0.0.2), with the CA and client certificate."""
    broker = OwnBroker(tmp_path / "node", make_tls_files(tmp_path / "certs")).start()
    try:
        tls = broker.tls
        options = TLSOptions(str(tls.ca), str(tls.client_cert), str(tls.client_key))
        transport = RabbitTransport(f"amqps://guest:guest@127.0.0.2:{free_port()}/,{broker.url}", tls=options, connect_timeout=10)
        try:
            transport.declare(session)
            transport.publish(session, b"over TLS")
            delivery = transport.receive(session, timeout=10)
            assert delivery is not None and delivery.body == b"over TLS"
            transport.ack(delivery)
        finally:
            transport.close()
    finally:
        broker.stop()
        shutil.rmtree(tmp_path / "node", ignore_errors=True)
