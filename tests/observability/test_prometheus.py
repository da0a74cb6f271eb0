"""A real Prometheus scrapes a real FedAvg run, a real split run, a real splitnn run (two
clients, splitfed-v2, with the split-fed), a real p2p run and a real smpl run (a tracker and three
peers each) over a RabbitMQ node of the test's own (with its rabbitmq_prometheus plugin); then every query of every dashboard panel,
and every template variable, is evaluated through Prometheus' HTTP API and must return data,
and the chart's alert rules, loaded by the same Prometheus, must have evaluated without error.

Every role runs as its own `splitfed serve` process (`splitfed run --metrics-port`), so each
role's /metrics endpoint is a scrape target of its own: relay, split-client, split-server,
fedavg-server and three fedavg-workers; split-server, split-fed and two split clients. A garbage frame is put in the FedAvg server's and the
relay's queues before the runs, so the rejection panels have something to show. The FedAvg run
is a private one (--secure-aggregation secagg+ --dp central), so the privacy panel has epsilon to
show (and the server's training-loss query nothing: WITHHELD_UNDER_DP), and the secure aggregation panel zeros (the server starts its dropout and failure counters
at zero, so a healthy run has data there too).

The runs start while the broker holds a memory alarm, which blocks every publish: each role
starts, serves its metrics, builds its endpoint and waits at its first message. Once Prometheus
has scraped every role's endpoint (its splitfed_unsafe_mode series), the alarm is lifted and the
runs train. So every role is scraped while it runs, however short its run or busy the machine."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from splitfed.roles.endpoint import queue_name
from splitfed.transport.rabbitmq import RabbitTransport
from tests.observability import grafana_schema
from tests.own_broker import OwnBroker
from tests.ports import free_port, port_block

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((ROOT / "helm" / "splitfed" / "files" / "dashboards").glob("*.json"))
ALERT_RULES = ROOT / "helm" / "splitfed" / "files" / "alerts" / "splitfed.rules.yaml"
SCRAPE_INTERVAL = "1s"
RATE_INTERVAL = "10s"  # Grafana's $__rate_interval is at least 4 scrape intervals
# Enough work that each run's parties are scraped many times while they train (digits is over
# in about a second on these machines), and no more: the 24 processes' start (torch, the data)
# already costs the two cores of CI most of a minute. The test set is cut to its first 500
# images: evaluating all 10,000 was most of each run's time, and no query here depends on how
# many there are.
TRAINING = ("--dataset", "fashion-mnist", "--limit", "1500", "--test-limit", "500")
FEDAVG_ROLES, SPLIT_ROLES = 4, 3  # fedavg-server + 3 workers; split-client, split-server, relay
SPLITNN_ROLES = 4  # split-server, split-fed, 2 split clients (splitfed-v2: the fed averages)
P2P_ROLES = SMPL_ROLES = 4  # p2p-tracker, 3 peers
# Under --dp the fedavg-server withholds the workers' mean training loss, which is not noised: in
# the private FedAvg run this query must stay empty (the workers' own losses are on their panel).
WITHHELD_UNDER_DP = 'splitfed_train_loss{role="fedavg-server"'


def http_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


class Prometheus:
    def __init__(self, directory: Path, targets: dict[str, list[str]], broker_port: int):
        self.directory = directory  # the runs' logs and results files are there too
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        detailed = {"family": ["queue_coarse_metrics", "queue_consumer_count"]}
        config = {
            "global": {"scrape_interval": SCRAPE_INTERVAL, "scrape_timeout": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
            "rule_files": [str(ALERT_RULES)],
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": hosts}]} for job, hosts in targets.items()
            ] + [
                {"job_name": "rabbitmq", "static_configs": [{"targets": [f"127.0.0.1:{broker_port}"]}]},
                {"job_name": "rabbitmq-detailed", "metrics_path": "/metrics/detailed", "params": detailed,
                 "static_configs": [{"targets": [f"127.0.0.1:{broker_port}"]}]},
            ],
        }
        (directory / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
        self.log = directory / "prometheus.log"
        binary = shutil.which("prometheus") or "/usr/bin/prometheus"
        if not Path(binary).exists():
            pytest.fail("prometheus is not installed: run ci/setup.sh test (it installs the Debian package)")
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [binary, f"--config.file={directory / 'prometheus.yml'}", f"--storage.tsdb.path={directory / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}"], stdout=log, stderr=subprocess.STDOUT,
            )

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"prometheus exited:\n{self.log.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        pytest.fail(f"prometheus not ready in {timeout} s:\n{self.log.read_text()[-3000:]}")

    def api(self, path: str, **params: str | list[str]) -> dict:
        answer = http_json(f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params, doseq=True)}")
        assert answer["status"] == "success", answer
        return answer["data"]

    def wait_for_roles(self, instances: set[str], runs: list[CliRun], timeout: float = 240) -> None:
        """Until every one of `instances` has been scraped with its role's endpoint built (held at
        its first message by the broker's alarm). The hang guard is below the roles' own --timeout
        (300 s), which that wait counts against."""
        deadline = time.monotonic() + timeout
        while (seen := {series["metric"]["instance"] for series in self.api("query", query='splitfed_unsafe_mode{job="splitfed"}')["result"]}) != instances:
            for run in runs:
                assert run.process.poll() is None, f"splitfed run {run.name} ended before its roles were scraped:\n{run.log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"not scraped within {timeout} s of the runs' start: {sorted(instances - seen)}"
            time.sleep(0.5)

    def query_range(self, expr: str, start: float, end: float) -> list[dict]:
        data = self.api("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step="1")
        return data["result"]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class CliRun:
    """`splitfed ARGS` started as a process of its own, in a process group of its own (the roles
    it starts with it), its output going to DIRECTORY/NAME.log."""

    def __init__(self, directory: Path, name: str, *args: str):
        env = {key: value for key, value in os.environ.items() if not key.startswith("SPLITFED_")}
        self.name, self.log = name, directory / f"{name}.log"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "splitfed", *args], stdout=log, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)

    def assert_succeeds(self, timeout: float) -> None:
        code = self.process.wait(timeout)
        assert code == 0, f"splitfed run {self.name} exited with {code}:\n{self.log.read_text()[-3000:]}"

    def kill(self) -> None:
        """Kill what is left of the run, its roles included (after a failure)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


