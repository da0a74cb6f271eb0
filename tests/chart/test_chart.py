"""The Helm chart (helm/splitfed), rendered with every values file in ci/chart-values/ by a real
helm 3.19 (installed by `ci/chart.sh install` when missing) and checked object by object: labels
and selectors, resources, pod security, GPU wiring, secrets, and that every SPLITFED_* variable a
role gets is an option of that role."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import yaml

from splitfed.roles.registry import ROLES
from tests.conftest import CHART, REPO, RELEASE, helm_template, render

VALUES = sorted((REPO / "ci" / "chart-values").glob("*.yaml"))
VALUE_NAMES = [path.stem for path in VALUES]

ROLE_NAMES = set(ROLES)
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "Job", "DaemonSet"}
NAME_LABELS = ("app.kubernetes.io/name", "app.kubernetes.io/instance")
ALL_LABELS = (*NAME_LABELS, "app.kubernetes.io/version", "app.kubernetes.io/component",
              "app.kubernetes.io/managed-by", "app.kubernetes.io/part-of", "helm.sh/chart")
# Memory per role (requests, limits), as ci/measure_memory.py measured them.
MEMORY = {"split-client": ("608Mi", "736Mi"), "split-server": ("352Mi", "448Mi"), "fedavg-server": ("448Mi", "576Mi"),
          "fedavg-worker": ("448Mi", "544Mi"), "relay": ("96Mi", "96Mi"), "split-fed": ("96Mi", "128Mi"),
          "p2p-tracker": ("96Mi", "96Mi"), "p2p-peer": ("608Mi", "768Mi"), "smpl-peer": ("640Mi", "800Mi")}
# Several split clients with the fed (splitfed-v2, the declared default schedule).
SEVERAL_CLIENTS = "splitClient.enabled=true,splitClient.replicas=3,splitServer.enabled=true,splitFed.enabled=true"


@pytest.fixture(scope="session")
def rendered(helm) -> dict[str, list[dict]]:
    return {path.stem: render(helm, "-f", str(path)) for path in VALUES}


def pod_specs(objects: list[dict]):
    """(object, pod template metadata, pod spec) of every workload and bare pod."""
    for obj in objects:
        if obj["kind"] in WORKLOAD_KINDS:
            template = obj["spec"]["template"]
            yield obj, template["metadata"], template["spec"]
        elif obj["kind"] == "Pod":
            yield obj, obj["metadata"], obj["spec"]


def role_containers(objects: list[dict]):
    """(role, container, pod spec, workload) for each role's main container."""
    for obj, meta, spec in pod_specs(objects):
        role = meta["labels"]["app.kubernetes.io/component"]
        if role in ROLE_NAMES:
            (container,) = [c for c in spec["containers"] if c["name"] == role]
            yield role, container, spec, obj


def env_of(container: dict) -> dict[str, dict]:
    return {entry["name"]: entry for entry in container.get("env", [])}


def test_every_scenario_file_is_there():
    assert set(VALUE_NAMES) >= {"default", "gpu", "external-tls-broker", "all-roles", "minimal", "split", "splitnn", "p2p", "smpl",
                                "private-fedavg"}


def test_values_schema_matches_the_role_declarations():
    result = subprocess.run([sys.executable, str(REPO / "ci" / "chart_schema.py"), "--check"], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "services"), os.environ.get("PYTHONPATH", "")])})
    assert result.returncode == 0, result.stderr


def test_chart_app_version_is_the_package_version():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    version = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)
    assert chart["apiVersion"] == "v2"
    assert chart["appVersion"] == version


def test_default_values_render_a_small_fedavg_run(rendered):
    kinds = sorted((obj["kind"], obj["metadata"]["name"]) for obj in rendered["default"])
    assert kinds == sorted([
        ("ConfigMap", "ci-splitfed-broker"),
        ("Job", "ci-splitfed-fedavg-server"),
        ("NetworkPolicy", "ci-splitfed-broker"),
        ("NetworkPolicy", "ci-splitfed-roles"),
        ("PersistentVolumeClaim", "ci-splitfed-fedavg-server-checkpoint"),
        ("Pod", "ci-splitfed-broker-test"),
        ("PodDisruptionBudget", "ci-splitfed-broker"),
        ("PodDisruptionBudget", "ci-splitfed-fedavg-server"),
        ("Secret", "ci-splitfed-broker"),
        ("Secret", "ci-splitfed-broker-erlang-cookie"),
        ("Service", "ci-splitfed-broker"),
        ("Service", "ci-splitfed-broker-headless"),
        ("Service", "ci-splitfed-fedavg-worker"),
        ("ServiceAccount", "ci-splitfed"),
        ("StatefulSet", "ci-splitfed-broker"),
        ("StatefulSet", "ci-splitfed-fedavg-worker"),
    ])
    (workers,) = [o for o in rendered["default"] if o["kind"] == "StatefulSet" and "worker" in o["metadata"]["name"]]
    assert workers["spec"]["replicas"] == 3


def test_split_values_turn_on_the_split_roles_only(rendered):
    roles = {role for role, *_ in role_containers(rendered["split"])}
    assert roles == {"relay", "split-client", "split-server"}
    for role, container, _, _ in role_containers(rendered["split"]):
        if role != "relay":
            assert env_of(container)["SPLITFED_VIA"]["value"] == "relay"


@pytest.mark.parametrize("name", VALUE_NAMES)
def test_labels_and_selectors(rendered, name):
    for obj in rendered[name]:
        labels = obj["metadata"].get("labels", {})
        missing = [label for label in ALL_LABELS if label not in labels]
        assert not missing, f"{obj['kind']}/{obj['metadata']['name']} lacks {missing}"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        if obj["kind"] in WORKLOAD_KINDS - {"Job"}:
            selector = obj["spec"]["selector"]["matchLabels"]
            pod_labels = obj["spec"]["template"]["metadata"]["labels"]
            assert set(selector) == {*NAME_LABELS, "app.kubernetes.io/component"}
            assert selector.items() <= pod_labels.items(), f"{obj['metadata']['name']}: selector not in pod labels"
        if obj["kind"] in ("Service", "PodDisruptionBudget"):
            selector = obj["spec"]["selector"]
            selector = selector["matchLabels"] if obj["kind"] == "PodDisruptionBudget" else selector
            assert set(selector) == {*NAME_LABELS, "app.kubernetes.io/component"}
            matched = [o for o in rendered[name] if o["kind"] in WORKLOAD_KINDS
                       and selector.items() <= o["spec"]["template"]["metadata"]["labels"].items()]
            assert len(matched) == 1, f"{obj['kind']} {obj['metadata']['name']} selects {len(matched)} workloads"


@pytest.mark.parametrize("name", VALUE_NAMES)
def test_every_container_has_memory_requests_and_limits(rendered, name):
    for obj, _, spec in pod_specs(rendered[name]):
        for container in spec["containers"] + spec.get("initContainers", []):
            resources = container.get("resources", {})
            assert resources.get("requests", {}).get("memory"), f"{obj['metadata']['name']}/{container['name']}: no memory request"
            assert resources.get("limits", {}).get("memory"), f"{obj['metadata']['name']}/{container['name']}: no memory limit"


def test_role_memory_defaults(helm):
    objects = render(helm, "--set", "relay.enabled=true,splitClient.enabled=true,splitServer.enabled=true")
    objects += [o for o in render(helm, "--set", SEVERAL_CLIENTS) if o["metadata"]["name"].endswith("split-fed")]
    objects += render(helm, "--set", "fedavgServer.enabled=false,fedavgWorker.enabled=false,p2pTracker.enabled=true,p2pPeer.enabled=true")
    objects += [o for o in render(helm, "--set", "p2pTracker.enabled=true,smplPeer.enabled=true") if o["metadata"]["name"].endswith("smpl-peer")]
    seen = set()
    for role, container, _, _ in role_containers(objects):
        resources = container["resources"]
        assert (resources["requests"]["memory"], resources["limits"]["memory"]) == MEMORY[role], role
        seen.add(role)
    assert seen == ROLE_NAMES


@pytest.mark.parametrize("name", VALUE_NAMES)
def test_pod_security(rendered, name):
    for obj, meta, spec in pod_specs(rendered[name]):
        where = obj["metadata"]["name"]
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True, where
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert spec["automountServiceAccountToken"] is False, where
        tmp = {v["name"] for v in spec["volumes"] if v["name"] == "tmp" and v.get("emptyDir") == {}}
        assert tmp, f"{where}: no emptyDir for /tmp"
        for container in spec["containers"] + spec.get("initContainers", []):
            context = container["securityContext"]
            assert context["runAsNonRoot"] is True, where
            assert context["readOnlyRootFilesystem"] is True, where
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["capabilities"] == {"drop": ["ALL"]}, where
            assert context["seccompProfile"] == {"type": "RuntimeDefault"}, where
            assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"], where
            # uids below 10000 may be a host's own users (the rabbitmq image's is 999)
            assert context["runAsUser"] >= 10000 and pod["runAsUser"] >= 10000 and pod["runAsGroup"] >= 10000, where
            if meta["labels"]["app.kubernetes.io/component"] != "broker":
                assert context["runAsUser"] == 10001 and pod["runAsUser"] == 10001, where
        # Secret volumes are mode 0440: without fsGroup the non-root user could not read its keys or
        # credentials, nor write its checkpoint volume.
        assert pod["fsGroup"] == pod["runAsGroup"], where
        for volume in spec["volumes"]:
            if "secret" in volume:
                assert volume["secret"]["defaultMode"] == 0o440, (where, volume["name"])


def test_gpu_wiring(rendered):
    gpu_roles = 0
    for role, container, spec, _ in role_containers(rendered["gpu"]):
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1", role
        assert spec["nodeSelector"]["nvidia.com/gpu.present"] == "true", role
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"], role
        assert container["image"].endswith(":0.1.0-cuda"), container["image"]
        assert env_of(container)["SPLITFED_DEVICE"]["value"] == "cuda", role
        gpu_roles += 1
    assert gpu_roles == 2
    for role, container, spec, _ in role_containers(rendered["default"]):
        assert "nvidia.com/gpu" not in container["resources"].get("limits", {}), role
        assert "nodeSelector" not in spec and "tolerations" not in spec, role
        assert not container["image"].endswith("-cuda"), role
        assert "SPLITFED_DEVICE" not in env_of(container), role  # the role's default: auto


