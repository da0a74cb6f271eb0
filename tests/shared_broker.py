"""The shared RabbitMQ the broker tests use (`make test` starts it: ci/broker.sh), and the queues
a test leaves on it. A test's session names every queue its roles
declare (`splitfed.<session>.…`); durable ones outlive the processes that made them, so each
test that uses the shared broker has its session's queues deleted afterwards, passed or failed."""

from __future__ import annotations

import os
import subprocess

import pika

BROKER = os.environ.get("SPLITFED_TEST_BROKER", "amqp://guest:guest@127.0.0.1:5672/")


def queues_of(session: str) -> list[str]:
    """The broker's queues that belong to `session` (from the local node's own listing)."""
    listing = subprocess.run(["rabbitmqctl", "list_queues", "--quiet", "--no-table-headers", "name"], capture_output=True, text=True, check=True, timeout=60)
    return [name for name in listing.stdout.split() if name.startswith(f"splitfed.{session}.")]


def delete_queues_of(url: str, session: str) -> list[str]:
    """Delete `session`'s queues; returns their names."""
    left = queues_of(session)
    if left:
        connection = pika.BlockingConnection(pika.URLParameters(url))
        try:
            channel = connection.channel()
            for name in left:
                channel.queue_delete(queue=name)
        finally:
            connection.close()
    return left
