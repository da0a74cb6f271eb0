"""The `helm upgrade --install` call of `splitfed launch`, made by the real helm 3.19 in
--dry-run=client mode (launch's --dry-run) against the values launch generates.

helm's dry run still reads from a cluster (the server version, the API discovery documents, the
release's history): those reads are answered with recorded API responses by FakeCoreV1Api (no
API server can run here). helm would also download the cluster's OpenAPI documents to validate
the objects; none are recorded, so SPLITFED_HELM is a wrapper that adds
--disable-openapi-validation to launch's own arguments. The objects themselves are validated
against the Kubernetes 1.30 schemas by ci/chart.sh (kubernetes-validate)."""

from __future__ import annotations

import pytest
import yaml

from splitfed.roles.registry import ROLES
from tests.cluster.conftest import invoke
from tests.cluster.recorded_api import FakeCoreV1Api

DISCOVERY = {"/api": "discovery-api.json", "/apis": "discovery-apis.json", "/api/v1": "discovery-api-v1.json",
             "/apis/apps/v1": "discovery-apis-apps-v1.json", "/apis/batch/v1": "discovery-apis-batch-v1.json",
             "/apis/networking.k8s.io/v1": "discovery-apis-networking.k8s.io-v1.json", "/apis/policy/v1": "discovery-apis-policy-v1.json"}