def test_a_gpu_roles_own_device_wins_and_its_familys_does_not(helm):
    """gpu.enabled makes the role's device cuda over the family's shared settings (which reach roles
    without a GPU too); the role's own settings still choose."""
    objects = render(helm, "--set", "fedavg.settings.device=cpu,fedavgServer.gpu.enabled=true,"
                                    "fedavgWorker.gpu.enabled=true,fedavgWorker.settings.device=cuda:1")
    devices = {role: env_of(container)["SPLITFED_DEVICE"]["value"] for role, container, _, _ in role_containers(objects)}
    assert devices == {"fedavg-server": "cuda", "fedavg-worker": "cuda:1"}
    objects = render(helm, "--set", "fedavg.settings.device=cpu,fedavgWorker.gpu.enabled=true")
    devices = {role: env_of(container)["SPLITFED_DEVICE"]["value"] for role, container, _, _ in role_containers(objects)}
    assert devices == {"fedavg-server": "cpu", "fedavg-worker": "cuda"}


def test_gpu_roles_memory_holds_the_cuda_builds_estimate():
    """A role with gpu.enabled runs the CUDA build, which imports ~300 MiB more than the CPU one:
    the example values give such a role the memory `splitfed size ROLE --gpu` estimates, as launch
    checks it (sizing.check_values sizes a GPU role with the CUDA build)."""
    from splitfed import sizing
    from splitfed.cluster.values import ROLE_KEYS, merged

    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    checked, short = set(), []
    for path in VALUES:
        values = merged(defaults, yaml.safe_load(path.read_text()))
        gpu_roles = {role for role, key in ROLE_KEYS.items() if values[key].get("enabled") and (values[key].get("gpu") or {}).get("enabled")}
        short += [f"{path.name}: {warning}" for warning in sizing.check_values(values) if warning.split(":", 1)[0] in gpu_roles]
        checked |= {(path.stem, role) for role in gpu_roles}
    assert not short, short
    assert {("gpu", "fedavg-server"), ("gpu", "fedavg-worker"), ("all-roles", "split-client")} <= checked


def test_gpu_count_and_own_scheduling_settings_combine(rendered):
    (client,) = [c for role, c, _, _ in role_containers(rendered["all-roles"]) if role == "split-client"]
    assert client["resources"]["limits"]["nvidia.com/gpu"] == "2"
    (spec,) = [s for role, _, s, _ in role_containers(rendered["all-roles"]) if role == "fedavg-worker"]
    assert spec["nodeSelector"] == {"splitfed.io/site": "edge"}  # no GPU: no GPU selector added


@pytest.mark.parametrize("name", VALUE_NAMES)
def test_role_env_is_accepted_by_the_role(rendered, name):
    roles = 0
    for role, container, _, workload in role_containers(rendered[name]):
        env = env_of(container)
        splitfed_vars = {n for n in env if n.startswith("SPLITFED_")}
        unknown = splitfed_vars - ROLES[role].env_names()
        assert not unknown, f"{role} does not accept {sorted(unknown)}"
        assert {"SPLITFED_SESSION", "SPLITFED_METRICS_PORT"} <= splitfed_vars, role
        assert {"SPLITFED_BROKER_FILE"} <= splitfed_vars or {"SPLITFED_BROKER", "SPLITFED_BROKER_CREDENTIALS"} <= splitfed_vars, role
        assert env["SPLITFED_SESSION"]["value"] == RELEASE
        assert env["SPLITFED_METRICS_PORT"]["value"] == str(container["ports"][0]["containerPort"])
        if role == "fedavg-worker":
            assert env["SPLITFED_WORKER_ID"]["value"] == "worker-$(SPLITFED_INDEX)"  # as `keys generate --workers N` names them
            assert env["SPLITFED_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['apps.kubernetes.io/pod-index']"
        if role in ("p2p-peer", "smpl-peer"):  # the completion index of an Indexed Job, the ordinal of a StatefulSet
            index = {"Job": "metadata.annotations['batch.kubernetes.io/job-completion-index']",
                     "StatefulSet": "metadata.labels['apps.kubernetes.io/pod-index']"}[workload["kind"]]
            assert env["SPLITFED_PEER_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"] == index
        roles += 1
    assert roles > 0


@pytest.mark.parametrize("name", VALUE_NAMES)
def test_server_waits_for_as_many_workers_as_there_are(rendered, name):
    containers = {role: (c, obj) for role, c, _, obj in role_containers(rendered[name])}
    if "fedavg-server" in containers:
        server, _ = containers["fedavg-server"]
        _, workers = containers["fedavg-worker"]
        assert env_of(server)["SPLITFED_WORKERS"]["value"] == str(workers["spec"]["replicas"])


def test_settings_become_env_vars(rendered):
    env = {role: env_of(c) for role, c, _, _ in role_containers(rendered["all-roles"])}
    assert env["fedavg-server"]["SPLITFED_ROUNDS"]["value"] == "20"
    assert env["fedavg-server"]["SPLITFED_STRATEGY"]["value"] == "median"
    assert env["fedavg-worker"]["SPLITFED_PARTITION"]["value"] == "iid"  # shared fedavg settings
    assert env["fedavg-server"]["SPLITFED_PARTITION"]["value"] == "iid"
    assert env["fedavg-worker"]["SPLITFED_CHUNK_SIZE"]["value"] == "16777216"  # no 1.6777216e+07
    assert env["split-server"]["SPLITFED_CUT_LAYER"]["value"] == "3"
    assert env["relay"]["SPLITFED_LOG_LEVEL"]["value"] == "debug"
    assert "SPLITFED_KEY_LIST" in env["relay"] and "SPLITFED_PRIVATE_KEY" not in env["relay"]
    assert env["fedavg-worker"]["SPLITFED_PRIVATE_KEY"]["value"] == "/etc/splitfed/keys/$(SPLITFED_WORKER_ID).key"
    assert env["split-client"]["SPLITFED_PRIVATE_KEY"]["value"] == "/etc/splitfed/keys/split-client.key"


def credentials_in_url(text: str) -> bool:
    """amqp(s)://user:pass@ with literal credentials in any URL of a list ($(VAR) references are not credentials)."""
    return any(re.fullmatch(r"\$\([A-Z_]+\):\$\([A-Z_]+\)", match.group(1)) is None
               for match in re.finditer(r"amqps?://([^@/,]*)@", text))


@pytest.mark.parametrize("name", VALUE_NAMES)
def test_no_plain_text_secrets(rendered, name):
    """No credential in any value, no password variable; the broker's credentials are read from a
    mounted Secret volume (a file, or a folder of username and password)."""
    checked = 0
    for obj, _, spec in pod_specs(rendered[name]):
        where = obj["metadata"]["name"]
        secret_volumes = {volume["name"] for volume in spec["volumes"] if "secret" in volume}
        for container in spec["containers"] + spec.get("initContainers", []):
            env = env_of(container)
            for var, entry in env.items():
                assert not credentials_in_url(entry.get("value", "")), f"{where}: {var} has credentials in plain text"
                assert not re.search(r"PASS|PASSWORD|SECRET|COOKIE", var), f"{where}: {var} names a secret"
            for var in ("SPLITFED_BROKER_FILE", "SPLITFED_BROKER_CREDENTIALS"):
                if var in env:
                    path = env[var]["value"]
                    mounts = [m for m in container["volumeMounts"] if path == m["mountPath"] or path.startswith(m["mountPath"] + "/")]
                    assert [m["name"] for m in mounts] == ["broker-credentials"] and "broker-credentials" in secret_volumes, (where, var)
                    checked += 1
    assert checked > 0


def test_a_given_password_is_only_in_the_secret(helm):
    password = "Given-Pa55word"
    objects = render(helm, "--set", f"broker.rabbitmq.auth.password={password}")
    holders = [o for o in objects if password in yaml.safe_dump(o)]
    assert holders == []  # not even in the Secret: Secret data is base64
    (secret,) = [o for o in objects if o["kind"] == "Secret" and o["metadata"]["name"] == "ci-splitfed-broker"]
    import base64
    assert base64.b64decode(secret["data"]["password"]).decode() == password
    # every node of the cluster by its own name, then the Service
    assert base64.b64decode(secret["data"]["url"]).decode().split(",") == [
        *(f"amqp://splitfed:{password}@ci-splitfed-broker-{n}.ci-splitfed-broker-headless:5672/%2F" for n in range(3)),
        f"amqp://splitfed:{password}@ci-splitfed-broker:5672/%2F"]


def test_external_tls_broker(rendered):
    objects = rendered["external-tls-broker"]
    assert not [o for o in objects if o["metadata"]["name"].endswith("-broker")]  # no RabbitMQ of our own
    for role, container, spec, _ in role_containers(objects):
        env = env_of(container)
        assert env["SPLITFED_BROKER"]["value"] == "amqps://rabbitmq.example.internal:5671/splitfed"  # no credentials: they are files
        assert env["SPLITFED_BROKER_CREDENTIALS"]["value"] == "/etc/splitfed/broker"
        (credentials,) = [v for v in spec["volumes"] if v["name"] == "broker-credentials"]
        assert credentials["secret"] == {"secretName": "rabbitmq-credentials", "defaultMode": 0o440, "items": [
            {"key": "username", "path": "username"}, {"key": "password", "path": "password"}]}
        assert {"name": "broker-credentials", "mountPath": "/etc/splitfed/broker", "readOnly": True} in container["volumeMounts"]
        assert env["SPLITFED_TLS_CA"]["value"] == "/etc/splitfed/tls/ca.crt"
        assert env["SPLITFED_TLS_KEY"]["value"] == "/etc/splitfed/tls/tls.key"
        (tls,) = [v for v in spec["volumes"] if v["name"] == "broker-tls"]
        assert tls["secret"]["secretName"] == "rabbitmq-client-tls"
        assert {"name": "broker-tls", "mountPath": "/etc/splitfed/tls", "readOnly": True} in container["volumeMounts"]


def test_own_rabbitmq(rendered):
    (broker,) = [o for o in rendered["default"] if o["kind"] == "StatefulSet" and o["metadata"]["name"] == "ci-splitfed-broker"]
    assert broker["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    (config,) = [o for o in rendered["default"] if o["kind"] == "ConfigMap"]
    assert "rabbitmq_prometheus" in config["data"]["enabled_plugins"]
    pod = broker["spec"]["template"]["spec"]
    env = env_of(pod["containers"][0])
    assert "RABBITMQ_DEFAULT_PASS" not in env and env["RABBITMQ_CONFIG_FILES"]["value"] == "/etc/rabbitmq-credentials.d"
    (credentials,) = [v for v in pod["volumes"] if v["name"] == "credentials"]
    assert credentials["secret"]["secretName"] == "ci-splitfed-broker"
    for role, container, spec, _ in role_containers(rendered["default"]):  # the roles read the Secret's URL list as a file
        assert env_of(container)["SPLITFED_BROKER_FILE"]["value"] == "/etc/splitfed/broker/url", role
        (volume,) = [v for v in spec["volumes"] if v["name"] == "broker-credentials"]
        assert volume["secret"]["secretName"] == "ci-splitfed-broker" and volume["secret"]["items"] == [{"key": "url", "path": "url"}], role


@pytest.mark.parametrize("name", VALUE_NAMES)
def test_no_container_is_given_a_secret_as_an_environment_value(rendered, name):
    """Environment values show in /proc/PID/environ, crash reports and scanners' findings: every
    credential, key and cookie the chart hands a container is a mounted file."""
    for obj, _, spec in pod_specs(rendered[name]):
        for container in spec["containers"] + spec.get("initContainers", []):
            for variable in container.get("env", []):
                assert "secretKeyRef" not in variable.get("valueFrom", {}), (obj["metadata"]["name"], variable["name"])
            assert not container.get("envFrom"), obj["metadata"]["name"]


def test_run_to_completion_roles_are_jobs(rendered):
    kinds: dict[str, set[str]] = {}
    for name in rendered:
        for role, _, _, obj in role_containers(rendered[name]):
            kinds.setdefault(role, set()).add(obj["kind"])
    # The tracker is a Job where it ends (expect-peers: p2p.yaml), a Deployment where it serves
    # until uninstalled (smpl.yaml, all-roles.yaml); its peers follow: an Indexed Job, a StatefulSet.
    assert kinds == {"fedavg-server": {"Job"}, "split-client": {"Job"}, "split-server": {"Job"}, "split-fed": {"Job"},
                     "fedavg-worker": {"StatefulSet"}, "relay": {"Deployment"}, "p2p-tracker": {"Job", "Deployment"},
                     "p2p-peer": {"Job", "StatefulSet"}, "smpl-peer": {"StatefulSet"}}
    for name in rendered:
        for obj, _, spec in pod_specs(rendered[name]):
            if obj["kind"] == "Job":
                assert spec["restartPolicy"] in ("OnFailure", "Never")


@pytest.mark.parametrize("name", VALUE_NAMES)
def test_probes_use_the_metrics_port(rendered, name):
    for role, container, _, _ in role_containers(rendered[name]):
        for probe in ("readinessProbe", "livenessProbe"):
            if probe in container:
                assert container[probe]["httpGet"] == {"path": "/metrics", "port": "metrics"}, role
    if name == "default":
        assert all("livenessProbe" in c for _, c, _, _ in role_containers(rendered[name]))


def test_network_policy_lets_roles_reach_only_the_broker_and_dns(rendered):
    (policy,) = [o for o in rendered["default"] if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == "ci-splitfed-roles"]
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    egress = policy["spec"]["egress"]
    assert egress[0] == {"ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]}
    assert egress[1]["to"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "splitfed", "app.kubernetes.io/instance": RELEASE,
                                                                 "app.kubernetes.io/component": "broker"}}}]
    assert egress[1]["ports"] == [{"port": 5672, "protocol": "TCP"}]
    assert len(egress) == 2
    assert policy["spec"]["ingress"] == [{"ports": [{"port": "metrics", "protocol": "TCP"}]}]
    assert policy["spec"]["podSelector"]["matchExpressions"][0]["values"] == ["fedavg-server", "fedavg-worker"]
    assert not [o for o in rendered["minimal"] if o["kind"] == "NetworkPolicy"]


