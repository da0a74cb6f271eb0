"""Write splitfed's Grafana dashboards (helm/splitfed/files/dashboards/*.json) from the panel
lists below: one place for every panel's query, so that the chart's ConfigMaps, the real-
Prometheus test (tests/observability) and the README's panel list agree.

    python ci/dashboards.py           write the files
    python ci/dashboards.py --check   exit 1 if a file differs from what would be written

Every splitfed dashboard has the template variables `datasource`, `session` and `role`
(multi-value, "All" = `.*`); queries use `$__rate_interval`, which Grafana sets from the scrape
interval."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

FOLDER = Path(__file__).resolve().parents[1] / "helm" / "splitfed" / "files" / "dashboards"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
SCHEMA_VERSION = 39
S = 'session=~"$session"'
SR = 'session=~"$session", role=~"$role"'


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""


@dataclass(frozen=True)
class Panel:
    title: str
    queries: tuple[Query, ...]
    unit: str = "short"
    kind: str = "timeseries"  # or "stat"
    description: str = ""
    width: int = 12
    stacked: bool = False
    options: dict = field(default_factory=dict)


def q(expr: str, legend: str = "") -> Query:
    return Query(expr, legend)


def quantiles(metric: str, selector: str, by: str = "session") -> tuple[Query, ...]:
    return tuple(
        q(f"histogram_quantile({p}, sum by (le, {by}) (rate({metric}_bucket{{{selector}}}[$__rate_interval])))", f"p{round(p * 100)} {{{{{by}}}}}")
        for p in (0.5, 0.99)
    )


def bytes_per_second(selector: str, title: str = "Bytes per second by role", **style: object) -> Panel:
    return Panel(title, (q(f"sum by (role, direction) (rate(splitfed_bytes_total{{{selector}}}[$__rate_interval]))", "{{role}} {{direction}}"),),
                 unit="Bps", **style)


def messages_per_second(selector: str, title: str = "Messages per second by kind", **style: object) -> Panel:
    return Panel(title, (q(f"sum by (role, kind) (rate(splitfed_messages_total{{{selector}}}[$__rate_interval]))", "{{role}} {{kind}}"),),
                 unit="ops", **style)


def rejections(selector: str, **style: object) -> Panel:
    return Panel("Rejections by reason",
                 (q(f"sum by (role, reason) (increase(splitfed_messages_rejected_total{{{selector}}}[$__rate_interval]))", "{{role}} {{reason}}"),),
                 stacked=True, **style)


OVERVIEW = (
    Panel("Runs", (q(f"count(count by (session) (splitfed_unsafe_mode{{{S}}}))", "runs"),), kind="stat", width=4,
          description="Sessions with at least one live party"),
    Panel("Parties", (q(f"count(splitfed_unsafe_mode{{{SR}}})", "parties"),), kind="stat", width=4,
          description="Live parties (every role sets splitfed_unsafe_mode when it starts)"),
    Panel("Unsafe mode", (q(f"max by (session, role) (splitfed_unsafe_mode{{{SR}}})", "{{session}} {{role}}"),), kind="stat", width=16,
          description="1: the role accepts unsigned messages (started without a key list)",
          options={"mappings": [{"type": "value", "options": {"0": {"text": "signed", "color": "green"}, "1": {"text": "UNSAFE", "color": "red"}}}]}),
    Panel("Round or epoch", (q(f"max by (session, role) (splitfed_round{{{SR}}})", "round {{session}} {{role}}"),
                             q(f"max by (session, role) (splitfed_epoch{{{SR}}})", "epoch {{session}} {{role}}"))),
    Panel("Test accuracy", (q(f"splitfed_test_accuracy{{{SR}}}", "{{session}} {{role}}"),), unit="percentunit"),
    Panel("Loss", (q(f"splitfed_test_loss{{{SR}}}", "test {{session}} {{role}}"), q(f"splitfed_train_loss{{{SR}}}", "train {{session}} {{role}} {{instance}}"))),
    Panel("Active parties by role", (q(f"count by (role) (splitfed_unsafe_mode{{{SR}}})", "{{role}}"),), stacked=True),
    bytes_per_second(SR, "Bytes per second"),
    messages_per_second(SR, "Messages per second"),
    Panel("Round-trip latency (split)", quantiles("splitfed_round_trip_seconds", SR), unit="s",
          description="From sending a batch's activations to holding its gradients"),
    rejections(SR, description="Frames refused: garbage, bad signatures, replays, wrong shapes, NaN/Inf, ..."),
)

FEDAVG_SERVER = f'role="fedavg-server", {S}'
FEDAVG_WORKER = f'role="fedavg-worker", {S}'
FEDAVG = (
    Panel("Round", (q(f"max by (session) (splitfed_round{{{FEDAVG_SERVER}}})", "{{session}}"),), width=8),
    Panel("Active workers", (q(f"splitfed_active_workers{{{FEDAVG_SERVER}}}", "joined, not missing {{session}}"),
                             q(f"splitfed_sampled_workers{{{FEDAVG_SERVER}}}", "drawn this round {{session}}")), width=8),
    Panel("Update bytes accepted per round", (q(f"splitfed_round_bytes{{{FEDAVG_SERVER}}}", "{{session}}"),), unit="bytes", width=8),
    Panel("Test accuracy", (q(f"splitfed_test_accuracy{{{FEDAVG_SERVER}}}", "{{session}}"),), unit="percentunit"),
    Panel("Loss", (q(f"splitfed_test_loss{{{FEDAVG_SERVER}}}", "test {{session}}"), q(f"splitfed_train_loss{{{FEDAVG_SERVER}}}", "train (workers' mean; none under --dp) {{session}}"))),
    Panel("Round duration", quantiles("splitfed_round_duration_seconds", FEDAVG_SERVER), unit="s"),
    Panel("Updates per second", (q(f"sum by (session, outcome) (rate(splitfed_updates_total{{{FEDAVG_SERVER}}}[$__rate_interval]))", "{{outcome}} {{session}}"),),
          unit="ops", description="Received: every update and join that arrived; accepted: those applied"),
    Panel("Workers' round", (q(f"splitfed_round{{{FEDAVG_WORKER}}}", "{{instance}}"),)),
    Panel("Workers' train loss", (q(f"splitfed_train_loss{{{FEDAVG_WORKER}}}", "{{instance}}"),)),
    Panel("Samples per worker", (q(f"splitfed_local_samples{{{FEDAVG_WORKER}}}", "{{instance}}"),)),
    Panel("Update size", (q(f"splitfed_update_bytes{{{FEDAVG_WORKER}}}", "{{instance}}"),), unit="bytes"),
    Panel("Training vs waiting", (q(f"sum by (activity) (rate(splitfed_activity_seconds_total{{{FEDAVG_WORKER}}}[$__rate_interval]))", "{{activity}}"),),
          unit="s", stacked=True, description="Worker-seconds per second spent training a round or waiting for the next model"),
    Panel("Servers: active or standby", (q(f"splitfed_server_active{{{FEDAVG_SERVER}}}", "{{instance}}"),),
          description="1: the server holding the session and running rounds; 0: a standby waiting to take over"),
    Panel("Missed rounds by worker", (q(f"splitfed_worker_missed_rounds{{{FEDAVG_SERVER}}}", "{{worker}}"),),
          description="Rounds in a row closed without the worker's update; 0 once it is heard from"),
    Panel("Privacy spent (epsilon)", (q(f"max by (session) (splitfed_dp_epsilon{{{FEDAVG_SERVER}}})", "{{session}}"),),
          description="Differential privacy (--dp): the epsilon the run has spent so far, at its --dp-delta (sample: the most any "
                      "worker reported); --dp-target-epsilon ends the run before a round would take it past the target"),
    Panel("Secure aggregation dropouts", (
        q(f"sum by (session, stage) (increase(splitfed_secagg_dropouts_total{{{FEDAVG_SERVER}}}[$__rate_interval]))", "{{stage}} {{session}}"),
        q(f"sum by (session) (increase(splitfed_secagg_failures_total{{{FEDAVG_SERVER}}}[$__rate_interval]))", "failed attempts {{session}}")),
          description="--secure-aggregation: workers a secure round went on without, by the stage they left at (keys, shares, masked, "
                      "reveal), and secure sums that could not be unmasked and were run again with fresh keys. No data: nothing dropped"),
)

SPLIT_CLIENT = f'role="split-client", {S}'
SPLIT_SERVER = f'role="split-server", {S}'
SPLIT_FED = f'role="split-fed", {S}'
SPLIT_ROLES = f'role=~"split-client|split-server|split-fed|relay", {S}'
# One client (split) or several (splitnn): the clients' series carry `client` (split-client, or
# split-client-N among several) where they are per client, and the server's view of each client
# (splitfed_split_client_epoch) carries it too.
SPLIT = (
    Panel("Epoch", (q(f"max by (session) (splitfed_epoch{{{SPLIT_CLIENT}}})", "{{session}}"),), width=8,
          description="The newest epoch a client of the session has finished its share of"),
    Panel("Batches per second", (q(f"sum by (session, client) (rate(splitfed_round_trip_seconds_count{{{SPLIT_CLIENT}}}[$__rate_interval]))", "{{client}} {{session}}"),),
          unit="ops", width=8, stacked=True, description="Training batches each client sends through the server"),
    Panel("Test accuracy", (q(f"splitfed_test_accuracy{{{SPLIT_CLIENT}}}", "{{session}} {{instance}}"),), unit="percentunit", width=8,
          description="As the client that evaluated the closed epoch measured it"),
    Panel("Active clients", (q(f"splitfed_split_active_clients{{{SPLIT_SERVER}}}", "said hello, not silent {{session}}"),
                             q(f"splitfed_split_epoch_clients{{{SPLIT_SERVER}}}", "in the last closed epoch {{session}}")), width=8,
          description="The server's view: clients that have said hello and not gone silent for --client-timeout, "
                      "and the clients whose share the last closed epoch included"),
    Panel("Epoch by client", (q(f"splitfed_split_client_epoch{{{SPLIT_SERVER}}}", "{{client}} {{session}}"),), width=8,
          description="The last epoch each client reported its share of (the server's view): a client behind the others is slow or gone"),
    Panel("Clients averaged (split-fed)", (q(f"splitfed_averaged_clients{{{SPLIT_FED}}}", "{{session}}"),), width=8,
          description="Client halves in the split-fed's last average (splitfed-v1 and v2 with several clients)"),
    Panel("Loss", (q(f"splitfed_test_loss{{{SPLIT_CLIENT}}}", "test {{session}} {{instance}}"), q(f"splitfed_train_loss{{{SPLIT_CLIENT}}}", "train {{session}} {{instance}}"))),
    Panel("Round-trip latency", quantiles("splitfed_round_trip_seconds", SPLIT_CLIENT), unit="s",
          description="From sending a batch's activations to holding its gradients, over all the clients"),
    Panel("Round-trip latency by client", quantiles("splitfed_round_trip_seconds", SPLIT_CLIENT, by="client"), unit="s",
          description="The same per client: one far above the others is far from the server, or on a slow node"),
    bytes_per_second(SPLIT_ROLES),
    messages_per_second(SPLIT_ROLES),
    rejections(SPLIT_ROLES),
)

TRACKER = f'role="p2p-tracker", {S}'
PEERS = f'role=~"p2p-peer|smpl-peer", {S}'
SMPL_PEER = f'role="smpl-peer", {S}'
DECENTRALIZED = f'role=~"p2p-tracker|p2p-peer|smpl-peer", {S}'
# p2p and smpl: the tracker's view of the membership (and of SMPL's hyperedges), and each peer's
# own: its epoch, its accuracy before and after averaging (or synchronising), the models (or
# hyperedge changes) it sent, received, averaged in or dropped as stale.
P2P = (
    Panel("Live peers", (q(f"splitfed_live_peers{{{TRACKER}}}", "{{session}}"),), width=8,
          description="Peers the tracker lists as live: registered, heartbeating, not left"),
    Panel("Peers evicted", (q(f"splitfed_peers_evicted_total{{{TRACKER}}}", "{{session}}"),), width=8,
          description="Peers the tracker evicted for missing their heartbeats (--peer-timeout), since it started"),
    Panel("Hyperedges open (smpl)", (q(f"splitfed_hyperedges_active{{{TRACKER}}}", "all {{session}}"),
                                     q(f"splitfed_hyperedges_active{{{SMPL_PEER}}}", "{{instance}}")), width=8,
          description="The tracker's count of open SMPL hyperedges, and each smpl-peer's own"),
    Panel("Epoch by peer", (q(f"splitfed_epoch{{{PEERS}}}", "{{role}} {{instance}}"),),
          description="The epochs (p2p) or hyperedges (smpl) each peer has finished: a peer far behind is slow, or has rejoined"),
    Panel("Accuracy before and after averaging", (q(f"avg by (session, stage) (splitfed_peer_accuracy{{{PEERS}}})", "{{stage}} (mean) {{session}}"),
                                                 q(f"splitfed_peer_accuracy{{{PEERS}}}", "{{stage}} {{instance}}")), unit="percentunit",
          description="Each peer's test accuracy after its last epoch or hyperedge, before and after averaging in what arrived"),
    Panel("Models per second by event", (q(f"sum by (session, event) (rate(splitfed_peer_models_total{{{PEERS}}}[$__rate_interval]))", "{{event}} {{session}}"),),
          unit="ops", description="Models (smpl: hyperedge changes) the peers sent, received, averaged in, or dropped as too stale"),
    Panel("Staleness", (q(f"splitfed_peer_staleness{{{PEERS}}}", "{{instance}}"),),
          description="Epochs the stalest model in each peer's last average was behind it (--max-staleness drops older ones)"),
    Panel("Samples per peer", (q(f"splitfed_local_samples{{{PEERS}}}", "{{instance}}"),)),
    bytes_per_second(DECENTRALIZED),
    messages_per_second(DECENTRALIZED, width=24, description="Rejected frames, by reason, are on the overview dashboard"),
)

# RabbitMQ's own rabbitmq_prometheus plugin: aggregated /metrics, and per-queue series from
# /metrics/detailed?family=queue_coarse_metrics&family=queue_consumer_count (the chart scrapes
# both). splitfed's queues are named splitfed.SESSION.ROLE[.ID].
QUEUES = 'queue=~"splitfed\\\\.($session)\\\\..*"'
RABBITMQ = (
    Panel("Connections", (q("sum(rabbitmq_connections)", "connections"),), kind="stat", width=6),
    Panel("Channels", (q("sum(rabbitmq_channels)", "channels"),), kind="stat", width=6),
    Panel("splitfed queues", (q(f"count(rabbitmq_detailed_queue_messages{{{QUEUES}}})", "queues"),), kind="stat", width=6),
    Panel("Unacked messages", (q(f"sum(rabbitmq_detailed_queue_messages_unacked{{{QUEUES}}})", "unacked"),), kind="stat", width=6),
    Panel("Queue depth (ready)", (q(f"sum by (queue) (rabbitmq_detailed_queue_messages_ready{{{QUEUES}}})", "{{queue}}"),)),
    Panel("Unacked by queue", (q(f"sum by (queue) (rabbitmq_detailed_queue_messages_unacked{{{QUEUES}}})", "{{queue}}"),)),
    Panel("Consumers by queue", (q(f"sum by (queue) (rabbitmq_detailed_queue_consumers{{{QUEUES}}})", "{{queue}}"),)),
    Panel("Publish, deliver, ack per second", (
        q("sum(rate(rabbitmq_global_messages_received_total[$__rate_interval]))", "published"),
        q("sum(rate(rabbitmq_global_messages_delivered_total[$__rate_interval]))", "delivered"),
        q("sum(rate(rabbitmq_global_messages_acknowledged_total[$__rate_interval]))", "acknowledged"),
    ), unit="ops", description="The whole broker (the plugin's aggregated metrics)"),
)


def variable(name: str, label: str, query: str) -> dict:
    return {
        "name": name, "label": label, "type": "query", "datasource": DATASOURCE, "definition": query,
        "query": {"query": query, "refId": f"{name}-variable"}, "refresh": 2, "multi": True, "includeAll": True, "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]}, "sort": 1, "hide": 0, "options": [],
    }


def templating(roles: str) -> dict:
    return {"list": [
        {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus", "hide": 0, "options": [], "refresh": 1,
         "current": {"selected": False, "text": "default", "value": "default"}},
        variable("session", "Session", "label_values(splitfed_unsafe_mode, session)"),
        variable("role", "Role", f'label_values(splitfed_unsafe_mode{{session=~"$session", role=~"{roles}"}}, role)'),
    ]}


def panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict:
    targets = [{"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": query.expr, "legendFormat": query.legend or "__auto", "range": True}
               for i, query in enumerate(panel.queries)]
    height = 4 if panel.kind == "stat" else 8
    defaults: dict = {"unit": panel.unit, **({"mappings": panel.options["mappings"]} if "mappings" in panel.options else {})}
    if panel.kind == "timeseries":
        defaults["custom"] = {"stacking": {"mode": "normal" if panel.stacked else "none", "group": "A"}, "fillOpacity": 20 if panel.stacked else 0}
        options = {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True}, "tooltip": {"mode": "multi", "sort": "desc"}}
    else:
        options = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}, "colorMode": "value", "graphMode": "none", "textMode": "auto"}
    return {
        "id": panel_id, "type": panel.kind, "title": panel.title, "description": panel.description, "datasource": DATASOURCE,
        "gridPos": {"h": height, "w": panel.width, "x": x, "y": y}, "targets": targets,
        "fieldConfig": {"defaults": defaults, "overrides": []}, "options": options,
    }


def layout(panels: tuple[Panel, ...]) -> list[dict]:
    """Left to right in rows of 24 columns."""
    placed, x, y, row_height = [], 0, 0, 0
    for panel_id, panel in enumerate(panels, start=1):
        height = 4 if panel.kind == "stat" else 8
        if x + panel.width > 24:
            x, y, row_height = 0, y + row_height, 0
        placed.append(panel_json(panel, panel_id, x, y))
        x, row_height = x + panel.width, max(row_height, height)
    return placed


def dashboard(uid: str, title: str, description: str, panels: tuple[Panel, ...], roles: str = ".*") -> dict:
    return {
        "uid": uid, "title": title, "description": description, "tags": ["splitfed"], "editable": True, "graphTooltip": 1,
        "schemaVersion": SCHEMA_VERSION, "version": 1, "refresh": "10s", "time": {"from": "now-1h", "to": "now"}, "timezone": "browser",
        "annotations": {"list": []},
        "links": [{"type": "dashboards", "tags": ["splitfed"], "asDropdown": True, "title": "splitfed", "includeVars": True, "keepTime": True,
                   "icon": "external link", "targetBlank": False, "tooltip": "The other splitfed dashboards", "url": ""}],
        "templating": templating(roles), "panels": layout(panels),
    }


DASHBOARDS = {
    "overview.json": dashboard("splitfed-overview", "splitfed / Overview", "Every splitfed run: progress, accuracy, traffic, latency, rejections", OVERVIEW),
    "fedavg.json": dashboard("splitfed-fedavg", "splitfed / FedAvg", "Federated averaging: rounds, the server's model, every worker", FEDAVG, "fedavg-.*"),
    "split.json": dashboard("splitfed-split", "splitfed / Split learning",
                            "Split learning, one client or several: epochs, clients, round trips, the split-fed's averages, traffic", SPLIT,
                            "split-.*|relay"),
    "p2p.json": dashboard("splitfed-p2p", "splitfed / Decentralized (p2p, smpl)",
                          "p2p and smpl: the tracker's membership and hyperedges, every peer's epochs, accuracy before and after averaging, models exchanged",
                          P2P, "p2p-.*|smpl-peer"),
    "rabbitmq.json": dashboard("splitfed-rabbitmq", "splitfed / RabbitMQ", "The broker: splitfed's queues, rates, connections (rabbitmq_prometheus)", RABBITMQ),
}


def render(board: dict) -> str:
    return json.dumps(board, indent=2) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a file differs from what would be written")
    args = parser.parse_args()
    stale = [name for name, board in DASHBOARDS.items() if not (FOLDER / name).exists() or (FOLDER / name).read_text() != render(board)]
    if args.check:
        for name in stale:
            print(f"dashboards: {FOLDER / name} is stale: run python ci/dashboards.py", file=sys.stderr)
        return 1 if stale else 0
    FOLDER.mkdir(parents=True, exist_ok=True)
    for name, board in DASHBOARDS.items():
        (FOLDER / name).write_text(render(board))
    print(f"dashboards: wrote {', '.join(DASHBOARDS)} to {FOLDER}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