def alarm(broker: OwnBroker, watermark: str) -> None:
    """Set the broker's memory watermark (a fraction of the machine's memory); at 0 the memory
    alarm blocks every publishing connection until the watermark is raised again."""
    done = broker.ctl("set_vm_memory_high_watermark", watermark)
    assert done.returncode == 0, done.stderr


def put_garbage(broker_url: str, queue: str, durable: bool) -> None:
    with RabbitTransport(broker_url, name="prober") as prober:
        prober.declare(queue, durable=durable)
        prober.publish(queue, b"not a frame", persistent=durable)


@pytest.fixture(scope="module")
def scraped_runs(tmp_path_factory):
    """The five runs, scraped: (prometheus, sessions, start, end)."""
    directory = tmp_path_factory.mktemp("observability")
    broker = OwnBroker(directory / "broker", prometheus=True).start()
    fedavg_port, split_port, splitnn_port = port_block(FEDAVG_ROLES), port_block(SPLIT_ROLES), port_block(SPLITNN_ROLES)
    p2p_port, smpl_port = port_block(P2P_ROLES), port_block(SMPL_ROLES)
    blocks = ((fedavg_port, FEDAVG_ROLES), (split_port, SPLIT_ROLES), (splitnn_port, SPLITNN_ROLES), (p2p_port, P2P_ROLES), (smpl_port, SMPL_ROLES))
    targets = {"splitfed": [f"127.0.0.1:{port}" for first, count in blocks for port in range(first, first + count)]}
    prometheus = Prometheus(directory, targets, broker.prometheus_port)
    try:
        prometheus.wait_ready()
        sessions = {"fedavg": f"prom-fedavg-{secrets.token_hex(3)}", "split": f"prom-split-{secrets.token_hex(3)}",
                    "splitnn": f"prom-splitnn-{secrets.token_hex(3)}", "p2p": f"prom-p2p-{secrets.token_hex(3)}",
                    "smpl": f"prom-smpl-{secrets.token_hex(3)}"}
        put_garbage(broker.url, queue_name(sessions["fedavg"], "fedavg-server"), durable=True)
        put_garbage(broker.url, queue_name(sessions["split"], "relay"), durable=False)
        alarm(broker, "0")  # a memory limit of 0 bytes: the broker takes no publishes until it is lifted
        start = time.time()
        # The five runs are independent (a session and a block of metrics ports each), so they
        # train side by side: each is scraped all the while, and the wait is the longest run's.
        runs = [
            CliRun(directory, "fedavg", "run", "fedavg", *TRAINING, "--workers", "3", "--rounds", "6", "--broker", broker.url,
                   "--secure-aggregation", "secagg+", "--dp", "central",
                   "--session", sessions["fedavg"], "--metrics-port", str(fedavg_port), "--out", str(directory / "fedavg.json")),
            CliRun(directory, "split", "run", "split", *TRAINING, "--epochs", "2", "--broker", broker.url, "--via", "relay",
                   "--session", sessions["split"], "--metrics-port", str(split_port), "--out", str(directory / "split.json")),
            CliRun(directory, "splitnn", "run", "splitnn", *TRAINING, "--epochs", "2", "--clients", "2", "--schedule", "splitfed-v2",
                   "--broker", broker.url, "--session", sessions["splitnn"], "--metrics-port", str(splitnn_port),
                   "--out", str(directory / "splitnn.json")),
            CliRun(directory, "p2p", "run", "p2p", *TRAINING, "--epochs", "3", "--peers", "3", "--broker", broker.url,
                   "--session", sessions["p2p"], "--metrics-port", str(p2p_port), "--out", str(directory / "p2p.json")),
            CliRun(directory, "smpl", "run", "smpl", *TRAINING, "--hyperepochs", "3", "--peers", "3", "--broker", broker.url,
                   "--session", sessions["smpl"], "--metrics-port", str(smpl_port), "--out", str(directory / "smpl.json")),
        ]
        try:
            prometheus.wait_for_roles(set(targets["splitfed"]), runs)
            alarm(broker, "0.4")  # RabbitMQ's default limit, 40% of the machine's memory
            for run in runs:
                run.assert_succeeds(timeout=600)
        finally:
            for run in runs:
                run.kill()
        yield prometheus, sessions, start, time.time()
    finally:
        prometheus.stop()
        broker.stop()