def test_monitors_only_when_asked(rendered):
    assert not [o for o in rendered["default"] if o["apiVersion"] == "monitoring.coreos.com/v1"]
    monitors = {o["kind"]: o for o in rendered["all-roles"] if o["apiVersion"] == "monitoring.coreos.com/v1"}
    assert set(monitors) == {"PodMonitor", "ServiceMonitor", "PrometheusRule"}
    assert monitors["PodMonitor"]["metadata"]["labels"]["release"] == "prometheus"
    (endpoint,) = monitors["PodMonitor"]["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics"
    # the alert rules find the parties by up{job="splitfed"}, whatever the PodMonitor is called
    assert {"action": "replace", "targetLabel": "job", "replacement": "splitfed"} in endpoint["relabelings"]


def test_broker_monitor_scrapes_the_per_queue_metrics(rendered):
    (monitor,) = [o for o in rendered["all-roles"] if o["kind"] == "ServiceMonitor"]
    plain, detailed = monitor["spec"]["endpoints"]
    assert (plain["port"], plain["path"]) == ("metrics", "/metrics")
    assert (detailed["port"], detailed["path"]) == ("metrics", "/metrics/detailed")
    assert detailed["params"] == {"family": ["queue_coarse_metrics", "queue_consumer_count"]}
    # the two targets share an address: a label keeps their up series apart
    assert detailed["relabelings"] == [{"action": "replace", "sourceLabels": ["__metrics_path__"], "targetLabel": "metrics_path"}]


# -- Grafana dashboards and alert rules ----------------------------------------------------------

DASHBOARD_FILES = sorted((CHART / "files" / "dashboards").glob("*.json"))
RULES_FILE = CHART / "files" / "alerts" / "splitfed.rules.yaml"


def dashboard_maps(objects: list[dict], label: str = "grafana_dashboard") -> list[dict]:
    return [o for o in objects if o["kind"] == "ConfigMap" and label in o["metadata"].get("labels", {})]


def test_there_are_dashboards():
    assert DASHBOARD_FILES, "helm/splitfed/files/dashboards/ holds no *.json"


def test_the_dashboards_show_every_metric_splitfed_exports_and_no_other():
    """Every splitfed_* name in a panel's query or a template variable is one splitfed exports (a
    typo shows as an empty panel, and only tests/observability's real Prometheus would notice),
    and every metric of observability/metrics.py is on a dashboard."""
    from prometheus_client.metrics import MetricWrapperBase

    from splitfed.observability import metrics

    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
    exposed = {metric._name: {metric._name + suffix for suffix in suffixes[metric._type]}
               for metric in vars(metrics).values() if isinstance(metric, MetricWrapperBase)}
    used = set()
    for path in DASHBOARD_FILES:
        board = json.loads(path.read_text())
        queries = [target["expr"] for panel in board["panels"] for target in panel["targets"]]
        queries += [variable["query"]["query"] for variable in board["templating"]["list"] if variable["type"] == "query"]
        used |= {name for query in queries for name in re.findall(r"\bsplitfed_[a-z_]+", query)}
    unknown = used - set().union(*exposed.values())
    assert used and not unknown, f"not exported by splitfed: {sorted(unknown)}"
    unshown = sorted(name for name, names in exposed.items() if not names & used)
    assert not unshown, f"exported but on no dashboard: {unshown}"


def test_every_dashboard_is_a_configmap_of_its_own(rendered):
    maps = dashboard_maps(rendered["all-roles"])
    assert len(maps) == len(DASHBOARD_FILES)
    by_file = {}
    for config in maps:
        (file,) = config["data"]
        by_file[file] = config
    assert sorted(by_file) == [path.name for path in DASHBOARD_FILES]
    for path in DASHBOARD_FILES:
        config = by_file[path.name]
        meta = config["metadata"]
        assert meta["name"] == f"{RELEASE}-splitfed-dashboard-{path.stem}"
        assert meta["labels"]["grafana_dashboard"] == "1"
        assert meta["labels"]["app.kubernetes.io/component"] == "monitoring"
        assert meta["annotations"] == {"grafana_folder": "splitfed"}
        assert "namespace" not in meta
        text = config["data"][path.name]
        assert json.loads(text) == json.loads(path.read_text()), f"{path.name} changed on its way into the ConfigMap"
        assert text == path.read_text().rstrip("\n")  # byte for byte: Grafana's {{ legend }} formats untouched


def test_dashboard_label_folder_and_namespace_are_values(helm):
    objects = render(helm, "--set", "metrics.dashboards.enabled=true,metrics.dashboards.label=example.com/dashboard,"
                     "metrics.dashboards.labelValue=splitfed,metrics.dashboards.namespace=monitoring")
    maps = dashboard_maps(objects, "example.com/dashboard")
    assert len(maps) == len(DASHBOARD_FILES)
    for config in maps:
        assert config["metadata"]["labels"]["example.com/dashboard"] == "splitfed"
        assert "grafana_dashboard" not in config["metadata"]["labels"]
        assert config["metadata"]["namespace"] == "monitoring"
        assert "annotations" not in config["metadata"]


def test_prometheus_rule_is_the_rules_file(rendered):
    (rule,) = [o for o in rendered["all-roles"] if o["kind"] == "PrometheusRule"]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["name"] == f"{RELEASE}-splitfed-alerts"
    assert rule["metadata"]["labels"]["release"] == "prometheus"  # metrics.prometheusRule.labels
    assert rule["spec"] == {"groups": yaml.safe_load(RULES_FILE.read_text())["groups"]}
    annotations = [r["annotations"] for group in rule["spec"]["groups"] for r in group["rules"]]
    assert any("{{ $labels.session }}" in a["summary"] for a in annotations)  # not eaten by Helm's templating


def test_dashboards_and_alert_rules_only_when_asked(helm, rendered):
    for name, objects in rendered.items():
        if name != "all-roles":
            assert not dashboard_maps(objects), name
            assert not [o for o in objects if o["kind"] == "PrometheusRule"], name
    objects = render(helm, "-f", str(REPO / "ci" / "chart-values" / "all-roles.yaml"),
                     "--set", "metrics.dashboards.enabled=false,metrics.prometheusRule.enabled=false")
    assert not dashboard_maps(objects)
    assert not [o for o in objects if o["kind"] == "PrometheusRule"]
    assert {o["kind"] for o in objects} >= {"PodMonitor", "ServiceMonitor"}  # the monitors stay


def test_helm_test_checks_the_broker(rendered):
    (test_pod,) = [o for o in rendered["default"] if o["kind"] == "Pod"]
    assert test_pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert "connect(node, settings" in test_pod["spec"]["containers"][0]["args"][0]
    assert env_of(test_pod["spec"]["containers"][0])["SPLITFED_BROKER_FILE"]["value"] == "/etc/splitfed/broker/url"


@pytest.mark.parametrize(("values", "message"), [
    ("fedavgWorker.replica=3", "at '/fedavgWorker': additional properties 'replica' not allowed"),
    ("fedavgWorker.replicas=-1", "at '/fedavgWorker/replicas': minimum: got -1, want 0"),
    ("fedavgWorker.gpu.count=2", "at '/fedavgWorker/gpu/enabled': value must be true"),
    ("fedavg.settings.bogus=1", "at '/fedavg/settings': additional properties 'bogus' not allowed"),
    ("fedavgServer.settings.rounds=0", "at '/fedavgServer/settings/rounds': minimum"),
    ("fedavgServer.settings.queue-type=quorum", "at '/fedavgServer/settings': additional properties 'queue-type' not allowed"),
    ("splitServer.replicas=2", "at '/splitServer/replicas': maximum"),
    ("broker.external.enabled=true,broker.external.existingSecret=creds", "broker.external.enabled needs broker.external.host"),
    ("fedavgWorker.replicas=0", "fedavgServer.enabled needs fedavgWorker.replicas >= 1"),
    ("metrics.prometheusRule.enable=true", "at '/metrics/prometheusRule': additional properties 'enable' not allowed"),
    ("metrics.dashboards.namespace=Monitoring", "at '/metrics/dashboards/namespace'"),
    # high availability
    ("broker.rabbitmq.replicas=0", "at '/broker/rabbitmq/replicas': minimum: got 0, want 1"),
    ("broker.rabbitmq.replicas=three", "at '/broker/rabbitmq/replicas': got string, want integer"),
    ("queueType=bogus", "at '/queueType': value must be one of '', 'classic', 'quorum'"),
    ("fedavgServer.persistence.accessModes={junk}", "at '/fedavgServer/persistence/accessModes/0': value must be one of 'ReadWriteOnce', 'ReadWriteMany', 'ReadWriteOncePod'"),
    ("fedavgServer.persistence.accessModes={ReadOnlyMany}", "at '/fedavgServer/persistence/accessModes/0': value must be one of"),
    ("fedavgServer.persistence.accessModes=ReadWriteMany", "at '/fedavgServer/persistence/accessModes': got string, want array"),
    ("broker.rabbitmq.antiAffinity=sometimes", "at '/broker/rabbitmq/antiAffinity': value must be one of 'preferred', 'required', 'none'"),
    ("fedavgServer.antiAffinity=always", "at '/fedavgServer/antiAffinity': value must be one of"),
    ("fedavgServer.replicas=-1", "at '/fedavgServer/replicas': minimum: got -1, want 0"),
    ("clusterDomain=Cluster_Local", "at '/clusterDomain'"),
    ("fedavgServer.persistence.enabled=false", "fedavgServer.replicas > 1 needs fedavgServer.persistence.enabled"),
    ("fedavgServer.persistence.accessModes={ReadWriteOnce}", "fedavgServer.replicas > 1 needs ReadWriteMany in fedavgServer.persistence.accessModes"),
    # secure aggregation and differential privacy
    ("fedavg.settings.secure-aggregation=secagg", "at '/fedavg/settings/secure-aggregation': value must be one of 'none', 'secagg+'"),
    ("fedavg.settings.dp=gaussian", "at '/fedavg/settings/dp': value must be one of 'none', 'central', 'local', 'sample'"),
    ("fedavg.settings.dp-delta=1", "at '/fedavg/settings/dp-delta': maximum"),
])
def test_bad_values_fail_with_a_clear_message(helm, values, message):
    result = helm_template(helm, "--set", values)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


# Over ci/chart-values/splitnn.yaml: 3 clients on splitfed-v1 with the fed, min-clients 2.
@pytest.mark.parametrize(("values", "message"), [
    ("relay.enabled=true", "relay.enabled needs splitClient.replicas 1, not 3: the relay forwards the frames of one client"),
    ("splitClient.replicas=0", "at '/splitClient/replicas': minimum: got 0, want 1"),
    ("split.settings.schedule=bogus", "at '/split/settings/schedule': value must be one of 'round-robin', 'splitfed-v1', 'splitfed-v2'"),
    ("split.settings.clients=3", "at '/split/settings': additional properties 'clients' not allowed"),  # it is splitClient.replicas
    ("splitClient.settings.client-index=1", "at '/splitClient/settings': additional properties 'client-index' not allowed"),
    ("splitFed.enabled=false", "3 split clients on schedule splitfed-v1 need splitFed.enabled"),
    ("split.settings.schedule=round-robin", ("splitFed.enabled needs several split clients (splitClient.replicas > 1, now 3) on schedule "
                                             "splitfed-v1 or splitfed-v2 (now round-robin)")),
    ("splitClient.replicas=1,split.settings.partition=iid,split.settings.min-clients=null",
     "splitFed.enabled needs several split clients (splitClient.replicas > 1, now 1)"),
    ("splitServer.settings.schedule=splitfed-v2", ("the split roles' schedules differ (splitClient, splitServer, splitFed: splitfed-v1, "
                                                   "splitfed-v2, splitfed-v1): set it once, in split.settings.schedule")),
    ("split.settings.min-clients=4", "min-clients 4 (splitClient) is more than the 3 split clients (splitClient.replicas)"),
    ("splitFed.replicas=2", "at '/splitFed/replicas': maximum: got 2, want 1"),
    ("splitFed.gpu.enabled=true", "at '/splitFed': additional properties 'gpu' not allowed"),  # no torch, no GPU
    ("splitClient.settings.gradient-defence=bogus", "at '/splitClient/settings/gradient-defence': value must be one of 'none', 'max-norm', 'noise'"),
    ("splitClient.settings.label-dp=0", "at '/splitClient/settings/label-dp'"),
])
def test_bad_split_values_fail_with_a_clear_message(helm, values, message):
    result = helm_template(helm, "-f", str(REPO / "ci" / "chart-values" / "splitnn.yaml"), "--set", values)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


def test_lead_roles_print_progress_events_for_launch_unless_told_not_to(helm, rendered):
    """splitfed launch and status read the lead Jobs' progress events and result from their logs:
    the fedavg-server's; the one split client's, or the split-server's among several clients; the
    p2p-tracker's (which hears every peer's reports)."""
    seen = set()
    for name in rendered:
        several = name == "splitnn"
        for role, container, _, _ in role_containers(rendered[name]):
            env = env_of(container)
            if role in ("fedavg-server", "p2p-tracker") or role == ("split-server" if several else "split-client"):
                assert env["SPLITFED_PROGRESS_EVENTS"]["value"] == "true", (name, role)
                seen.add(role)
            else:
                assert "SPLITFED_PROGRESS_EVENTS" not in env, (name, role)
    assert seen == {"fedavg-server", "split-client", "split-server", "p2p-tracker"}
    (server,) = [c for role, c, _, _ in role_containers(render(helm, "--set", "fedavgServer.settings.progress-events=false"))
                 if role == "fedavg-server"]
    assert env_of(server)["SPLITFED_PROGRESS_EVENTS"]["value"] == "false"


def test_a_roles_own_false_or_zero_beats_the_shared_setting(helm):
    objects = render(helm, "--set", "fedavg.settings.progress-events=true,fedavgWorker.settings.progress-events=false,split.settings.seed=5",
                     "--set", "splitClient.enabled=true,splitServer.enabled=true,splitClient.settings.seed=0")
    env = {role: env_of(c) for role, c, _, _ in role_containers(objects)}
    assert env["fedavg-worker"]["SPLITFED_PROGRESS_EVENTS"]["value"] == "false"
    assert env["fedavg-server"]["SPLITFED_PROGRESS_EVENTS"]["value"] == "true"
    assert env["split-client"]["SPLITFED_SEED"]["value"] == "0" and env["split-server"]["SPLITFED_SEED"]["value"] == "5"


# -- secure aggregation and differential privacy (ci/chart-values/private-fedavg.yaml) -------------

PRIVACY = ("SPLITFED_SECURE_AGGREGATION", "SPLITFED_SECAGG_", "SPLITFED_DP")  # the variables (prefixes) server and workers must agree on


def privacy_env(env: dict[str, dict]) -> dict[str, str]:
    return {name: entry["value"] for name, entry in env.items() if name.startswith(PRIVACY)}


def learning_settings(role: str, env: dict[str, dict]):
    """The learning settings `role` builds from its pod's plain SPLITFED_* values (checked as the
    role checks them: the secure-aggregation graph for the workers there are, DP's bounds, ...)."""
    from splitfed import config

    options = {option.env: option for option in ROLES[role].options()}
    given = {options[name].name: options[name].parse(entry["value"]) for name, entry in env.items()
             if name in options and "value" in entry and "$(" not in entry["value"]}
    return config.build(ROLES[role].learning, given)


def test_secure_aggregation_and_dp_reach_the_server_and_every_worker_alike(rendered):
    """fedavg.settings reaches both roles: the server and each worker get the same settings (a
    worker refuses a server that runs otherwise), and they make a run both roles accept."""
    env = {role: env_of(c) for role, c, _, _ in role_containers(rendered["private-fedavg"])}
    assert set(env) == {"fedavg-server", "fedavg-worker"}
    expected = {"SPLITFED_SECURE_AGGREGATION": "secagg+", "SPLITFED_SECAGG_NEIGHBOURS": "4", "SPLITFED_DP": "central", "SPLITFED_DP_CLIP": "0.5",
                "SPLITFED_DP_NOISE_MULTIPLIER": "1.1", "SPLITFED_DP_DELTA": "1e-06", "SPLITFED_DP_TARGET_EPSILON": "8"}
    assert privacy_env(env["fedavg-server"]) == privacy_env(env["fedavg-worker"]) == expected
    assert env["fedavg-server"]["SPLITFED_MIN_WORKERS"]["value"] == "4" and "SPLITFED_MIN_WORKERS" not in env["fedavg-worker"]
    for role in env:
        learning = learning_settings(role, env[role])
        assert (learning.secure_aggregation, learning.dp, learning.dp_delta, learning.workers) == ("secagg+", "central", 1e-6, 5), role
    assert learning_settings("fedavg-server", env["fedavg-server"]).secagg_graph(5) == (4, 3)  # 4 neighbours, 3 shares unmask a worker
    for name in VALUE_NAMES:  # the other files run neither
        for role, container, _, _ in role_containers(rendered[name]):
            assert name == "private-fedavg" or not privacy_env(env_of(container)), (name, role)


@pytest.mark.parametrize("given", [
    {"secure_aggregation": "secagg+", "dp": "central", "dp_target_epsilon": 4.0},
    {"dp": "sample", "dp_delta": 1e-6, "dp_noise_multiplier": 0.8},
    {"secure_aggregation": "secagg+", "secagg_threshold": 2, "dp": "local", "dp_clip": 2.0},
], ids=["secagg-central", "sample", "secagg-local"])
def test_launch_values_with_secure_aggregation_and_dp_reach_both_roles(helm, tmp_path, given):
    """What `splitfed launch fedavg --secure-aggregation ... --dp ...` installs: the options land in
    fedavg.settings and arrive, the same, as SPLITFED_SECURE_AGGREGATION, SPLITFED_DP... in the
    fedavg-server's pod and the fedavg-workers'."""
    from splitfed import config
    from splitfed.cluster import values

    launched = tmp_path / "launch.yaml"
    launched.write_text(yaml.safe_dump(values.chart_values("fedavg", {**given, "workers": 4, "partition": "iid"})))
    env = {role: env_of(c) for role, c, _, _ in role_containers(render(helm, "-f", str(launched)))}
    assert set(env) == {"fedavg-server", "fedavg-worker"}
    assert privacy_env(env["fedavg-server"]) == privacy_env(env["fedavg-worker"])
    assert set(privacy_env(env["fedavg-server"])) == {config.env_name(name) for name in given}
    for role in env:
        learning = learning_settings(role, env[role])
        assert {name: getattr(learning, name) for name in given} == given, role
        assert learning.workers == 4, role


# -- several split clients (ci/chart-values/splitnn.yaml) ------------------------------------------


def test_splitnn_values_run_the_clients_as_an_indexed_job_with_the_fed_and_no_relay(rendered):
    objects = rendered["splitnn"]
    workloads = {role: obj for role, _, _, obj in role_containers(objects)}
    assert set(workloads) == {"split-client", "split-server", "split-fed"}
    clients = workloads["split-client"]["spec"]
    assert (clients["completionMode"], clients["parallelism"], clients["completions"]) == ("Indexed", 3, 3)
    for role in ("split-server", "split-fed"):
        spec = workloads[role]["spec"]
        assert (spec["parallelism"], spec["completions"], spec["template"]["spec"]["restartPolicy"]) == (1, 1, "OnFailure"), role
    (policy,) = [o for o in objects if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == "ci-splitfed-roles"]
    assert policy["spec"]["podSelector"]["matchExpressions"][0]["values"] == ["split-client", "split-fed", "split-server"]
    (monitor,) = [o for o in objects if o["kind"] == "PodMonitor"]
    assert monitor["spec"]["selector"]["matchExpressions"][0]["values"] == ["split-client", "split-fed", "split-server"]
    # min-clients 2 of 3: drains keep two clients
    (budget,) = [o for o in objects if o["kind"] == "PodDisruptionBudget" and o["metadata"]["name"] == "ci-splitfed-split-client"]
    assert budget["spec"]["minAvailable"] == 2


def test_each_split_client_gets_its_index_its_key_and_the_number_of_clients(rendered):
    containers = {role: (container, spec) for role, container, spec, _ in role_containers(rendered["splitnn"])}
    client, spec = containers["split-client"]
    env = env_of(client)
    assert env["SPLITFED_CLIENT_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    assert env["SPLITFED_PRIVATE_KEY"]["value"] == "/etc/splitfed/keys/split-client-$(SPLITFED_CLIENT_INDEX).key"  # as keys generate names them
    names = [entry["name"] for entry in client["env"]]
    assert names.index("SPLITFED_CLIENT_INDEX") < names.index("SPLITFED_PRIVATE_KEY")  # $(VAR) sees only what comes before
    (keys,) = [volume for volume in spec["volumes"] if volume["name"] == "keys"]
    assert [item["key"] for item in keys["secret"]["items"]] == ["key-list.json", "split-client-0.key", "split-client-1.key", "split-client-2.key"]
    for role, (container, _) in containers.items():
        env = env_of(container)
        assert env["SPLITFED_CLIENTS"]["value"] == "3", role
        assert env["SPLITFED_SCHEDULE"]["value"] == "splitfed-v1" and env["SPLITFED_PARTITION"]["value"] == "classes:0-3,4-6,7-9", role
        assert env["SPLITFED_MIN_CLIENTS"]["value"] == "2" and env["SPLITFED_CLIENT_TIMEOUT"]["value"] == "90", role
        if role != "split-fed":
            assert env["SPLITFED_VIA"]["value"] == "direct", role
    defences = {"SPLITFED_ACTIVATION_CLIP": "5", "SPLITFED_ACTIVATION_NOISE": "0.05", "SPLITFED_LABEL_DP": "4"}
    assert {name: env_of(client)[name]["value"] for name in defences} == defences  # the clients' own: the others get none
    assert not [name for role, (container, _) in containers.items() if role != "split-client" for name in defences if name in env_of(container)]


def test_the_fed_is_torch_free_signs_and_reads_no_data(helm, rendered):
    ((fed, spec),) = [(c, s) for role, c, s, _ in role_containers(rendered["splitnn"]) if role == "split-fed"]
    assert fed["image"] == "localhost/splitfed-split-fed:0.1.0"  # the core image, as ci/images.sh tags it
    env = env_of(fed)
    assert env["SPLITFED_PRIVATE_KEY"]["value"] == "/etc/splitfed/keys/split-fed.key"
    assert "SPLITFED_VIA" not in env and "SPLITFED_CLIENT_INDEX" not in env and "SPLITFED_PROGRESS_EVENTS" not in env
    (keys,) = [volume for volume in spec["volumes"] if volume["name"] == "keys"]
    assert [item["key"] for item in keys["secret"]["items"]] == ["key-list.json", "split-fed.key"]
    objects = render(helm, "--set", SEVERAL_CLIENTS + ",data.volume.persistentVolumeClaim.claimName=mnist")
    containers = {role: (c, s) for role, c, s, _ in role_containers(objects)}
    assert "SPLITFED_DATA_DIR" in env_of(containers["split-client"][0]) and "SPLITFED_DATA_DIR" not in env_of(containers["split-fed"][0])
    assert not [v for v in containers["split-fed"][1]["volumes"] if v["name"] == "data"]


def test_one_split_client_keeps_its_plain_name(rendered):
    ((client, spec),) = [(c, s) for role, c, s, _ in role_containers(rendered["all-roles"]) if role == "split-client"]
    env = env_of(client)
    assert env["SPLITFED_CLIENTS"]["value"] == "1" and env["SPLITFED_PRIVATE_KEY"]["value"] == "/etc/splitfed/keys/split-client.key"
    (keys,) = [volume for volume in spec["volumes"] if volume["name"] == "keys"]
    assert [item["key"] for item in keys["secret"]["items"]] == ["key-list.json", "split-client.key"]
    assert not [o for o in rendered["all-roles"] if o["kind"] == "PodDisruptionBudget" and o["metadata"]["name"].endswith("-split-client")]


def test_round_robin_clients_run_without_the_fed(helm):
    objects = render(helm, "--set", "splitClient.enabled=true,splitClient.replicas=2,splitServer.enabled=true,split.settings.schedule=round-robin")
    assert {role for role, *_ in role_containers(objects) if role.startswith("split-")} == {"split-client", "split-server"}
    assert not [o for o in objects if o["kind"] == "PodDisruptionBudget" and o["metadata"]["name"].endswith("-split-client")]  # no min-clients: no budget


def test_the_charts_default_schedule_is_the_declared_one(helm):
    """The chart decides whether the fed is needed from the schedule; unset, it assumes the one
    the roles default to."""
    from splitfed.learning.settings import SplitNNSettings

    declared = SplitNNSettings.__dataclass_fields__["schedule"].default
    result = helm_template(helm, "--set", "splitClient.enabled=true,splitClient.replicas=2,splitServer.enabled=true")
    assert result.returncode != 0
    assert f"2 split clients on schedule {declared} need splitFed.enabled" in result.stderr, result.stderr
    assert declared != "round-robin"  # else the message above could not be


# -- decentralized training (ci/chart-values/p2p.yaml, smpl.yaml) -------------------------------

P2P_ROLES = "fedavgServer.enabled=false,fedavgWorker.enabled=false,p2pTracker.enabled=true"


def test_p2p_values_run_a_tracker_that_ends_and_peers_as_an_indexed_job(rendered):
    objects = rendered["p2p"]
    workloads = {role: obj for role, _, _, obj in role_containers(objects)}
    assert set(workloads) == {"p2p-tracker", "p2p-peer"}
    tracker = workloads["p2p-tracker"]
    # expect-peers 4: the tracker ends with the run, so a Job, as every role that ends
    assert tracker["kind"] == "Job"
    assert (tracker["spec"]["parallelism"], tracker["spec"]["completions"], tracker["spec"]["template"]["spec"]["restartPolicy"]) == (1, 1, "OnFailure")
    # and so do the peers: an Indexed Job, whose finished pods stay finished, so the tracker sees
    # none live once all have left (a StatefulSet would start them again)
    peers = workloads["p2p-peer"]["spec"]
    assert (workloads["p2p-peer"]["kind"], peers["completionMode"], peers["parallelism"], peers["completions"]) == ("Job", "Indexed", 4, 4)
    assert (peers["backoffLimit"], peers["template"]["spec"]["restartPolicy"]) == (3, "OnFailure")
    # no Service for either: peers reach the tracker through its queue, and each other through the
    # broker (the headless Service is a StatefulSet's)
    assert not [o for o in objects if o["kind"] == "Service" and ("tracker" in o["metadata"]["name"] or "peer" in o["metadata"]["name"])]
    (policy,) = [o for o in objects if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == "ci-splitfed-roles"]
    assert policy["spec"]["podSelector"]["matchExpressions"][0]["values"] == ["p2p-peer", "p2p-tracker"]
    (monitor,) = [o for o in objects if o["kind"] == "PodMonitor"]
    assert monitor["spec"]["selector"]["matchExpressions"][0]["values"] == ["p2p-peer", "p2p-tracker"]


def test_each_peer_gets_its_index_its_key_and_the_number_of_peers(rendered):
    containers = {role: (container, spec) for role, container, spec, _ in role_containers(rendered["p2p"])}
    peer, spec = containers["p2p-peer"]
    env = env_of(peer)
    assert env["SPLITFED_PEER_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    assert env["SPLITFED_PEERS"]["value"] == "4"
    assert env["SPLITFED_PRIVATE_KEY"]["value"] == "/etc/splitfed/keys/p2p-peer-$(SPLITFED_PEER_INDEX).key"  # as keys generate names them
    names = [entry["name"] for entry in peer["env"]]
    assert names.index("SPLITFED_PEER_INDEX") < names.index("SPLITFED_PRIVATE_KEY")  # $(VAR) sees only what comes before
    (keys,) = [volume for volume in spec["volumes"] if volume["name"] == "keys"]
    assert [item["key"] for item in keys["secret"]["items"]] == ["key-list.json", *(f"p2p-peer-{index}.key" for index in range(4))]
    # the family's shared settings reach the tracker and the peers; the peers' own only them
    tracker = env_of(containers["p2p-tracker"][0])
    for role_env in (env, tracker):
        assert role_env["SPLITFED_SEED"]["value"] == "3" and role_env["SPLITFED_PEER_TIMEOUT"]["value"] == "30"
    assert env["SPLITFED_PARTITION"]["value"] == "classes:0-2,3-4,5-7,8-9" and env["SPLITFED_EPOCHS"]["value"] == "5"
    assert "SPLITFED_PARTITION" not in tracker and "SPLITFED_PEERS" not in tracker and "SPLITFED_PEER_INDEX" not in tracker
    assert tracker["SPLITFED_EXPECT_PEERS"]["value"] == "4" and "SPLITFED_EXPECT_PEERS" not in env


def test_the_tracker_is_torch_free_signs_and_reads_no_data(helm, rendered):
    ((tracker, spec),) = [(c, s) for role, c, s, _ in role_containers(rendered["p2p"]) if role == "p2p-tracker"]
    assert tracker["image"] == "localhost/splitfed-p2p-tracker:0.1.0"  # the core image, as ci/images.sh tags it
    env = env_of(tracker)
    assert env["SPLITFED_PRIVATE_KEY"]["value"] == "/etc/splitfed/keys/p2p-tracker.key"
    assert "SPLITFED_DATASET" not in env and "SPLITFED_DATA_DIR" not in env  # it trains nothing
    (keys,) = [volume for volume in spec["volumes"] if volume["name"] == "keys"]
    assert [item["key"] for item in keys["secret"]["items"]] == ["key-list.json", "p2p-tracker.key"]
    assert "gpu" not in tracker["resources"].get("limits", {})
    objects = render(helm, "-f", str(REPO / "ci" / "chart-values" / "p2p.yaml"), "--set", "data.volume.persistentVolumeClaim.claimName=mnist")
    containers = {role: (c, s) for role, c, s, _ in role_containers(objects)}
    assert env_of(containers["p2p-peer"][0])["SPLITFED_DATA_DIR"]["value"] == "/data"
    assert not [v for v in containers["p2p-tracker"][1]["volumes"] if v["name"] == "data"]


def test_smpl_values_run_a_tracker_that_serves_until_uninstalled(rendered):
    objects = rendered["smpl"]
    workloads = {role: obj for role, _, _, obj in role_containers(objects)}
    assert set(workloads) == {"p2p-tracker", "smpl-peer"}
    tracker = workloads["p2p-tracker"]
    # expect-peers 0 (the default): a Deployment of one pod, never two on the session's queue
    assert (tracker["kind"], tracker["spec"]["replicas"], tracker["spec"]["strategy"]) == ("Deployment", 1, {"type": "Recreate"})
    # and the peers a StatefulSet: a peer that has finished is started again and rejoins
    peers = workloads["smpl-peer"]
    assert (peers["kind"], peers["spec"]["replicas"], peers["spec"]["podManagementPolicy"]) == ("StatefulSet", 6, "Parallel")
    (governing,) = [o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == peers["spec"]["serviceName"]]
    assert governing["spec"]["clusterIP"] == "None"
    env = {role: env_of(obj["spec"]["template"]["spec"]["containers"][0]) for role, obj in workloads.items()}
    for role in ("p2p-tracker", "smpl-peer"):  # smpl.settings reach the tracker too: it draws the hyperedges
        assert env[role]["SPLITFED_HYPEREDGE_SIZE"]["value"] == "3" and env[role]["SPLITFED_MAX_HYPEREDGES"]["value"] == "2", role
        assert env[role]["SPLITFED_VARIETY"]["value"] == "2" and env[role]["SPLITFED_SEED"]["value"] == "5", role
    assert env["smpl-peer"]["SPLITFED_PEERS"]["value"] == "6" and env["smpl-peer"]["SPLITFED_SPARSITY"]["value"] == "0.9"
    assert "SPLITFED_PRIVATE_KEY" not in env["smpl-peer"] and "SPLITFED_KEY_LIST" not in env["smpl-peer"]  # no keys.existingSecret: unsafe mode
    assert "SPLITFED_EXPECT_PEERS" not in env["p2p-tracker"] and "SPLITFED_SPARSITY" not in env["p2p-tracker"]


@pytest.mark.parametrize("peers", ["p2pPeer", "smplPeer"])
@pytest.mark.parametrize("expect", [0, 3])
def test_the_peers_kind_follows_the_trackers_end(helm, peers, expect):
    """expect-peers N (a run with an end, as launch sets it): an Indexed Job of N, whose completion
    index is the peer index; 0 (the tracker serves until uninstalled): a StatefulSet of N, whose pod
    ordinal is, with its headless Service. Either way the index names the key (ROLE-INDEX.key)."""
    role = {"p2pPeer": "p2p-peer", "smplPeer": "smpl-peer"}[peers]
    objects = render(helm, "--set", f"{P2P_ROLES},{peers}.enabled=true,{peers}.replicas=3,p2pTracker.settings.expect-peers={expect},"
                                    "keys.existingSecret=peer-keys")
    ((container, spec, workload),) = [(c, s, o) for r, c, s, o in role_containers(objects) if r == role]
    (tracker,) = [o for r, _, _, o in role_containers(objects) if r == "p2p-tracker"]
    index = env_of(container)["SPLITFED_PEER_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"]
    services = [o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == f"ci-splitfed-{role}"]
    if expect:
        assert tracker["kind"] == "Job"
        assert workload["kind"] == "Job"
        job = workload["spec"]
        assert (job["completionMode"], job["completions"], job["parallelism"], job["backoffLimit"]) == ("Indexed", 3, 3, 3)
        assert "selector" not in job and "replicas" not in job  # the Job controller makes its own selector
        assert spec["restartPolicy"] == "OnFailure"
        assert index == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
        assert not services
    else:
        assert tracker["kind"] == "Deployment"
        assert workload["kind"] == "StatefulSet"
        assert (workload["spec"]["replicas"], workload["spec"]["serviceName"]) == (3, f"ci-splitfed-{role}")
        assert "restartPolicy" not in spec  # Always, the only one a StatefulSet takes
        assert index == "metadata.labels['apps.kubernetes.io/pod-index']"
        (service,) = services
        assert service["spec"]["clusterIP"] == "None"
    env = env_of(container)
    assert env["SPLITFED_PEERS"]["value"] == "3"
    assert env["SPLITFED_PRIVATE_KEY"]["value"] == f"/etc/splitfed/keys/{role}-$(SPLITFED_PEER_INDEX).key"
    names = [entry["name"] for entry in container["env"]]
    assert names.index("SPLITFED_PEER_INDEX") < names.index("SPLITFED_PRIVATE_KEY")
    (keys,) = [volume for volume in spec["volumes"] if volume["name"] == "keys"]
    assert [item["key"] for item in keys["secret"]["items"]] == ["key-list.json", *(f"{role}-{i}.key" for i in range(3))]
    assert workload["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == role  # NetworkPolicy, PodMonitor


def test_the_tracker_takes_the_shared_settings_of_its_peers_family(helm):
    shared = "p2p.settings.seed=3,smpl.settings.seed=5"
    for peers, seed in (("p2pPeer", "3"), ("smplPeer", "5")):
        objects = render(helm, "--set", f"{P2P_ROLES},{peers}.enabled=true,{shared}")
        env = {role: env_of(c) for role, c, _, _ in role_containers(objects)}
        assert env["p2p-tracker"]["SPLITFED_SEED"]["value"] == seed, peers
    alone = {role: env_of(c) for role, c, _, _ in role_containers(render(helm, "--set", f"{P2P_ROLES},{shared}"))}
    assert set(alone) == {"p2p-tracker"} and alone["p2p-tracker"]["SPLITFED_SEED"]["value"] == "3"


def test_the_charts_hyperedge_defaults_are_the_declared_ones(helm):
    """validate.yaml compares the tracker's and the peers' hyperedge settings, and checks the peers
    against hyperedge-size; unset, it assumes the defaults the roles declare."""
    from splitfed.learning.settings import HyperedgeSettings

    declared = {name: HyperedgeSettings.__dataclass_fields__[name].default for name in ("hyperedge_size", "max_hyperedges")}
    assert declared == {"hyperedge_size": 2, "max_hyperedges": 1}  # as templates/validate.yaml assumes them
    result = helm_template(helm, "--set", f"{P2P_ROLES},smplPeer.enabled=true,smplPeer.replicas=1")
    assert result.returncode != 0
    assert f"smplPeer.replicas 1 is fewer than hyperedge-size {declared['hyperedge_size']}" in result.stderr, result.stderr
    assert render(helm, "--set", f"{P2P_ROLES},smplPeer.enabled=true,smplPeer.replicas=2,p2pTracker.settings.max-hyperedges=1")


@pytest.mark.parametrize(("values", "message"), [
    ("p2pPeer.enabled=true", "p2pPeer.enabled and smplPeer.enabled: one kind of peer per release"),
    ("p2pTracker.enabled=false", "smplPeer.enabled needs p2pTracker.enabled"),
    ("smplPeer.replicas=2", "smplPeer.replicas 2 is fewer than hyperedge-size 3"),
    ("smplPeer.settings.hyperedge-size=4", "the SMPL roles' hyperedge-size differ (p2pTracker, smplPeer: 3, 4): set it once, in smpl.settings.hyperedge-size"),
    ("p2pTracker.settings.max-hyperedges=1", "the SMPL roles' max-hyperedges differ (p2pTracker, smplPeer: 1, 2)"),
    ("p2pTracker.settings.expect-peers=4", "p2pTracker.settings.expect-peers 4 must be 0 (serve the session until uninstalled) or the number of peers, 6 (smplPeer.replicas)"),
    ("p2pTracker.replicas=2", "at '/p2pTracker/replicas': maximum: got 2, want 1"),
    ("smplPeer.replicas=0", "at '/smplPeer/replicas': minimum: got 0, want 1"),
    ("smpl.settings.sparsity=0.5", "at '/smpl/settings': additional properties 'sparsity' not allowed"),  # the tracker takes no sparsity
    ("smpl.settings.peers=6", "at '/smpl/settings': additional properties 'peers' not allowed"),  # it is smplPeer.replicas
    ("smplPeer.settings.peer-index=1", "at '/smplPeer/settings': additional properties 'peer-index' not allowed"),
    ("p2pTracker.gpu.enabled=true", "at '/p2pTracker': additional properties 'gpu' not allowed"),  # no torch, no GPU
    ("smpl.settings.hyperedge-size=1", "at '/smpl/settings/hyperedge-size': minimum: got 1, want 2"),
])
def test_bad_decentralized_values_fail_with_a_clear_message(helm, values, message):
    result = helm_template(helm, "-f", str(REPO / "ci" / "chart-values" / "smpl.yaml"), "--set", values)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


def test_bad_p2p_values_fail_with_a_clear_message(helm):
    base = ["-f", str(REPO / "ci" / "chart-values" / "p2p.yaml")]
    for values, message in (
        ("p2pPeer.replicas=3", "p2pTracker.settings.expect-peers 4 must be 0 (serve the session until uninstalled) or the number of peers, 3 (p2pPeer.replicas)"),
        ("p2p.settings.epochs=2", "at '/p2p/settings': additional properties 'epochs' not allowed"),  # the tracker takes no epochs
        ("p2pTracker.enabled=false", "p2pPeer.enabled needs p2pTracker.enabled"),
    ):
        result = helm_template(helm, *base, "--set", values)
        assert result.returncode != 0 and message in result.stderr, (values, result.stderr)



# -- each party its own data (ci/chart-values/per-party.yaml, per-party-claims.yaml) and the task ---

# The roles that take a task (SPLITFED_TASK), torch code: every role that runs torch (the split-fed
# declares --task, but averages layers in numpy).
TAKES_TASK = {role for role, spec in ROLES.items() if spec.torch and any(option.name == "task" for option in spec.options())}
TASK_DIR = "/etc/splitfed/task"


def data_volume(spec: dict) -> dict | None:
    found = [volume for volume in spec["volumes"] if volume["name"] == "data"]
    return found[0] if found else None


def validated(objects: list[dict], tmp_path) -> None:
    from tests.chart.test_high_availability import validate  # kubernetes-validate --strict, as ci/chart.sh

    validate([o for o in objects if o["apiVersion"] != "monitoring.coreos.com/v1"], tmp_path)


def test_per_party_host_path_mounts_the_fixed_folder_and_each_party_reads_its_own(rendered):
    """/srv/splitfed/{party}: every pod mounts /srv/splitfed at /data, read-only, and reads
    SPLITFED_DATA_DIR=/data/{party}, which the role fills in with its own name."""
    seen = set()
    for role, container, spec, _ in role_containers(rendered["per-party"]):
        env = env_of(container)
        assert env["SPLITFED_DATASET"]["value"] == "npz" and env["SPLITFED_CLASSES"]["value"] == "0,1,2,3,4,5,6,7,8,9", role
        assert env["SPLITFED_DATA_DIR"]["value"] == "/data/{party}", role
        assert data_volume(spec) == {"name": "data", "hostPath": {"path": "/srv/splitfed", "type": "Directory"}}, role
        assert {"name": "data", "mountPath": "/data", "readOnly": True} in container["volumeMounts"], role
        assert "SPLITFED_LABEL_COLUMN" not in env and "SPLITFED_IMAGE_SIZE" not in env  # unset: the roles' defaults
        seen.add(role)
    assert seen == {"fedavg-server", "fedavg-worker"}


def test_the_task_file_travels_in_a_configmap_that_every_training_role_mounts(rendered):
    values = yaml.safe_load((REPO / "ci" / "chart-values" / "per-party.yaml").read_text())
    (config,) = [o for o in rendered["per-party"] if o["kind"] == "ConfigMap" and o["metadata"]["name"] == f"{RELEASE}-splitfed-task"]
    assert config["data"] == {"my_task.py": values["task"]["file"]}
    assert config["metadata"]["labels"]["app.kubernetes.io/component"] == "task"
    import hashlib

    for role, container, spec, workload in role_containers(rendered["per-party"]):
        assert env_of(container)["SPLITFED_TASK"]["value"] == f"{TASK_DIR}/my_task.py", role
        (volume,) = [v for v in spec["volumes"] if v["name"] == "task"]
        assert volume["configMap"] == {"name": f"{RELEASE}-splitfed-task", "items": [{"key": "my_task.py", "path": "my_task.py"}]}
        assert {"name": "task", "mountPath": TASK_DIR, "readOnly": True} in container["volumeMounts"], role
        # a new task file restarts the pods (the mounted file changes; a loaded task would not)
        annotations = workload["spec"]["template"]["metadata"]["annotations"]
        assert annotations["checksum/task"] == hashlib.sha256(values["task"]["file"].encode()).hexdigest()[:16], role


def test_a_task_file_given_with_set_file_arrives_byte_for_byte_in_every_role_that_trains(helm, tmp_path):
    task = tmp_path / "my_task.py"
    # what templating or YAML could mangle: braces, a trailing space, tabs, quotes, no final newline
    text = 'import torch  \n\n\ndef model(context):\n\t"""{{ .Values }} {party}: ünïcode"""\n\treturn torch.nn.Linear(64, 10)'
    task.write_text(text)
    objects = render(helm, "-f", str(REPO / "ci" / "chart-values" / "all-roles.yaml"), "--set-file", f"task.file={task}")
    objects += render(helm, "--set", SEVERAL_CLIENTS, "--set-file", f"task.file={task}")  # the fed
    objects += render(helm, "--set", f"{P2P_ROLES},smplPeer.enabled=true", "--set-file", f"task.file={task}")
    for config in [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == f"{RELEASE}-splitfed-task"]:
        assert config["data"] == {"task.py": text}
    roles = {role: env_of(container).get("SPLITFED_TASK", {}).get("value") for role, container, _, _ in role_containers(objects)}
    assert set(roles) == ROLE_NAMES
    assert {role for role, value in roles.items() if value} == TAKES_TASK & set(roles)
    assert set(roles.values()) == {f"{TASK_DIR}/task.py", None}
    assert roles["relay"] is None and roles["p2p-tracker"] is None and roles["split-fed"] is None  # they run no torch
    assert {"split-client", "split-server", "fedavg-server", "fedavg-worker", "smpl-peer"} <= TAKES_TASK
    for role, container, spec, _ in role_containers(objects):
        has_volume = any(volume["name"] == "task" for volume in spec["volumes"])
        assert has_volume == (role in TAKES_TASK), role


def test_a_task_from_an_existing_configmap_or_a_module_in_the_images(helm, rendered):
    assert not [o for o in rendered["per-party-claims"] if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-task")]
    for role, container, spec, workload in role_containers(rendered["per-party-claims"]):
        if role == "p2p-peer":
            assert env_of(container)["SPLITFED_TASK"]["value"] == f"{TASK_DIR}/task.py"
            (volume,) = [v for v in spec["volumes"] if v["name"] == "task"]
            assert volume["configMap"] == {"name": "peer-task", "items": [{"key": "task.py", "path": "task.py"}]}
            assert "annotations" not in workload["spec"]["template"]["metadata"]  # the chart cannot see its text
    objects = render(helm, "--set", "task.module=hospital.model")
    for role, container, spec, _ in role_containers(objects):
        assert env_of(container)["SPLITFED_TASK"]["value"] == "hospital.model", role
        assert not [v for v in spec["volumes"] if v["name"] == "task"] and not [m for m in container["volumeMounts"] if m["name"] == "task"]
    assert not [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-task")]
    assert not [c for _, c, _, _ in role_containers(render(helm)) if "SPLITFED_TASK" in env_of(c)]  # no task: the built-in models


def test_per_party_claim_templates_give_each_statefulset_pod_its_own_claim(helm, rendered, tmp_path):
    """p2p peers of a serving tracker (a StatefulSet) each get data-<statefulset>-<ordinal>, the
    whole claim their folder; the tracker reads no data."""
    workloads = {role: (container, spec, workload) for role, container, spec, workload in role_containers(rendered["per-party-claims"])}
    container, spec, peers = workloads["p2p-peer"]
    assert peers["kind"] == "StatefulSet"
    assert peers["spec"]["volumeClaimTemplates"] == [{
        "metadata": {"name": "data", "labels": {"app.kubernetes.io/name": "splitfed", "app.kubernetes.io/instance": RELEASE,
                                                "app.kubernetes.io/component": "p2p-peer"}},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "5Gi"}}},
    }]
    assert data_volume(spec) is None  # the claim template's, per pod
    assert {"name": "data", "mountPath": "/data", "readOnly": True} in container["volumeMounts"]
    env = env_of(container)
    assert env["SPLITFED_DATA_DIR"]["value"] == "/data" and env["SPLITFED_IMAGE_SIZE"]["value"] == "32,32"
    assert env["SPLITFED_DATASET"]["value"] == "imagefolder"
    tracker, tracker_spec, _ = workloads["p2p-tracker"]
    assert data_volume(tracker_spec) is None and "SPLITFED_DATA_DIR" not in env_of(tracker) and "SPLITFED_TASK" not in env_of(tracker)
    # FedAvg: the workers (a StatefulSet) get claims; the server, a Job, has none to get, so it is
    # refused unless it reads no data (data.servers=false: the parties evaluate)
    claims = "data.perParty.volumeClaimTemplate.size=1Gi,data.perParty.volumeClaimTemplate.storageClassName=local-path"
    result = helm_template(helm, "--set", claims)
    assert result.returncode != 0
    assert ("data.perParty.volumeClaimTemplate gives a claim to each pod of a StatefulSet; fedavg-server runs as a Job, which has none"
            in result.stderr), result.stderr
    assert "or give the servers no data (data.servers=false" in result.stderr
    objects = render(helm, "--set", claims + ",data.servers=false")
    workloads = {role: (container, spec, workload) for role, container, spec, workload in role_containers(objects)}
    (template,) = workloads["fedavg-worker"][2]["spec"]["volumeClaimTemplates"]
    assert template["spec"]["storageClassName"] == "local-path"
    server, server_spec, _ = workloads["fedavg-server"]
    assert data_volume(server_spec) is None and "SPLITFED_DATA_DIR" not in env_of(server)
    assert not [m for m in server["volumeMounts"] if m["name"] == "data"]
    validated(objects, tmp_path)
    # a split client, a Job, is a party with data of its own: refused without the servers' way out
    result = helm_template(helm, "--set", claims + ",splitClient.enabled=true,splitServer.enabled=true,data.servers=false")
    assert result.returncode != 0 and "split-client runs as a Job" in result.stderr and "data.servers" not in result.stderr.split("runs as a Job")[1]


def test_per_party_existing_claim_is_one_claim_with_a_folder_per_party(helm, tmp_path):
    objects = render(helm, "--set", SEVERAL_CLIENTS + ",fedavgServer.enabled=false,fedavgWorker.enabled=false,data.dataset=csv,"
                     "data.labelColumn=diagnosis,data.perParty.existingClaim=hospital-data,data.perParty.folder=clients/{party}")
    seen = set()
    for role, container, spec, _ in role_containers(objects):
        env = env_of(container)
        assert env["SPLITFED_DATASET"]["value"] == "csv" and env["SPLITFED_LABEL_COLUMN"]["value"] == "diagnosis", role
        if role in ("split-fed", "split-server"):  # one averages layers, the other learns the data's shape from the clients: no data
            assert data_volume(spec) is None and "SPLITFED_DATA_DIR" not in env
            continue
        assert data_volume(spec) == {"name": "data", "persistentVolumeClaim": {"claimName": "hospital-data", "readOnly": True}}, role
        assert env["SPLITFED_DATA_DIR"]["value"] == "/data/clients/{party}", role
        seen.add(role)
    assert seen == {"split-client"}
    validated(objects, tmp_path)
    lint = subprocess.run([str(helm), "lint", "--strict", str(CHART), "--set", SEVERAL_CLIENTS + ",data.perParty.existingClaim=hospital-data",
                           "--set", "task.module=hospital.model"], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_servers_get_no_data_when_the_parties_evaluate(helm):
    """data.servers=false (launch sets it for --evaluate parties): the servers get no volume and
    no SPLITFED_DATA_DIR; the parties keep theirs."""
    for extra in ("", ",splitClient.enabled=true,splitServer.enabled=true"):
        objects = render(helm, "--set", "data.volume.persistentVolumeClaim.claimName=shared,data.servers=false" + extra)
        for role, container, spec, _ in role_containers(objects):
            env = env_of(container)
            if role in ("fedavg-server", "split-server"):
                assert data_volume(spec) is None and "SPLITFED_DATA_DIR" not in env, role
                assert env["SPLITFED_DATASET"]["value"] == "fashion-mnist", role  # the model is still built for it
            elif role != "relay":
                assert data_volume(spec) == {"name": "data", "persistentVolumeClaim": {"claimName": "shared"}}, role
                assert env["SPLITFED_DATA_DIR"]["value"] == "/data", role


@pytest.mark.parametrize(("values", "message"), [
    ("data.perParty.existingClaim=data-{index}", "data.perParty.existingClaim data-{index}: a pod template is one for all the pods of a Job or "
                                                 "StatefulSet, so it cannot name a claim per party"),
    ("data.perParty.existingClaim=Hospital_Data", "data.perParty.existingClaim Hospital_Data: not a claim name"),
    ("data.perParty.hostPath=/srv/data/{party},data.volume.hostPath.path=/srv/data",
     "give one data source, not data.perParty.hostPath and data.volume"),
    ("data.perParty.hostPath=/srv/data/{name}", "data.perParty.hostPath /srv/data/{name}: the only placeholders are {party}"),
    ("data.perParty.existingClaim=d,data.perParty.folder=clients/{client}", "data.perParty.folder clients/{client}: the only placeholders"),
    ("data.perParty.hostPath=/srv/data",
     "data.perParty.hostPath /srv/data: name each party's folder with {party} or {index} (e.g. /srv/data/{party})"),
    ("data.perParty.hostPath=/{party}", "data.perParty.hostPath /{party}: put the parties' folders in a folder of their own"),
    ("data.perParty.hostPath=srv/{party}", "data.perParty.hostPath srv/{party}: an absolute folder on the node"),
    ("data.perParty.volumeClaimTemplate.storageClassName=fast", "at '/data/perParty/volumeClaimTemplate': missing property 'size'"),
    ("data.perParty.volumeClaimTemplate.size=1Gi,data.perParty.volumeClaimTemplate.accessModes={ReadWriteSome}",
     "at '/data/perParty/volumeClaimTemplate/accessModes/0': value must be one of"),
    ("data.imageSize=32x32", "at '/data/imageSize'"),
    ("data.dataset=parquet", "at '/data/dataset': value must be one of"),
    ("data.servers=no", "at '/data/servers': got string, want boolean"),
    ("task.module=my-task", "at '/task/module'"),
    ("task.key=task.txt", "at '/task/key': 'task.txt' does not match pattern"),
    ("task.module=hospital.model,task.configMap=hospital-task", "give the task once, not as task.configMap and task.module"),
    ("fedavg.settings.task=my_task.py", "at '/fedavg/settings': additional properties 'task' not allowed"),  # the chart sets it
    ("fedavgWorker.settings.data-dir=/data/{party}", "at '/fedavgWorker/settings': additional properties 'data-dir' not allowed"),
])
def test_bad_data_and_task_values_fail_with_a_clear_message(helm, values, message):
    result = helm_template(helm, "--set", values)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


def test_a_task_file_too_big_for_a_configmap_is_refused(helm, tmp_path):
    task = tmp_path / "big_task.py"
    task.write_text("# " + "x" * (1024 * 1024) + "\n")
    result = helm_template(helm, "--set-file", f"task.file={task}")
    assert result.returncode != 0
    assert "task.file: 1048579 bytes, more than a ConfigMap holds (1048576)" in result.stderr, result.stderr


def test_a_fedavg_server_without_its_own_files_must_leave_the_scoring_to_the_workers(helm):
    """data.servers=false with a party's own files: the server has no test set, so it must not
    score the model (evaluate, unset, is the declared default, server)."""
    from splitfed.learning.settings import LOCAL_FORMATS, FederatedSettings

    assert FederatedSettings.__dataclass_fields__["evaluate"].default == "server"  # as templates/validate.yaml assumes it
    for dataset in LOCAL_FORMATS:
        result = helm_template(helm, "--set", f"data.dataset={dataset},data.servers=false,data.perParty.hostPath=/srv/data/{{party}}")
        assert result.returncode != 0
        assert (f"data.servers=false leaves the fedavg-server no {dataset} files, but with evaluate server it scores the model on its own "
                "test set: set fedavgServer.settings.evaluate=parties") in result.stderr, result.stderr
    objects = render(helm, "--set", "data.dataset=npz,data.servers=false,data.perParty.hostPath=/srv/data/{party}",
                     "--set", "fedavgServer.settings.evaluate=parties")
    env = {role: env_of(c) for role, c, _, _ in role_containers(objects)}
    assert env["fedavg-server"]["SPLITFED_EVALUATE"]["value"] == "parties" and "SPLITFED_DATA_DIR" not in env["fedavg-server"]
    assert env["fedavg-worker"]["SPLITFED_DATA_DIR"]["value"] == "/data/{party}"
    assert render(helm, "--set", "data.servers=false")  # a built-in set: the server's image carries its test set
