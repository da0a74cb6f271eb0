"""High availability in the Helm chart, rendered by the real helm 3.19 (installed by
`ci/chart.sh install` when missing): the chart's RabbitMQ as a cluster of broker.rabbitmq.replicas
nodes (a StatefulSet that forms one cluster by its pods' stable DNS names, a shared Erlang cookie,
a PodDisruptionBudget, pods spread over nodes), the queue type that follows it into every role,
the broker URL list the roles fail over along, and the fedavg-server's active + standby pods on one
shared checkpoint volume. Renders outside ci/chart-values/ are validated with
kubernetes-validate --strict, as ci/chart.sh validates those."""

from __future__ import annotations

import base64
import subprocess
import sys

import pika

import pytest
import yaml

from tests.chart.test_chart import env_of, pod_specs, role_containers
from tests.conftest import REPO, RELEASE, render
from tests.own_broker import OwnBroker

BROKER = f"{RELEASE}-splitfed-broker"
HEADLESS = f"{BROKER}-headless"
SELECTOR = {"app.kubernetes.io/name": "splitfed", "app.kubernetes.io/instance": RELEASE}
VALUES = {path.stem: path for path in (REPO / "ci" / "chart-values").glob("*.yaml")}


def one(objects: list[dict], kind: str, name: str) -> dict:
    (found,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def named(objects: list[dict], kind: str, name: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]


def spread_term(component: str) -> dict:
    return {"topologyKey": "kubernetes.io/hostname", "labelSelector": {"matchLabels": {**SELECTOR, "app.kubernetes.io/component": component}}}


def validate(objects: list[dict], tmp_path) -> None:
    """kubernetes-validate --strict against Kubernetes 1.30, through ci/validate_manifests.py."""
    manifest = tmp_path / "rendered.yaml"
    manifest.write_text(yaml.safe_dump_all(objects))
    done = subprocess.run([sys.executable, str(REPO / "ci" / "validate_manifests.py"), "--kube-version", "1.30.0", str(manifest)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture(scope="module")
def default(helm) -> list[dict]:
    return render(helm)


@pytest.fixture(scope="module")
def minimal(helm) -> list[dict]:
    return render(helm, "-f", str(VALUES["minimal"]))


# -- the chart's RabbitMQ ------------------------------------------------------------------------


def test_default_broker_is_a_three_node_cluster(default):
    broker = one(default, "StatefulSet", BROKER)
    spec = broker["spec"]
    assert spec["replicas"] == 3
    assert spec["podManagementPolicy"] == "Parallel"  # node 0 must not wait for peers that wait for it
    assert spec["serviceName"] == HEADLESS
    headless = one(default, "Service", HEADLESS)
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True  # peers resolve before they are ready
    assert {port["port"] for port in headless["spec"]["ports"]} == {5672, 4369, 25672}
    # the node names the pods take are exactly the ones the configuration lists
    env = env_of(spec["template"]["spec"]["containers"][0])
    assert env["RABBITMQ_USE_LONGNAME"]["value"] == "true"
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    domain = f"{HEADLESS}.default.svc.cluster.local"
    assert env["RABBITMQ_NODENAME"]["value"] == f"rabbit@$(POD_NAME).{domain}"
    config = dict(line.split(" = ", 1) for line in one(default, "ConfigMap", BROKER)["data"]["rabbitmq.conf"].splitlines()
                  if " = " in line and not line.startswith("#"))
    assert config["cluster_formation.peer_discovery_backend"] == "classic_config"  # no plugin, no RBAC
    assert [config[f"cluster_formation.classic_config.nodes.{n + 1}"] for n in range(3)] == [
        f"rabbit@{BROKER}-{n}.{domain}" for n in range(3)]
    assert "cluster_formation.classic_config.nodes.4" not in config
    assert config["cluster_partition_handling"] == "pause_minority"
    assert not [o for o in default if o["kind"] in ("Role", "RoleBinding", "ClusterRole")]


def test_the_nodes_share_an_erlang_cookie_from_a_secret(helm, default):
    pod = one(default, "StatefulSet", BROKER)["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert "/var/lib/rabbitmq/.erlang.cookie" in init["args"][0] and "chmod 0400" in init["args"][0]
    assert {"name": "data", "mountPath": "/var/lib/rabbitmq"} in init["volumeMounts"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "erlang-cookie"]
    secret = one(default, "Secret", volume["secret"]["secretName"])
    assert len(base64.b64decode(secret["data"]["cookie"])) == 32
    # a given cookie is used, and only the Secret holds it (base64)
    objects = render(helm, "--set", "broker.rabbitmq.auth.erlangCookie=Given-Cookie-1234567890")
    assert base64.b64decode(one(objects, "Secret", f"{BROKER}-erlang-cookie")["data"]["cookie"]) == b"Given-Cookie-1234567890"
    assert not [o for o in objects if "Given-Cookie" in yaml.safe_dump(o)]
    # with an existing credentials Secret the cookie is still the chart's own
    objects = render(helm, "--set", "broker.rabbitmq.auth.existingSecret=rabbitmq-credentials")
    assert [o["metadata"]["name"] for o in objects if o["kind"] == "Secret"] == [f"{BROKER}-erlang-cookie"]


def test_a_node_prepared_by_the_init_container_has_the_secrets_user_and_no_guest(helm, tmp_path):
    """The init container's script, run by sh with its folders moved under tmp_path, against a
    real RabbitMQ node that reads the configuration folder the StatefulSet names: the Secret's
    user logs in with its password, and the image's default guest user does not exist."""
    objects = render(helm, "--set", "broker.rabbitmq.auth.password=Given-Pa55word")
    pod = one(objects, "StatefulSet", BROKER)["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    env = {variable["name"]: variable.get("value") for variable in pod["containers"][0]["env"]}
    folders = {  # the pod's paths -> here; the longer first, so that no path is replaced inside another
        "/etc/rabbitmq-credentials.d": tmp_path / "conf.d", "/etc/rabbitmq-credentials": tmp_path / "credentials",
        "/etc/rabbitmq-cookie": tmp_path / "cookie", "/var/lib/rabbitmq": tmp_path / "data",
    }
    script = init["args"][0]
    for path, folder in folders.items():
        folder.mkdir()
        script = script.replace(path, str(folder))
    secret = one(objects, "Secret", BROKER)["data"]
    for key in ("username", "password"):
        (tmp_path / "credentials" / key).write_bytes(base64.b64decode(secret[key]))
    (tmp_path / "cookie" / "cookie").write_text("Cookie-0123456789")
    subprocess.run(["sh", "-c", script], check=True, timeout=60)
    assert (tmp_path / "conf.d" / "10-default-user.conf").stat().st_mode & 0o077 == 0  # readable by RabbitMQ's user only

    node = OwnBroker(tmp_path / "node")
    node.env["RABBITMQ_CONFIG_FILES"] = str(folders[env["RABBITMQ_CONFIG_FILES"]])
    try:
        node.start()
        connection = pika.BlockingConnection(pika.URLParameters(f"amqp://splitfed:Given-Pa55word@127.0.0.1:{node.port}/"))
        connection.close()
        with pytest.raises(pika.exceptions.ProbableAuthenticationError):
            pika.BlockingConnection(pika.URLParameters(node.url))  # guest:guest
    finally:
        node.stop()


def test_each_node_has_its_own_volume(helm):
    objects = render(helm, "--set", "broker.rabbitmq.persistence.size=8Gi,broker.rabbitmq.persistence.storageClass=fast")
    (claim,) = one(objects, "StatefulSet", BROKER)["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "8Gi"
    assert claim["spec"]["storageClassName"] == "fast"
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_broker_disruption_budget_and_spread(default):
    budget = one(default, "PodDisruptionBudget", BROKER)
    assert budget["spec"] == {"maxUnavailable": 1, "selector": {"matchLabels": {**SELECTOR, "app.kubernetes.io/component": "broker"}}}
    affinity = one(default, "StatefulSet", BROKER)["spec"]["template"]["spec"]["affinity"]
    assert affinity == {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
        {"weight": 100, "podAffinityTerm": spread_term("broker")}]}}


@pytest.mark.parametrize("component, key", [("broker", "broker.rabbitmq"), ("fedavg-server", "fedavgServer")])
def test_anti_affinity_modes(helm, tmp_path, component, key):
    def affinity(*values: str) -> dict | None:
        objects = render(helm, *[item for value in values for item in ("--set", value)])
        (spec,) = [spec for _, meta, spec in pod_specs(objects) if meta["labels"]["app.kubernetes.io/component"] == component]
        return spec.get("affinity")

    assert affinity(f"{key}.antiAffinity=required") == {
        "podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [spread_term(component)]}}
    assert affinity(f"{key}.antiAffinity=none") is None
    zone = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}]}}}
    section: dict = {"affinity": zone}
    for part in reversed(key.split(".")):
        section = {part: section}
    values = tmp_path / "affinity.yaml"
    values.write_text(yaml.safe_dump(section))
    objects = render(helm, "-f", str(values))
    (spec,) = [spec for _, meta, spec in pod_specs(objects) if meta["labels"]["app.kubernetes.io/component"] == component]
    assert spec["affinity"]["nodeAffinity"] == zone["nodeAffinity"]  # the values' own affinity stays
    assert spec["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"] == spread_term(component)
    validate(objects, tmp_path)
    # a podAntiAffinity of the values' own replaces the spreading
    own = {"preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 1, "podAffinityTerm": {"topologyKey": "zone", "labelSelector": {}}}]}
    target = section
    for part in key.split("."):
        target = target[part]
    target["affinity"] = {"podAntiAffinity": own}
    values.write_text(yaml.safe_dump(section))
    objects = render(helm, "-f", str(values))
    (spec,) = [spec for _, meta, spec in pod_specs(objects) if meta["labels"]["app.kubernetes.io/component"] == component]
    assert spec["affinity"] == {"podAntiAffinity": own}


def test_minimal_install_has_one_broker_node(minimal):
    broker = one(minimal, "StatefulSet", BROKER)
    assert broker["spec"]["replicas"] == 1
    assert not [o for o in minimal if o["kind"] == "PodDisruptionBudget"]  # one node, one server: nothing to keep up
    config = one(minimal, "ConfigMap", BROKER)["data"]["rabbitmq.conf"]
    assert "cluster_formation.classic_config.nodes.2" not in config and "pause_minority" not in config
    for role, container, _, _ in role_containers(minimal):
        assert env_of(container)["SPLITFED_QUEUE_TYPE"]["value"] == "classic", role


def test_minimal_install_urls_name_the_service_only(helm):
    objects = render(helm, "--set", "broker.rabbitmq.replicas=1,broker.rabbitmq.auth.password=pw")
    url = base64.b64decode(one(objects, "Secret", BROKER)["data"]["url"]).decode()
    assert url == f"amqp://splitfed:pw@{BROKER}:5672/%2F"  # one node: the Service is its address


def test_urls_with_an_existing_credentials_secret_list_every_node(helm):
    objects = render(helm, "--set", "broker.rabbitmq.auth.existingSecret=rabbitmq-credentials")
    hosts = [f"{BROKER}-{n}.{HEADLESS}" for n in range(3)] + [BROKER]
    for role, container, spec, _ in role_containers(objects):
        env = env_of(container)
        assert env["SPLITFED_BROKER"]["value"] == ",".join(f"amqp://{h}:5672/%2F" for h in hosts)  # the credentials are files
        assert env["SPLITFED_BROKER_CREDENTIALS"]["value"] == "/etc/splitfed/broker"
        (volume,) = [v for v in spec["volumes"] if v["name"] == "broker-credentials"]
        assert volume["secret"]["secretName"] == "rabbitmq-credentials"


def test_broker_peers_may_reach_each_other(default, helm):
    policy = one(default, "NetworkPolicy", BROKER)
    peers = [rule for rule in policy["spec"]["ingress"] if {p["port"] for p in rule["ports"]} == {4369, 25672}]
    assert peers == [{"from": [{"podSelector": {"matchLabels": {**SELECTOR, "app.kubernetes.io/component": "broker"}}}],
                      "ports": [{"port": 4369, "protocol": "TCP"}, {"port": 25672, "protocol": "TCP"}]}]
    single = one(render(helm, "--set", "broker.rabbitmq.replicas=1"), "NetworkPolicy", BROKER)
    assert not [rule for rule in single["spec"]["ingress"] if any(p["port"] == 4369 for p in rule["ports"])]


def test_cluster_domain_names_the_nodes(helm):
    objects = render(helm, "--set", "clusterDomain=k8s.example.org", "--namespace", "fl")
    config = one(objects, "ConfigMap", BROKER)["data"]["rabbitmq.conf"]
    assert f"nodes.1 = rabbit@{BROKER}-0.{HEADLESS}.fl.svc.k8s.example.org" in config


# -- queue type ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(VALUES))
def test_queue_type_reaches_every_role_pod_and_the_helm_test(helm, name):
    objects = render(helm, "-f", str(VALUES[name]))
    values = yaml.safe_load(VALUES[name].read_text()) or {}
    own = not values.get("broker", {}).get("external", {}).get("enabled")
    nodes = values.get("broker", {}).get("rabbitmq", {}).get("replicas", 3)
    expected = "quorum" if own and nodes >= 3 else "classic"
    pods = 0
    for obj, _, spec in pod_specs(objects):
        if obj["kind"] == "StatefulSet" and obj["metadata"]["name"] == BROKER:
            continue
        (container,) = spec["containers"]
        assert env_of(container)["SPLITFED_QUEUE_TYPE"]["value"] == expected, obj["metadata"]["name"]
        pods += 1
    assert pods >= 2


@pytest.mark.parametrize("values, expected", [
    ("queueType=classic", "classic"),
    ("broker.rabbitmq.replicas=2", "classic"),  # two nodes: no majority survives a loss
    ("broker.rabbitmq.replicas=5", "quorum"),
    ("broker.rabbitmq.replicas=1,queueType=quorum", "quorum"),
])
def test_queue_type_follows_the_broker_unless_given(helm, values, expected):
    objects = render(helm, "--set", values)
    assert {env_of(c)["SPLITFED_QUEUE_TYPE"]["value"] for _, c, _, _ in role_containers(objects)} == {expected}


def test_external_broker_queue_type_is_given(helm):
    base = ["-f", str(VALUES["external-tls-broker"])]
    assert {env_of(c)["SPLITFED_QUEUE_TYPE"]["value"] for _, c, _, _ in role_containers(render(helm, *base))} == {"classic"}
    quorum = render(helm, *base, "--set", "queueType=quorum")
    assert {env_of(c)["SPLITFED_QUEUE_TYPE"]["value"] for _, c, _, _ in role_containers(quorum)} == {"quorum"}


@pytest.mark.broker
def test_helm_test_tries_every_address_with_the_queue_type(default, broker_url, tmp_path):
    """The helm test pod's script, run here as the pod would run it: its broker file names this
    machine's RabbitMQ twice (two nodes' addresses), and it declares a queue on each."""
    (test_pod,) = [o for o in default if o["kind"] == "Pod"]
    container = test_pod["spec"]["containers"][0]
    env = {variable["name"]: variable["value"] for variable in container["env"]}
    broker_file = tmp_path / "url"
    broker_file.write_text(f"{broker_url},{broker_url}\n")
    env.update(SPLITFED_BROKER_FILE=str(broker_file), SPLITFED_QUEUE_TYPE="classic", PATH="/usr/bin:/bin", PYTHONPATH=str(REPO / "services"))
    done = subprocess.run([sys.executable, "-c", container["args"][0]], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("answers (classic queue declared)") == 2 and "guest" not in done.stdout, done.stdout


# -- the fedavg-server: active + standby --------------------------------------------------------


def test_default_server_is_active_and_standby_on_shared_checkpoints(default):
    job = one(default, "Job", f"{RELEASE}-splitfed-fedavg-server")
    assert job["spec"]["parallelism"] == 2
    assert "completions" not in job["spec"]  # one pod's success completes the run; the standby then ends too
    pod = job["spec"]["template"]["spec"]
    assert pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"] == spread_term("fedavg-server")
    claim = one(default, "PersistentVolumeClaim", f"{RELEASE}-splitfed-fedavg-server-checkpoint")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # the standby, on another node, reads what the active one writes
    (volume,) = [v for v in pod["volumes"] if v["name"] == "checkpoint"]
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    (container,) = pod["containers"]
    assert {"name": "checkpoint", "mountPath": "/var/lib/splitfed/checkpoint"} in container["volumeMounts"]
    assert env_of(container)["SPLITFED_CHECKPOINT_DIR"]["value"] == "/var/lib/splitfed/checkpoint"
    budget = one(default, "PodDisruptionBudget", f"{RELEASE}-splitfed-fedavg-server")
    assert budget["spec"] == {"minAvailable": 1, "selector": {"matchLabels": {**SELECTOR, "app.kubernetes.io/component": "fedavg-server"}}}


def test_one_server_has_a_read_write_once_claim_and_no_budget(helm, tmp_path):
    objects = render(helm, "--set", "fedavgServer.replicas=1")
    assert one(objects, "PersistentVolumeClaim", f"{RELEASE}-splitfed-fedavg-server-checkpoint")["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert not named(objects, "PodDisruptionBudget", f"{RELEASE}-splitfed-fedavg-server")
    assert one(objects, "Job", f"{RELEASE}-splitfed-fedavg-server")["spec"]["parallelism"] == 1
    validate(objects, tmp_path)


def test_checkpoint_claim_values(helm, tmp_path):
    objects = render(helm, "--set", "fedavgServer.persistence.storageClass=nfs,fedavgServer.persistence.size=5Gi",
                     "--set", "fedavgServer.persistence.accessModes={ReadWriteMany,ReadWriteOnce}")
    claim = one(objects, "PersistentVolumeClaim", f"{RELEASE}-splitfed-fedavg-server-checkpoint")
    assert claim["spec"]["storageClassName"] == "nfs"
    assert claim["spec"]["resources"]["requests"]["storage"] == "5Gi"
    assert claim["spec"]["accessModes"] == ["ReadWriteMany", "ReadWriteOnce"]
    existing = render(helm, "--set", "fedavgServer.persistence.existingClaim=shared-checkpoints")
    assert not [o for o in existing if o["kind"] == "PersistentVolumeClaim"]
    (server,) = [spec for role, _, spec, _ in role_containers(existing) if role == "fedavg-server"]
    (volume,) = [v for v in server["volumes"] if v["name"] == "checkpoint"]
    assert volume["persistentVolumeClaim"]["claimName"] == "shared-checkpoints"
    validate(existing, tmp_path)


def test_no_server_renders_no_server_objects(helm):
    objects = render(helm, "--set", "fedavgServer.enabled=false")
    assert not [o for o in objects if "fedavg-server" in o["metadata"]["name"]]


def test_high_availability_renders_validate(helm, tmp_path):
    """Renders beside ci/chart-values/: five nodes with required spreading, one server with a
    given claim, an external broker with quorum queues."""
    objects = render(helm, "--set", "broker.rabbitmq.replicas=5,broker.rabbitmq.antiAffinity=required,fedavgServer.antiAffinity=required")
    assert one(objects, "StatefulSet", BROKER)["spec"]["replicas"] == 5
    validate(objects, tmp_path)