def substituted(expr: str, sessions: dict[str, str]) -> str:
    """A panel's query as Grafana sends it with every session selected and role "All"."""
    chosen = "(" + "|".join(sessions.values()) + ")"  # Grafana's regex format of a multi-value variable
    return expr.replace("$__rate_interval", RATE_INTERVAL).replace("$session", chosen).replace("$role", ".*")


def panel_queries() -> list[tuple[str, str, str]]:
    found = []
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            for target in panel["targets"]:
                found.append((path.stem, f"{panel['title']} {target['refId']}", target["expr"]))
    return found


PANEL_QUERIES = panel_queries()


def test_there_are_dashboards_with_queries():
    assert {path.stem for path in DASHBOARDS} >= {"overview", "fedavg", "split", "rabbitmq"}
    assert len(PANEL_QUERIES) >= 40


def test_every_role_was_scraped_while_running(scraped_runs):
    prometheus, sessions, start, end = scraped_runs
    span = f"{int(end - start) + 5}s"
    up = prometheus.api("query", query=f'max by (instance) (max_over_time(up{{job="splitfed"}}[{span}]))', time=f"{end:.3f}")["result"]
    assert len(up) == FEDAVG_ROLES + SPLIT_ROLES + SPLITNN_ROLES + P2P_ROLES + SMPL_ROLES and all(series["value"][1] == "1" for series in up), up
    roles = prometheus.api("query", query=f"count by (role) (max_over_time(splitfed_unsafe_mode[{span}]))", time=f"{end:.3f}")["result"]
    assert {series["metric"]["role"] for series in roles} == {"relay", "split-client", "split-server", "split-fed", "fedavg-server", "fedavg-worker",
                                                              "p2p-tracker", "p2p-peer", "smpl-peer"}
    workers = prometheus.api("query", query=f'count(max_over_time(splitfed_activity_seconds_total{{activity="training"}}[{span}]) > 0)', time=f"{end:.3f}")
    assert workers["result"] and workers["result"][0]["value"][1] == "3", "every worker reports time spent training"


