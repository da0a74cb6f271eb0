"""The session lock a FedAvg server holds (an exclusive queue): one holder at a time, let go when
its connection ends, and a holder that lost its connection and finds the lock taken on its way
back stops with LockLost instead of acting beside its successor."""

import subprocess
import time

import pytest

from splitfed.transport.base import LockLost, TransportError
from splitfed.transport.memory import MemoryBroker, MemoryTransport
from splitfed.transport.rabbitmq import RabbitTransport
from tests.conftest import HANG_GUARD
from tests.integration.test_rabbitmq_transport import _connection_pid


def test_one_holder_at_a_time_until_its_connection_closes(broker_url, session):
    lock = f"splitfed.{session}.lock"
    first, second = RabbitTransport(broker_url, name=f"first-{session}"), RabbitTransport(broker_url, name=f"second-{session}")
    try:
        assert first.hold(lock) and first.hold(lock)  # holding it again is no change
        assert not second.hold(lock)
        assert first.holds(lock, 1) and not second.holds(lock, 1)
        # The refusal closed only a channel of the second's own: its connection works on.
        second.declare(f"{lock}.q")
        second.publish(f"{lock}.q", b"still here")
        assert second.receive(f"{lock}.q", 10).body == b"still here"
        second.delete(f"{lock}.q")
        first.close()
        assert second.hold(lock)  # the broker let go of it with the connection
    finally:
        first.close()
        second.close()


def test_a_holder_that_comes_back_to_a_taken_lock_stops(broker_url, session):
    lock = f"splitfed.{session}.lock"
    name = f"holder-{session}"
    holder, successor = RabbitTransport(broker_url, name=name), RabbitTransport(broker_url, name=f"successor-{session}")
    try:
        assert holder.hold(lock)
        closed = subprocess.run(["rabbitmqctl", "close_connection", _connection_pid(name), "a network cut"], capture_output=True, text=True)
        assert closed.returncode == 0, closed.stderr
        deadline = time.monotonic() + 10  # the holder waits 0.5 s before reconnecting: the successor gets in first
        while not successor.hold(lock):
            assert time.monotonic() < deadline, "the lock was not let go with the holder's connection"
        # Until the holder's connection thread has seen the cut, holds() still answers from before it
        # (a loaded machine can take a while); from then on it waits for the reconnection, which
        # finds the lock taken.
        deadline = time.monotonic() + HANG_GUARD
        with pytest.raises(LockLost, match="taken by another connection"):
            while holder.holds(lock, 30):
                assert time.monotonic() < deadline, "the holder never noticed its connection was cut"
                time.sleep(0.01)
        with pytest.raises(TransportError):  # nothing more goes out from it
            holder.publish(f"{lock}.q", b"from a replaced holder")
        assert successor.holds(lock, 1)
    finally:
        holder.close()
        successor.close()


def test_the_memory_transport_holds_locks_the_same_way():
    broker = MemoryBroker()
    first, second = MemoryTransport(broker), MemoryTransport(broker)
    assert first.hold("lock") and not second.hold("lock")
    assert first.holds("lock", 0) and not second.holds("lock", 0)
    first.close()
    assert second.hold("lock")
