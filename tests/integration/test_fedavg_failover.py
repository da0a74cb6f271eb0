"""FedAvg over a three-node RabbitMQ cluster with quorum queues survives the SIGKILL of the node
that leads a queue it needs, mid-run: every role a process, given all three addresses. Nothing
is lost or applied twice: every round has every worker's update, and the final model equals the
plain loop's."""

from __future__ import annotations

import pytest

from splitfed.learning.settings import FederatedSettings
from splitfed.roles.declaration import Progress
from splitfed.roles.fedavg import worker_ids
from splitfed.roles.fedavg.common import server_queue, worker_queue
from splitfed.scenarios import fedavg, launch
from splitfed.scenarios.fedavg import FedAvgRun
from splitfed.transport.rabbitmq import RabbitTransport
from tests.integration.test_fedavg_resilience import assert_equals_reference, checkpoint_state
from tests.own_broker import BrokerCluster, OwnBroker

KILL_AFTER_ROUND = 2


@pytest.fixture
def cluster(tmp_path):
    with BrokerCluster(tmp_path / "cluster") as cluster:
        yield cluster


def declare_through(cluster: BrokerCluster, index: int, queue: str) -> None:
    """Declare `queue` as the roles will (quorum, durable) through node `index`, which then leads
    it: the test knows the node to kill before the run, so the kill costs no lookup mid-run."""
    declarer = RabbitTransport(cluster.broker(first=index), queue_type="quorum", name="declarer")
    try:
        declarer.declare(queue, durable=True)
    finally:
        declarer.close()
    assert cluster.leader(queue) is cluster.nodes[index]


def run_killing(cluster: BrokerCluster, session: str, tmp_path, victim: OwnBroker) -> None:
    """A FedAvg run whose roles all connect to node 0 first (the first address); as soon as
    round KILL_AFTER_ROUND is closed, `victim` is SIGKILLed while the run goes on."""
    # Rounds of under a second here: six after the kill leave the progress reader time to kill
    # before the run's end, which the checkpoint's round at the kill confirms.
    settings = FederatedSettings(dataset="digits", rounds=KILL_AFTER_ROUND + 6, partition="iid")
    checkpoint = tmp_path / "ckpt"
    run = FedAvgRun(broker=cluster.broker(), queue_type="quorum", session=session, timeout=120, checkpoint_dir=checkpoint)
    killed_in: list[int] = []

    def on_progress(progress: Progress) -> None:
        if progress.event == "round" and progress.done == KILL_AFTER_ROUND:
            # The server process does not wait for this: the next round is under way when the node dies.
            victim.kill()
            killed_in.append(checkpoint_state(checkpoint)["round"])

    result = launch.run(fedavg.SCENARIO, settings, run, on_progress)
    assert killed_in, f"round {KILL_AFTER_ROUND} was never reported"
    assert killed_in[0] <= settings.rounds, "the run had ended before the kill; make rounds longer"
    assert victim.process.poll() is not None
    assert [record["step"] for record in result["history"]] == list(range(1, settings.rounds + 1))
    assert result["contributors"] == {str(r): worker_ids(settings.workers) for r in range(1, settings.rounds + 1)}
    assert_equals_reference(settings, checkpoint)  # nothing lost, nothing applied twice


def test_killing_the_leader_of_the_servers_queue_and_every_roles_node(cluster, session, tmp_path):
    """Node 0 leads the server's queue and holds every role's connection: every role reconnects
    to another node while the queue elects a new leader among the other two."""
    declare_through(cluster, 0, server_queue(session))
    run_killing(cluster, session, tmp_path, cluster.nodes[0])


def test_killing_the_leader_of_a_workers_inbox(cluster, session, tmp_path):
    """Node 1 leads worker-0's inbox; the roles are all on node 0 and keep their connections:
    only that queue loses its leader mid-run."""
    inbox = worker_queue(session, "worker-0")
    declare_through(cluster, 1, inbox)
    run_killing(cluster, session, tmp_path, cluster.nodes[1])