@pytest.fixture
def helm_dry_run(api: FakeCoreV1Api, helm, tmp_path, monkeypatch) -> FakeCoreV1Api:
    for path, name in DISCOVERY.items():
        api.add("GET", path, name)
    api.add("GET", "/api/v1/namespaces/ns1/secrets", "secrets-none.json")  # the release's history: none yet
    api.add("GET", "/api/v1/namespaces/ns1/pods", "pods-none.json")  # launch's look for a finished run
    wrapper = tmp_path / "helm-without-openapi"
    wrapper.write_text(f'#!/bin/sh\nexec "{helm}" "$@" --disable-openapi-validation\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("SPLITFED_HELM", str(wrapper))
    return api


def manifests(helm_output: str) -> list[dict]:
    """The objects of helm's dry-run output (between MANIFEST: and NOTES:)."""
    assert "MANIFEST:" in helm_output, helm_output[-2000:]
    body = helm_output.split("MANIFEST:", 1)[1].split("\nNOTES:", 1)[0]
    return [doc for doc in yaml.safe_load_all(body) if doc]


def role_env(objects: list[dict]) -> dict[str, dict[str, str]]:
    found = {}
    for obj in objects:
        if obj["kind"] in ("Job", "StatefulSet", "Deployment"):
            (container,) = obj["spec"]["template"]["spec"]["containers"]
            found[container["name"]] = {e["name"]: e.get("value") for e in container["env"]}
    return found


def test_a_small_fedavg_launch_renders_its_options_on_the_right_roles(helm_dry_run, tmp_path):
    extra = tmp_path / "extra.yaml"
    extra.write_text("fedavgServer:\n  settings:\n    strategy: median\n")

    result = invoke("launch", "fedavg", "--dry-run", "--name", "fl", "--namespace", "ns1", "--workers", "2", "--partition", "iid",
                    "--rounds", "2", "--lr", "0.01", "--timeout", "90", "--round-timeout", "30", "--dataset", "digits",
                    "--session", "fl-small", "-f", extra, "--set", "fedavgWorker.settings.local-epochs=2")

    assert result.exit_code == 0, result.stderr
    assert "dry run: nothing installed" in result.stderr
    objects = manifests(result.stdout)
    (workers,) = [o for o in objects if o["kind"] == "StatefulSet" and o["metadata"]["name"] == "fl-splitfed-fedavg-worker"]
    assert workers["spec"]["replicas"] == 2
    env = role_env(objects)
    assert set(env) == {"fedavg-server", "fedavg-worker", "rabbitmq"}
    server, worker = env["fedavg-server"], env["fedavg-worker"]
    for role_env_ in (server, worker):  # shared settings, chart-level values
        assert role_env_["SPLITFED_PARTITION"] == "iid" and role_env_["SPLITFED_LR"] == "0.01" and role_env_["SPLITFED_TIMEOUT"] == "90"
        assert role_env_["SPLITFED_DATASET"] == "digits" and role_env_["SPLITFED_SESSION"] == "fl-small" and role_env_["SPLITFED_WORKERS"] == "2"
    assert server["SPLITFED_ROUNDS"] == "2" and server["SPLITFED_ROUND_TIMEOUT"] == "30"
    assert server["SPLITFED_STRATEGY"] == "median"  # -f passed through
    assert server["SPLITFED_PROGRESS_EVENTS"] == "true"  # the lead prints progress and its result
    assert worker["SPLITFED_LOCAL_EPOCHS"] == "2"  # --set passed through
    assert "SPLITFED_ROUNDS" not in worker and "SPLITFED_PROGRESS_EVENTS" not in worker
    for role in ("fedavg-server", "fedavg-worker"):
        assert {name for name in env[role] if name.startswith("SPLITFED_")} <= ROLES[role].env_names()
    # helm asked the recorded cluster for this release's history, in this namespace
    assert any(r.path == "/api/v1/namespaces/ns1/secrets" and r.query.get("labelSelector") == "name=fl,owner=helm" for r in helm_dry_run.requests)
    assert not helm_dry_run.made("POST") and not helm_dry_run.made("PUT")


def test_a_small_split_launch_through_the_relay_and_direct(helm_dry_run):
    result = invoke("launch", "split", "--dry-run", "--name", "sp", "-n", "ns1", "--epochs", "2", "--mode", "u-shaped",
                    "--batch-size", "32", "--timeout", "120", "--log-level", "debug")
    assert result.exit_code == 0, result.stderr
    env = role_env(manifests(result.stdout))
    assert set(env) == {"split-client", "split-server", "relay", "rabbitmq"}
    for half in ("split-client", "split-server"):
        assert env[half]["SPLITFED_EPOCHS"] == "2" and env[half]["SPLITFED_MODE"] == "u-shaped" and env[half]["SPLITFED_BATCH_SIZE"] == "32"
        assert env[half]["SPLITFED_VIA"] == "relay"
    assert env["relay"]["SPLITFED_TIMEOUT"] == "120" and env["relay"]["SPLITFED_LOG_LEVEL"] == "debug"
    assert "SPLITFED_EPOCHS" not in env["relay"]
    assert env["split-client"]["SPLITFED_PROGRESS_EVENTS"] == "true" and "SPLITFED_PROGRESS_EVENTS" not in env["split-server"]
    for role in ("split-client", "split-server", "relay"):
        assert {name for name in env[role] if name.startswith("SPLITFED_")} <= ROLES[role].env_names()

    result = invoke("launch", "split", "--dry-run", "--name", "sp", "-n", "ns1", "--via", "direct")
    assert result.exit_code == 0, result.stderr
    env = role_env(manifests(result.stdout))
    assert set(env) == {"split-client", "split-server", "rabbitmq"}
    assert env["split-client"]["SPLITFED_VIA"] == "direct"


def test_helm_refusing_the_values_is_one_line(helm_dry_run):
    result = invoke("launch", "fedavg", "--dry-run", "--name", "fl", "-n", "ns1", "--set", "fedavgWorker.replicas=many")
    assert result.exit_code == 7
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert line.startswith("error: helm upgrade --install failed: values don't meet the specifications of the schema(s)")
    assert line.endswith("- at '/fedavgWorker/replicas': got string, want integer")


def test_a_splitnn_launch_renders_a_client_per_pod_the_fed_and_the_server_as_lead(helm_dry_run, tmp_path):
    keys = tmp_path / "keys"
    assert invoke("keys", "generate", "--no-server", "--party", "split-server", "--party", "split-fed",
                  *(arg for index in range(3) for arg in ("--party", f"split-client-{index}")), "--out", keys).exit_code == 0
    result = invoke("launch", "splitnn", "--dry-run", "--name", "nn", "-n", "ns1", "--clients", "3", "--schedule", "splitfed-v1",
                    "--partition", "classes:0-3,4-6,7-9", "--min-clients", "2", "--client-timeout", "45", "--epochs", "2",
                    "--key-list", keys / "key-list.json")
    assert result.exit_code == 0, result.stderr
    assert "the keys Secret was not made" in result.stderr
    objects = manifests(result.stdout)
    jobs = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Job"}
    assert set(jobs) == {"nn-splitfed-split-client", "nn-splitfed-split-server", "nn-splitfed-split-fed"}
    clients = jobs["nn-splitfed-split-client"]["spec"]
    assert (clients["completionMode"], clients["parallelism"], clients["completions"]) == ("Indexed", 3, 3)
    assert not [o for o in objects if o["kind"] in ("Deployment", "StatefulSet") and "relay" in o["metadata"]["name"]]
    env = role_env(objects)
    assert set(env) == {"split-client", "split-server", "split-fed", "rabbitmq"}
    for role in ("split-client", "split-server", "split-fed"):
        assert env[role]["SPLITFED_CLIENTS"] == "3" and env[role]["SPLITFED_SCHEDULE"] == "splitfed-v1"
        assert env[role]["SPLITFED_PARTITION"] == "classes:0-3,4-6,7-9" and env[role]["SPLITFED_MIN_CLIENTS"] == "2"
        assert env[role]["SPLITFED_CLIENT_TIMEOUT"] == "45" and env[role]["SPLITFED_EPOCHS"] == "2"
        assert {name for name in env[role] if name.startswith("SPLITFED_")} <= ROLES[role].env_names()
    assert env["split-server"]["SPLITFED_PROGRESS_EVENTS"] == "true" and env["split-client"]["SPLITFED_PROGRESS_EVENTS"] == "false"
    assert env["split-client"]["SPLITFED_PRIVATE_KEY"] == "/etc/splitfed/keys/split-client-$(SPLITFED_CLIENT_INDEX).key"
    assert env["split-fed"]["SPLITFED_PRIVATE_KEY"] == "/etc/splitfed/keys/split-fed.key"
    assert env["split-client"]["SPLITFED_VIA"] == "direct" and "SPLITFED_VIA" not in env["split-fed"]
    (budget,) = [o for o in objects if o["kind"] == "PodDisruptionBudget" and "split-client" in o["metadata"]["name"]]
    assert budget["spec"]["minAvailable"] == 2  # --min-clients: drains keep that many clients
    assert not helm_dry_run.made("POST") and not helm_dry_run.made("PUT")


def test_a_splitnn_launch_in_round_robin_has_no_fed(helm_dry_run):
    result = invoke("launch", "splitnn", "--dry-run", "--name", "nn", "-n", "ns1", "--clients", "2", "--schedule", "round-robin")
    assert result.exit_code == 0, result.stderr
    env = role_env(manifests(result.stdout))
    assert set(env) == {"split-client", "split-server", "rabbitmq"}
    assert env["split-server"]["SPLITFED_SCHEDULE"] == "round-robin"


def test_a_p2p_launch_renders_a_tracker_that_ends_and_a_peer_per_pod(helm_dry_run, tmp_path):
    """--peers is the peers' Indexed Job and what the tracker expects: it ends with the run (a Job)
    and leads it, and peers that have finished stay finished; each peer's completion index is its
    index and names its key."""
    keys = tmp_path / "keys"
    assert invoke("keys", "generate", "--no-server", "--party", "p2p-tracker",
                  *(arg for index in range(3) for arg in ("--party", f"p2p-peer-{index}")), "--out", keys).exit_code == 0
    result = invoke("launch", "p2p", "--dry-run", "--name", "pp", "-n", "ns1", "--peers", "3", "--epochs", "2", "--partition", "iid",
                    "--seed", "4", "--peer-timeout", "30", "--dataset", "digits", "--key-list", keys / "key-list.json")
    assert result.exit_code == 0, result.stderr
    objects = manifests(result.stdout)
    (tracker,) = [o for o in objects if o["metadata"]["name"] == "pp-splitfed-p2p-tracker"]
    assert tracker["kind"] == "Job" and tracker["spec"]["completions"] == 1
    (peers,) = [o for o in objects if o["metadata"]["name"] == "pp-splitfed-p2p-peer"]  # no headless Service: a Job
    assert peers["kind"] == "Job"
    assert (peers["spec"]["completionMode"], peers["spec"]["completions"], peers["spec"]["parallelism"]) == ("Indexed", 3, 3)
    (peer,) = peers["spec"]["template"]["spec"]["containers"]
    (index,) = [e for e in peer["env"] if e["name"] == "SPLITFED_PEER_INDEX"]
    assert index["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    assert not [o for o in objects if o["kind"] in ("Job", "StatefulSet", "Deployment") and "fedavg" in o["metadata"]["name"]]
    env = role_env(objects)
    assert set(env) == {"p2p-tracker", "p2p-peer", "rabbitmq"}
    assert env["p2p-tracker"]["SPLITFED_EXPECT_PEERS"] == "3" and env["p2p-tracker"]["SPLITFED_PROGRESS_EVENTS"] == "true"
    assert env["p2p-peer"]["SPLITFED_PEERS"] == "3" and env["p2p-peer"]["SPLITFED_EPOCHS"] == "2" and env["p2p-peer"]["SPLITFED_PARTITION"] == "iid"
    assert env["p2p-peer"]["SPLITFED_PRIVATE_KEY"] == "/etc/splitfed/keys/p2p-peer-$(SPLITFED_PEER_INDEX).key"
    assert env["p2p-tracker"]["SPLITFED_PRIVATE_KEY"] == "/etc/splitfed/keys/p2p-tracker.key"
    for role in ("p2p-tracker", "p2p-peer"):
        assert env[role]["SPLITFED_SEED"] == "4" and env[role]["SPLITFED_PEER_TIMEOUT"] == "30", role
        assert {name for name in env[role] if name.startswith("SPLITFED_")} <= ROLES[role].env_names(), role
    assert "SPLITFED_DATASET" not in env["p2p-tracker"] and env["p2p-peer"]["SPLITFED_DATASET"] == "digits"
    assert not helm_dry_run.made("POST") and not helm_dry_run.made("PUT")


def test_an_smpl_launch_shares_the_hyperedges_with_the_tracker(helm_dry_run):
    result = invoke("launch", "smpl", "--dry-run", "--name", "sm", "-n", "ns1", "--peers", "4", "--hyperedge-size", "3",
                    "--sparsity", "0.5", "--hyperepochs", "2")
    assert result.exit_code == 0, result.stderr
    objects = manifests(result.stdout)
    assert {o["kind"] for o in objects if o["metadata"]["name"] == "sm-splitfed-smpl-peer"} == {"Job"}  # launch: a run with an end
    env = role_env(objects)
    assert set(env) == {"p2p-tracker", "smpl-peer", "rabbitmq"}
    assert env["p2p-tracker"]["SPLITFED_HYPEREDGE_SIZE"] == env["smpl-peer"]["SPLITFED_HYPEREDGE_SIZE"] == "3"
    assert env["smpl-peer"]["SPLITFED_SPARSITY"] == "0.5" and "SPLITFED_SPARSITY" not in env["p2p-tracker"]
    assert env["p2p-tracker"]["SPLITFED_EXPECT_PEERS"] == "4" and env["smpl-peer"]["SPLITFED_PEERS"] == "4"
    for role in ("p2p-tracker", "smpl-peer"):
        assert {name for name in env[role] if name.startswith("SPLITFED_")} <= ROLES[role].env_names(), role


def test_an_smpl_launch_with_fewer_peers_than_a_hyperedge_is_refused(helm_dry_run):
    result = invoke("launch", "smpl", "--dry-run", "--name", "sm", "-n", "ns1", "--peers", "2", "--hyperedge-size", "3")
    assert result.exit_code == 2  # the run's own check, before helm is asked
    assert "--hyperedge-size 3 is more than the 2 peers" in result.stderr



def test_a_launch_with_a_task_file_sends_it_as_a_configmap_every_training_role_mounts(helm_dry_run, tmp_path):
    task = tmp_path / "hospital_task.py"
    task.write_text("import torch\n\n\ndef model(context):\n    torch.manual_seed(context.seed)\n    return torch.nn.Linear(64, 10)\n")
    result = invoke("launch", "fedavg", "--dry-run", "--name", "fl", "-n", "ns1", "--workers", "2", "--task", task,
                    "--dataset", "npz", "--classes", "0,1,2,3,4,5,6,7,8,9", "--set", "data.perParty.hostPath=/srv/data/{party}")
    assert result.exit_code == 0, result.stderr
    objects = manifests(result.stdout)
    (config,) = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "fl-splitfed-task"]
    assert config["data"] == {"hospital_task.py": task.read_text()}  # under its own name: tracebacks in the pods' logs name it
    env = role_env(objects)
    for role in ("fedavg-server", "fedavg-worker"):
        assert env[role]["SPLITFED_TASK"] == "/etc/splitfed/task/hospital_task.py", role
        assert env[role]["SPLITFED_DATASET"] == "npz" and env[role]["SPLITFED_CLASSES"] == "0,1,2,3,4,5,6,7,8,9", role
        assert env[role]["SPLITFED_DATA_DIR"] == "/data/{party}", role
        assert {name for name in env[role] if name.startswith("SPLITFED_")} <= ROLES[role].env_names(), role


def test_a_launch_with_a_task_module_names_it_and_mounts_nothing(helm_dry_run):
    result = invoke("launch", "split", "--dry-run", "--name", "sp", "-n", "ns1", "--task", "hospital.model", "--via", "direct")
    assert result.exit_code == 0, result.stderr
    objects = manifests(result.stdout)
    assert not [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-task")]
    env = role_env(objects)
    assert env["split-client"]["SPLITFED_TASK"] == env["split-server"]["SPLITFED_TASK"] == "hospital.model"


@pytest.mark.parametrize(("task", "message"), [
    ("absent_task.py", "no such file"),
    ("hospital-task", "give a file PATH.py or a module package.module"),
])
def test_a_task_launch_cannot_send_is_one_error_line(helm_dry_run, tmp_path, monkeypatch, task, message):
    monkeypatch.chdir(tmp_path)
    result = invoke("launch", "fedavg", "--dry-run", "--name", "fl", "-n", "ns1", "--task", task)
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: --task {task}: {message}"
    assert not helm_dry_run.requests  # refused before the cluster is asked anything


def test_a_launch_where_the_parties_evaluate_gives_the_server_no_data(helm_dry_run, tmp_path):
    """--evaluate parties: the workers score the model on their own test sets, so the server's
    pod gets no data volume and no SPLITFED_DATA_DIR (data.servers=false), and needs none."""
    task = tmp_path / "task.py"
    task.write_text("import torch\n\n\ndef model(context):\n    return torch.nn.Linear(64, 10)\n")
    result = invoke("launch", "fedavg", "--dry-run", "--name", "fl", "-n", "ns1", "--evaluate", "parties", "--dataset", "npz",
                    "--task", task, "--set", "data.perParty.hostPath=/srv/data/{party}")
    assert result.exit_code == 0, result.stderr
    objects = manifests(result.stdout)
    env = role_env(objects)
    assert env["fedavg-server"]["SPLITFED_EVALUATE"] == "parties" and "SPLITFED_DATA_DIR" not in env["fedavg-server"]
    assert env["fedavg-worker"]["SPLITFED_DATA_DIR"] == "/data/{party}"
    (server,) = [o for o in objects if o["kind"] == "Job" and o["metadata"]["name"] == "fl-splitfed-fedavg-server"]
    assert not [v for v in server["spec"]["template"]["spec"]["volumes"] if v["name"] == "data"]



def test_a_gpu_device_without_a_gpu_is_one_warning_line(helm_dry_run):
    """--device cuda reaches both fedavg roles (the family's shared settings); launch warns, in one
    line naming the role without a GPU request, and installs anyway. The worker's gpu.enabled gives
    it the GPU, the -cuda image and device cuda."""
    result = invoke("launch", "fedavg", "--dry-run", "--name", "fl", "-n", "ns1", "--device", "cuda", "--set", "fedavgWorker.gpu.enabled=true")
    assert result.exit_code == 0, result.stderr
    (warning,) = [line for line in result.stderr.splitlines() if "GPU" in line]
    assert warning.startswith("warning: device cuda asked of fedavg-server with no GPU requested")
    assert warning.endswith("--set fedavgServer.gpu.enabled=true requests one, with the -cuda image")
    objects = manifests(result.stdout)
    assert {role: env["SPLITFED_DEVICE"] for role, env in role_env(objects).items() if role != "rabbitmq"} == {"fedavg-server": "cuda", "fedavg-worker": "cuda"}
    images = {o["metadata"]["name"]: o["spec"]["template"]["spec"]["containers"][0]["image"] for o in objects if o["kind"] in ("Job", "StatefulSet")}
    assert images["fl-splitfed-fedavg-worker"].endswith("-cuda") and not images["fl-splitfed-fedavg-server"].endswith("-cuda")
