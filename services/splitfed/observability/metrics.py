"""Prometheus metrics, declared once for every role (each RoleSpec lists those it exports).

The scheme (tests/unit/test_metrics_scheme.py holds every metric to it; the README's table is
generated from here by `python -m splitfed.docs`): names start `splitfed_`; counters end
`_total`, durations `_seconds`, sizes `_bytes`; the first labels are always `role` and
`session`; further labels come from BOUNDED_LABELS only, whose values are a fixed set or grow
with the number of parties (never per message, round or batch)."""

from __future__ import annotations

import logging

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

# label -> what bounds its values
BOUNDED_LABELS = {
    "kind": "the protocol's message kinds",
    "direction": "sent, received",
    "reason": "the rejection reasons (ProtocolError.reason and the transport's)",
    "outcome": "received, accepted",
    "activity": "training, waiting",
    "worker": "the run's workers",
    "client": "the run's split clients",
    "event": "sent, received, averaged, dropped",
    "stage": "before, after (averaging)",
}

MESSAGES = Counter("splitfed_messages_total", "Messages sent or received", ["role", "session", "kind", "direction"])
BYTES = Counter("splitfed_bytes_total", "Message bytes sent or received", ["role", "session", "kind", "direction"])
REJECTED = Counter("splitfed_messages_rejected_total", "Messages refused, by reason", ["role", "session", "reason"])
ROUND_TRIP = Histogram(
    "splitfed_round_trip_seconds",
    "From sending a batch's activations to holding its gradients",
    ["role", "session", "client"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5),
)
EPOCH = Gauge("splitfed_epoch", "Current training epoch", ["role", "session"])
ROUND = Gauge("splitfed_round", "Current federated round (the global model's version)", ["role", "session"])
TRAIN_LOSS = Gauge("splitfed_train_loss", "Mean training loss of the last epoch or round", ["role", "session"])
TEST_ACCURACY = Gauge("splitfed_test_accuracy", "Test accuracy after the last epoch or round", ["role", "session"])
TEST_LOSS = Gauge("splitfed_test_loss", "Test loss after the last epoch or round", ["role", "session"])
ROUND_SECONDS = Histogram(
    "splitfed_round_duration_seconds", "Duration of a federated round", ["role", "session"],
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300),
)
ROUND_BYTES = Gauge("splitfed_round_bytes", "Update bytes accepted in the last round", ["role", "session"])
UPDATES = Counter("splitfed_updates_total", "Worker updates and joins by outcome (received, accepted)", ["role", "session", "outcome"])
ACTIVE_WORKERS = Gauge("splitfed_active_workers", "Workers taking part in rounds", ["role", "session"])
WORKER_MISSED_ROUNDS = Gauge(
    "splitfed_worker_missed_rounds", "Rounds in a row closed without this worker's update (0 once heard from)", ["role", "session", "worker"]
)
SAMPLED_WORKERS = Gauge("splitfed_sampled_workers", "Workers drawn to train in the current round", ["role", "session"])
SERVER_ACTIVE = Gauge("splitfed_server_active", "1 while this server holds its session and runs the rounds, 0 while it waits as standby", ["role", "session"])
DP_EPSILON = Gauge("splitfed_dp_epsilon", "Differential privacy spent so far: epsilon at the run's --dp-delta", ["role", "session"])
SECAGG_DROPOUTS = Counter(
    "splitfed_secagg_dropouts_total", "Workers a secure round went on without, by the stage they left at (keys, shares, masked, consent, reveal)",
    ["role", "session", "stage"],
)
SECAGG_FAILURES = Counter("splitfed_secagg_failures_total", "Attempts at a secure sum that could not be unmasked and were run again", ["role", "session"])
LOCAL_SAMPLES = Gauge("splitfed_local_samples", "Training samples this party holds", ["role", "session"])
UPDATE_BYTES = Gauge("splitfed_update_bytes", "Tensor bytes in the last update this worker sent", ["role", "session"])
ACTIVITY_SECONDS = Counter(
    "splitfed_activity_seconds", "Time spent training a round, or waiting for the next model", ["role", "session", "activity"]
)
SPLIT_ACTIVE_CLIENTS = Gauge("splitfed_split_active_clients", "Split clients that have said hello and not gone silent", ["role", "session"])
SPLIT_EPOCH_CLIENTS = Gauge("splitfed_split_epoch_clients", "Split clients whose share the last closed epoch included", ["role", "session"])
SPLIT_CLIENT_EPOCH = Gauge("splitfed_split_client_epoch", "The last epoch this split client reported its share of", ["role", "session", "client"])
AVERAGED_CLIENTS = Gauge("splitfed_averaged_clients", "Client halves in the fed's last average", ["role", "session"])
LIVE_PEERS = Gauge("splitfed_live_peers", "Peers the tracker lists as live (registered, heartbeating, not left)", ["role", "session"])
PEERS_EVICTED = Counter("splitfed_peers_evicted_total", "Peers the tracker evicted for missing their heartbeats", ["role", "session"])
PEER_MODELS = Counter("splitfed_peer_models_total", "Models (or hyperedge changes) this peer sent, received, averaged in, or dropped as too stale", ["role", "session", "event"])
PEER_STALENESS = Gauge("splitfed_peer_staleness", "Epochs the stalest model in this peer's last average was behind it", ["role", "session"])
PEER_ACCURACY = Gauge("splitfed_peer_accuracy", "This peer's test accuracy after its last epoch, before and after averaging", ["role", "session", "stage"])
HYPEREDGES_ACTIVE = Gauge("splitfed_hyperedges_active", "SMPL hyperedges open now (the tracker's count: all of them; a peer's: its own)", ["role", "session"])
UNSAFE_MODE = Gauge("splitfed_unsafe_mode", "1 when the role accepts unsigned messages (no key list)", ["role", "session"])

# What every role that talks over the transport exports.
WIRE = (MESSAGES, BYTES, REJECTED, UNSAFE_MODE)


def serve(port: int, address: str = "0.0.0.0") -> None:
    """Expose /metrics on `address`:`port` (port 0: not at all)."""
    if port:
        try:
            start_http_server(port, addr=address)
        except OSError as exc:
            raise ValueError(f"cannot serve metrics on port {port}: {exc.strerror or exc}") from None
        log.info("metrics on %s:%d/metrics", address, port)


def rejected_count(role: str, session: str, reason: str) -> float:
    """Current value of one rejection counter (for summaries and tests in the same process)."""
    labels = {"role": role, "session": session, "reason": reason}
    return REGISTRY.get_sample_value("splitfed_messages_rejected_total", labels) or 0.0