def test_the_garbage_frames_were_counted(scraped_runs):
    prometheus, sessions, start, end = scraped_runs
    span = f"{int(end - start) + 5}s"
    rejected = prometheus.api("query", query=f'max by (role) (max_over_time(splitfed_messages_rejected_total{{reason="malformed"}}[{span}]))',
                              time=f"{end:.3f}")["result"]
    assert {series["metric"]["role"]: series["value"][1] for series in rejected} == {"fedavg-server": "1", "relay": "1"}


def test_the_privacy_panel_shows_the_epsilon_the_run_spent(scraped_runs):
    """The private FedAvg run's splitfed_dp_epsilon is the epsilon its results record round by
    round (the last round's may end the run before the next scrape: any round's will do)."""
    prometheus, sessions, start, end = scraped_runs
    result = json.loads((prometheus.directory / "fedavg.json").read_text())
    spent = [record["epsilon"] for record in result["history"]]
    assert len(spent) == 6 and spent == sorted(spent) and spent[0] > 0, spent
    assert result["dp"] == {"epsilon": spent[-1], "delta": 1e-5, "stopped": ""}
    span = f"{int(end - start) + 5}s"
    query = f'max_over_time(splitfed_dp_epsilon{{role="fedavg-server", session="{sessions["fedavg"]}"}}[{span}])'
    (series,) = prometheus.api("query", query=query, time=f"{end:.3f}")["result"]
    assert any(math.isclose(float(series["value"][1]), value, rel_tol=1e-9) for value in spent), (series, spent)


@pytest.mark.parametrize(("dashboard", "panel", "expr"), PANEL_QUERIES, ids=[f"{d}: {p}" for d, p, _ in PANEL_QUERIES])
def test_panel_query_returns_data(scraped_runs, dashboard, panel, expr):
    prometheus, sessions, start, end = scraped_runs
    result = prometheus.query_range(substituted(expr, sessions), start, end)
    values = [float(value) for series in result for _, value in series["values"] if value not in ("NaN", "+Inf", "-Inf")]
    if expr.startswith(WITHHELD_UNDER_DP):  # the FedAvg run is private: its server must export no training loss
        assert not values, f"{dashboard} / {panel}: the private FedAvg run's server exported its workers' un-noised training loss"
        return
    assert values, f"{dashboard} / {panel}: no data for {substituted(expr, sessions)}"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_template_variables_list_the_runs(scraped_runs, path):
    prometheus, sessions, start, end = scraped_runs
    for variable in json.loads(path.read_text())["templating"]["list"]:
        if variable["type"] != "query":
            continue
        match = re.fullmatch(r"label_values\((.*), (\w+)\)", variable["query"]["query"])
        assert match, f"{variable['name']}: not a label_values query"
        values = prometheus.api(f"label/{match.group(2)}/values", **{"match[]": substituted(match.group(1), sessions), "start": f"{start:.3f}",
                                                                     "end": f"{end:.3f}"})
        assert values, f"{path.stem}: variable {variable['name']} lists nothing"
        if variable["name"] == "session":
            assert set(sessions.values()) <= set(values)


def test_alert_rules_evaluate_on_real_series(scraped_runs):
    """The alert rules, loaded by the same Prometheus, were evaluated against the runs' series
    without an error (their firing and silence are unit-tested by promtool in tests/alerts)."""
    prometheus, sessions, start, end = scraped_runs
    rules = [rule for group in prometheus.api("rules")["groups"] for rule in group["rules"]]
    assert len(rules) >= 7
    for rule in rules:
        assert rule["health"] == "ok" and rule["lastEvaluation"] > "2000", (rule["name"], rule.get("lastError"))


def test_dashboard_files_are_generated():
    check = subprocess.run([sys.executable, str(ROOT / "ci" / "dashboards.py"), "--check"], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_dashboard_validates_against_grafanas_schema(path):
    board = json.loads(path.read_text())
    assert grafana_schema.problems(board) == []
    assert board["title"] and board["uid"], "Grafana needs both, though its types mark them optional"
