"""The local cluster test, our stand-in for kind: the Helm chart's pods run for real as containers.

For a small FedAvg run (its checkpoint on the claim's volume), a small signed split run through
the relay, a small run of several split clients (splitfed-v1, with the split-fed), and signed
p2p and SMPL runs, the chart is rendered with `helm template`, its workloads are turned into
Pods, and `podman kube play --network host` runs them from the images `ci/images.sh` built,
against this machine's RabbitMQ. The FedAvg and split runs must end with the same accuracy as
`splitfed run` on the same settings in one process of the same image; the decentralized ones,
whose peers run concurrently, must train every epoch (hyperedge) of every peer, well above chance.
The signed runs take their key list and keys from a Secret (keys.existingSecret) and must refuse
nothing.
The FedAvg run and the run of several split clients are a federation's: each party reads its own
data, digits in npz files, from its own folder (data.perParty.hostPath .../{party}, which each role
fills in with its name), and its model from a task file the chart puts in a ConfigMap (task.file).

What this covers: the images' entrypoints, users and read-only root filesystems; the chart's
SPLITFED_* variables, arguments, security contexts and memory limits as the containers get them;
the broker credentials from a mounted Secret; worker identities from pod ordinals, split-client identities from
completion indices; a whole run in containers.

What it does not (no Kubernetes API server can run here), and how each is stood in for:
- Jobs, Deployments and StatefulSets become one Pod per replica (podman 4.3 plays Pods and
  Deployments, not Jobs or StatefulSets); ordinals are given to the StatefulSet's pods as the
  `apps.kubernetes.io/pod-index` label Kubernetes sets, and an Indexed Job becomes one Pod per
  completion, with the `batch.kubernetes.io/job-completion-index` annotation Kubernetes sets.
- `secretKeyRef` and downward-API `fieldRef` values, and `$(VAR)` references, are resolved by the
  test, as the kubelet would; the broker Secret is the test's own (the machine's guest user).
- A secret volume becomes a folder holding the Secret's items with the volume's mode (0440),
  owned by root and the pod's fsGroup, mounted from the host: a role reads its broker
  credentials through the group the chart gives it, as on a cluster.
- Services, NetworkPolicies, the ServiceAccount and the helm test Pod are not run: pods use the
  host network, so neither DNS names nor network policies are exercised.
- On the host network, container ports cannot be mapped: they are dropped, and each pod's
  metrics port is moved to one of its own (all pods share the host's ports).
- A persistent volume claim becomes a folder of the test's, owned by root and the pod's fsGroup
  (mode 2770), as the kubelet hands a fresh volume to a pod with fsGroup; probes are dropped (podman runs them as health
  checks, which would only slow the run); restart policies become Never, so a failure shows.
- A configMap volume becomes a folder holding the ConfigMap's items, as the kubelet projects them,
  mounted from the host (the ConfigMap is the one the chart rendered); hostPath volumes are played as they are.
- The chart's own RabbitMQ StatefulSet is not run: the values point at an external broker.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import uuid
from pathlib import Path

import pytest
import yaml

from splitfed.security import keys
from tests.conftest import REPO, render
from tests.shared_broker import BROKER, delete_queues_of

CONTAINERS_CONF = REPO / "ci" / "containers.conf"
WORKLOADS = {"Job", "Deployment", "StatefulSet"}
NOT_RUN = {"Service", "NetworkPolicy", "ServiceAccount", "Secret", "ConfigMap", "PersistentVolumeClaim", "Pod"}
SMALL_FEDAVG = {"seed": 3, "lr": 0.01}  # with 2 rounds, 2 workers: the task's small model learns at 0.01
SMALL_SPLIT = {"epochs": 1, "batch-size": 32}  # on digits
# The parties' own data and their task: how the chart gets them, and the same for `splitfed run`.
DATA_ROOT = "/data"  # data.mountPath: where the pods, and the reference run, see the parties' folders
TASK = """import torch
from torch import nn

input_shape = (1, 8, 8)  # the split-server, which holds no data, builds its layers from these
classes = [str(digit) for digit in range(10)]


def model(context):  # a hidden layer: split learning cuts before the classifier, and the client must keep weights
    torch.manual_seed(context.seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
"""


def podman(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}
    result = subprocess.run(["podman", *args], capture_output=True, text=True, env=env, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} failed ({result.returncode}): {result.stderr[-2000:]}")
    return result


@pytest.fixture(scope="session")
def images() -> None:
    """The role images `ci/images.sh` builds; a missing one is a broken set-up, not a skip."""
    missing = [role for role in ("relay", "split-client", "split-server", "split-fed", "fedavg-server", "fedavg-worker")
               if podman("image", "exists", f"localhost/splitfed-{role}:latest", check=False).returncode != 0]
    assert not missing, f"images {missing} are not built: run ci/images.sh"


def write_party_data(root: Path, parties: list[str]) -> dict[str, int]:
    """Digits (scikit-learn's own copy) cut into one folder per party under `root`, named by the
    party, each with train.npz and test.npz (x: uint8 (N, 1, 8, 8), y: int64) disjoint from the
    others' and of a size of its own (the k-th party k shares), readable by the containers' user.
    The chart mounts `root` for data.perParty.hostPath ROOT/{party}. Returns each party's number
    of training samples, by which a party's result shows whose folder it read."""
    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.uint8).reshape(-1, 1, 8, 8)
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(labels))
    train, test = np.split(order, [len(order) * 4 // 5])
    shares = np.cumsum(range(1, len(parties) + 1))
    root.mkdir()
    sizes = {}
    for index, party in enumerate(parties):
        folder = root / party
        folder.mkdir()
        for part, rows in (("train", train), ("test", test)):
            cuts = len(rows) * shares // shares[-1]
            mine = rows[(cuts[index - 1] if index else 0):cuts[index]]
            np.savez(folder / f"{part}.npz", x=images[mine], y=labels[mine])
            (folder / f"{part}.npz").chmod(0o644)
            if part == "train":
                sizes[party] = len(mine)
        folder.chmod(0o755)
    root.chmod(0o755)
    return sizes


def per_party(root: Path) -> dict:
    """Chart values for parties that each read their own folder under `root` and take TASK."""
    return {"data": {"dataset": "npz", "perParty": {"hostPath": f"{root}/{{party}}"}}, "task": {"file": TASK}}


def chart_values(session: str, scenario: dict) -> dict:
    values = {
        "session": session,
        "broker": {"external": {"enabled": True, "host": "127.0.0.1", "port": 5672, "existingSecret": "e2e-broker"}},
        "networkPolicy": {"enabled": False},
        "data": {"dataset": "digits"},
    }
    return merge(values, scenario)  # the images are the chart's defaults: as ci/images.sh tags them


def merge(base: dict, extra: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in extra.items():
        merged[key] = merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def resolve_env(container: dict, pod_name: str, labels: dict, secrets: dict[str, dict[str, str]], annotations: dict | None = None) -> None:
    """Turn the container's env into literal values, as the kubelet would."""
    resolved: dict[str, str] = {}
    annotations = annotations or {}
    for variable in container.get("env", []):
        if "valueFrom" in variable:
            source = variable.pop("valueFrom")
            if "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                value = secrets[ref["name"]][ref["key"]]
            else:
                path = source["fieldRef"]["fieldPath"]
                label = re.fullmatch(r"metadata\.labels\['(.+)'\]", path)
                annotation = re.fullmatch(r"metadata\.annotations\['(.+)'\]", path)
                if label:
                    value = labels[label.group(1)]
                elif annotation:
                    value = annotations[annotation.group(1)]
                else:
                    value = {"metadata.name": pod_name, "metadata.namespace": "default"}[path]
        else:
            value = str(variable.get("value", ""))
        value = re.sub(r"\$\((\w+)\)", lambda ref: resolved.get(ref.group(1), ref.group(0)), value)
        variable["value"] = resolved[variable["name"]] = value


def config_map_folders(objects: list[dict], where: Path) -> dict[str, Path]:
    """Each rendered ConfigMap's items as files in a folder of its own (name -> folder), as the
    kubelet projects them into a configMap volume, readable by the containers' user."""
    folders = {}
    for obj in objects:
        if obj["kind"] == "ConfigMap":
            folder = where / obj["metadata"]["name"]
            folder.mkdir(parents=True)
            for key, text in obj.get("data", {}).items():
                (folder / key).write_text(text)
                (folder / key).chmod(0o444)
            folder.chmod(0o755)
            folders[obj["metadata"]["name"]] = folder
    return folders


def secret_folder(volume: dict, secrets: dict[str, dict[str, str]], folder: Path, fs_group: int) -> Path:
    """A secret volume's items as the kubelet projects them: one file per item, with the volume's
    defaultMode, owned by root and the pod's fsGroup; the container reads them through that group only."""
    folder.mkdir(parents=True)
    for item in volume["items"]:
        path = folder / item["path"]
        path.write_text(secrets[volume["secretName"]][item["key"]])
        os.chown(path, 0, fs_group)
        path.chmod(volume["defaultMode"])
    os.chown(folder, 0, fs_group)
    folder.chmod(0o750)
    return folder


def pods_of(objects: list[dict], secrets: dict[str, dict[str, str]], results: Path, config_maps: dict[str, Path]) -> list[dict]:
    """One Pod per replica of every workload, ready for `podman kube play`; each mounts `results`
    at /results, where a role writes its result when SPLITFED_OUT says so, and each configMap
    volume is the ConfigMap's folder of `config_maps`."""
    pods = []
    free_ports = iter(range(19100, 19200))
    for obj in objects:
        if obj["kind"] not in WORKLOADS:
            assert obj["kind"] in NOT_RUN, f"the test does not know how to stand in for a {obj['kind']}"
            continue
        indexed = obj["kind"] == "Job" and obj["spec"].get("completionMode") == "Indexed"
        if obj["kind"] == "Job":
            replicas = obj["spec"]["completions"] if indexed else 1
        else:
            replicas = obj["spec"].get("replicas", 1)
        for ordinal in range(replicas):
            template = copy.deepcopy(obj["spec"]["template"])
            name = f"{obj['metadata']['name']}-{ordinal}"
            labels = {**template["metadata"].get("labels", {})}
            annotations = {**template["metadata"].get("annotations", {})}
            if obj["kind"] == "StatefulSet":
                labels["apps.kubernetes.io/pod-index"] = str(ordinal)
            if indexed:
                annotations["batch.kubernetes.io/job-completion-index"] = str(ordinal)
            spec = template["spec"]
            spec["restartPolicy"] = "Never"
            for field in ("serviceAccountName", "automountServiceAccountToken"):
                spec.pop(field, None)
            for volume in spec.get("volumes", []):
                if "persistentVolumeClaim" in volume:  # a fresh volume as the kubelet hands it over: its group the pod's fsGroup, setgid
                    claim = results.parent / "volumes" / volume.pop("persistentVolumeClaim")["claimName"]
                    claim.mkdir(parents=True, exist_ok=True)
                    os.chown(claim, 0, spec["securityContext"]["fsGroup"])
                    claim.chmod(0o2770)
                    volume["hostPath"] = {"path": str(claim), "type": "Directory"}
                if "secret" in volume:
                    volume["hostPath"] = {"path": str(secret_folder(volume.pop("secret"), secrets, results.parent / "secrets" / name / volume["name"], spec["securityContext"]["fsGroup"])), "type": "Directory"}
                if "configMap" in volume:
                    projected = volume.pop("configMap")
                    assert [item["key"] for item in projected["items"]] == [item["path"] for item in projected["items"]]
                    volume["hostPath"] = {"path": str(config_maps[projected["name"]]), "type": "Directory"}
            spec.setdefault("volumes", []).append({"name": "e2e-results", "hostPath": {"path": str(results), "type": "Directory"}})
            for container in spec["containers"]:
                for field in ("livenessProbe", "readinessProbe", "startupProbe", "ports"):
                    container.pop(field, None)
                resolve_env(container, name, labels, secrets, annotations)
                for variable in container["env"]:
                    if variable["name"] == "SPLITFED_METRICS_PORT" and variable["value"] != "0":
                        variable["value"] = str(next(free_ports))
                container.setdefault("volumeMounts", []).append({"name": "e2e-results", "mountPath": "/results"})
                container["env"].append({"name": "SPLITFED_OUT", "value": f"/results/{name}.json"})
            metadata = {"name": name, "labels": labels, **({"annotations": annotations} if annotations else {})}
            pods.append({"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec})
    return pods


class Cluster:
    """The pods of one rendered release, played by podman; removed again at the end."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.results = workdir / "results"
        self.results.mkdir()
        self.results.chmod(0o777)  # the containers write as uid 10001
        self.pods: list[str] = []
        self.session: str | None = None

    def install(self, helm: Path, scenario: dict, secrets: dict[str, dict[str, str]] | None = None) -> list[str]:
        """Render the chart for `scenario` (values over `chart_values`), play its pods, and
        return their names."""
        values_file = self.workdir / "values.yaml"
        self.session = "e2e-" + uuid.uuid4().hex[:8]
        values_file.write_text(yaml.safe_dump(chart_values(self.session, scenario)))
        objects = render(helm, "-f", str(values_file), release="e2e")
        pods = pods_of(objects, {**broker_secret(), **(secrets or {})}, self.results, config_map_folders(objects, self.workdir / "config-maps"))
        manifest = self.workdir / "pods.yaml"
        manifest.write_text(yaml.safe_dump_all(pods))
        self.pods = [pod["metadata"]["name"] for pod in pods]
        self.remove()  # pods of these names left by a test run that was killed before it could remove them
        podman("kube", "play", "--network", "host", str(manifest))
        return sorted(self.pods)

    def wait(self, pod: str, container: str, timeout: float = 600) -> dict:
        """The exit code and result of a run-to-completion container."""
        name = f"{pod}-{container}"
        code = int(podman("wait", name, timeout=timeout).stdout.strip())
        assert code == 0, f"{name} exited with {code}:\n{podman('logs', name, check=False).stderr[-3000:]}"
        return json.loads((self.results / f"{pod}.json").read_text())

    def remove(self) -> None:
        for pod in self.pods:
            podman("pod", "rm", "--force", pod, check=False)
        if self.session:  # the release's durable queues on the shared broker
            delete_queues_of(BROKER, self.session)


def reference_run(image: str, results: Path, scenario: str, settings: dict, mounts: tuple[str, ...] = ()) -> dict:
    """`splitfed run` on the same settings, in one process of the same image (as its user), with
    `mounts` (podman -v HOST:CONTAINER[:OPTIONS]) too."""
    flags = [item for key, value in settings.items() for item in (f"--{key}", str(value))]
    volumes = [item for mount in (f"{results}:/results", *mounts) for item in ("-v", mount)]
    podman("run", "--rm", "--network", "host", "--read-only", "--tmpfs", "/tmp", *volumes,
           "--entrypoint", "splitfed", image, "run", scenario, *flags, "--out", "/results/reference.json", timeout=600)
    return json.loads((results / "reference.json").read_text())


@pytest.fixture
def cluster(tmp_path):
    cluster = Cluster(tmp_path)
    yield cluster
    cluster.remove()


def broker_secret() -> dict[str, dict[str, str]]:
    return {"e2e-broker": {"username": "guest", "password": "guest"}}


@pytest.mark.usefixtures("images", "broker_url")
def test_a_fedavg_federation_of_own_data_runs_as_containers_and_equals_splitfed_run(helm, cluster, tmp_path):
    """Each party reads its own folder, /data/{party}: the server its test set (it scores the
    global model), each worker its share; the model is the task's, from the task ConfigMap."""
    settings = {**SMALL_FEDAVG}
    data = tmp_path / "parties"
    samples = write_party_data(data, ["fedavg-server", "worker-0", "worker-1"])
    pods = cluster.install(helm, {
        **per_party(data),
        "fedavg": {"settings": settings},
        "fedavgWorker": {"replicas": 2},
        # One server (no standby: on one host the test plays no second node's view of a shared volume).
        "fedavgServer": {"replicas": 1, "settings": {"rounds": 2}},
    })
    assert pods == ["e2e-splitfed-fedavg-server-0", "e2e-splitfed-fedavg-worker-0", "e2e-splitfed-fedavg-worker-1"]
    result = cluster.wait("e2e-splitfed-fedavg-server-0", "fedavg-server")
    workers = [cluster.wait(f"e2e-splitfed-fedavg-worker-{i}", "fedavg-worker") for i in range(2)]
    assert {w["worker"]: w["samples"] for w in workers} == {party: samples[party] for party in ("worker-0", "worker-1")}  # its own folder
    # the checkpoint, on the claim's volume, written by the role's uid through the fsGroup's permissions
    state = cluster.workdir / "volumes" / "e2e-splitfed-fedavg-server-checkpoint" / "state.json"
    assert state.stat().st_uid == 10001 and json.loads(state.read_text())["round"] == 3
    task = cluster.workdir / "config-maps" / "e2e-splitfed-task"
    reference = reference_run("localhost/splitfed-fedavg-server:latest", cluster.results, "fedavg",
                              {**settings, "rounds": 2, "workers": 2, "dataset": "npz", "data-dir": f"{DATA_ROOT}/{{party}}",
                               "task": "/etc/splitfed/task/task.py"},
                              mounts=(f"{data}:{DATA_ROOT}:ro", f"{task}:/etc/splitfed/task:ro"))
    assert [r["accuracy"] for r in result["history"]] == [r["accuracy"] for r in reference["history"]]
    assert result["history"][-1]["accuracy"] > 0.6  # two rounds (0.98 here, on the server's 60 test digits): well above chance (0.1)


# Refusals that would mean a party's frames were not what the release's keys and sizes allow; a
# decentralized run may still refuse a late or repeated frame (`duplicate`, `sender`) in a race.
UNTRUSTED = ("unsigned", "signature", "unknown-key", "replay", "oversized", "malformed")


def assert_signed_and_clean(containers: dict[str, str]) -> None:
    """Each pod (-> its container) ran with a key list, and refused no frame for its signature, key, run or size."""
    for pod, container in containers.items():
        log = podman("logs", f"{pod}-{container}").stderr
        refused = re.findall(r"rejected a message \(([\w-]+)\)", log)
        assert "UNSAFE MODE" not in log and not set(refused) & set(UNTRUSTED), log[-2000:]


def key_secret(folder: Path) -> dict[str, str]:
    """What `kubectl create secret generic NAME --from-file=FOLDER` would hold: the key list and every private key."""
    return {path.name: path.read_text() for path in folder.iterdir() if path.suffix in (".json", ".key")}


@pytest.mark.usefixtures("images", "broker_url")
def test_a_signed_split_release_through_the_relay_runs_as_containers_and_equals_splitfed_run(helm, cluster, tmp_path):
    """Signed: the key list and each half's private key come from a Secret (keys.existingSecret),
    mounted with the chart's mode (0440) and read through the pod's fsGroup, as on a cluster."""
    settings = {**SMALL_SPLIT}
    keys.generate(tmp_path / "keys", ["split-client", "split-server"])
    pods = cluster.install(helm, {
        "fedavgServer": {"enabled": False}, "fedavgWorker": {"enabled": False},
        "relay": {"enabled": True}, "splitClient": {"enabled": True}, "splitServer": {"enabled": True},
        "split": {"settings": settings}, "keys": {"existingSecret": "e2e-keys"},
    }, secrets={"e2e-keys": key_secret(tmp_path / "keys")})
    assert pods == ["e2e-splitfed-relay-0", "e2e-splitfed-split-client-0", "e2e-splitfed-split-server-0"]
    result = cluster.wait("e2e-splitfed-split-client-0", "split-client")
    assert_signed_and_clean({f"e2e-splitfed-{role}-0": role for role in ("relay", "split-client", "split-server")})
    reference = reference_run("localhost/splitfed-split-client:latest", cluster.results, "split", {**settings, "dataset": "digits"})
    assert result["accuracy"] == reference["accuracy"]
    assert result["accuracy"] > 0.5


@pytest.mark.usefixtures("images", "broker_url")
def test_a_splitnn_federation_of_own_data_with_the_fed_runs_as_containers_and_equals_splitfed_run(helm, cluster, tmp_path):
    """Two split clients (an Indexed Job: each pod's completion index is its client index) on
    splitfed-v1, the split-fed averaging their layers, the server leading. Each client reads its
    own folder, /data/split-client-0 and -1; the server gets no data (data.servers false: its
    layers are built from the task's input_shape and classes); the model is the task's. The
    clients clip and noise what they send (their own settings: the server and the fed get none)."""
    settings = {**SMALL_SPLIT, "schedule": "splitfed-v1", "lr": 0.01}  # the task's small model learns one epoch at 0.01
    defences = {"activation-clip": 10, "activation-noise": 0.01}
    # the split-server's folder is for the reference run, where every role is given --data-dir
    data = tmp_path / "parties"
    samples = write_party_data(data, ["split-client-0", "split-client-1", "split-server"])
    own = per_party(data)
    own["data"]["servers"] = False
    pods = cluster.install(helm, {
        **own,
        "fedavgServer": {"enabled": False}, "fedavgWorker": {"enabled": False},
        "splitClient": {"enabled": True, "replicas": 2, "settings": defences}, "splitServer": {"enabled": True}, "splitFed": {"enabled": True},
        "split": {"settings": settings},
    })
    assert pods == ["e2e-splitfed-split-client-0", "e2e-splitfed-split-client-1", "e2e-splitfed-split-fed-0", "e2e-splitfed-split-server-0"]
    result = cluster.wait("e2e-splitfed-split-server-0", "split-server")
    for index in range(2):  # each client trained on its own folder
        assert cluster.wait(f"e2e-splitfed-split-client-{index}", "split-client")["samples"] == samples[f"split-client-{index}"]
    assert cluster.wait("e2e-splitfed-split-fed-0", "split-fed")["averaged_periods"] == 1
    assert [epoch["included"] for epoch in result["history"]] == [["split-client-0", "split-client-1"]]
    task = cluster.workdir / "config-maps" / "e2e-splitfed-task"
    reference = reference_run("localhost/splitfed-split-server:latest", cluster.results, "splitnn",
                              {**settings, **defences, "clients": 2, "dataset": "npz", "data-dir": f"{DATA_ROOT}/{{party}}",
                               "task": "/etc/splitfed/task/task.py"},
                              mounts=(f"{data}:{DATA_ROOT}:ro", f"{task}:/etc/splitfed/task:ro"))
    assert result["accuracy"] == pytest.approx(reference["accuracy"], abs=0.01)  # the layers agree to ~1e-5 (float sums)
    assert result["accuracy"] > 0.6  # one epoch on digits (0.87 here): well above chance (0.1)


@pytest.mark.usefixtures("images", "broker_url")
def test_a_signed_p2p_release_runs_as_containers(helm, cluster, tmp_path):
    """The tracker a Job that ends with the run, three peers an Indexed Job, every party signing
    with its key from the Secret: each peer trains all its epochs and the tracker lets them all leave."""
    peers = [f"p2p-peer-{index}" for index in range(3)]
    keys.generate(tmp_path / "keys", ["p2p-tracker", *peers])
    pods = cluster.install(helm, {
        "fedavgServer": {"enabled": False}, "fedavgWorker": {"enabled": False}, "data": {"dataset": "digits"},
        "p2pTracker": {"enabled": True, "settings": {"expect-peers": 3}},
        "p2pPeer": {"enabled": True, "replicas": 3, "settings": {"epochs": 3, "partition": "iid", "batch-size": 16}},
        "p2p": {"settings": {"seed": 3, "peer-timeout": 120}}, "keys": {"existingSecret": "e2e-keys"},
    }, secrets={"e2e-keys": key_secret(tmp_path / "keys")})
    assert pods == ["e2e-splitfed-p2p-peer-0", "e2e-splitfed-p2p-peer-1", "e2e-splitfed-p2p-peer-2", "e2e-splitfed-p2p-tracker-0"]
    tracker = cluster.wait("e2e-splitfed-p2p-tracker-0", "p2p-tracker")
    for index in range(3):
        assert [record["epoch"] for record in cluster.wait(f"e2e-splitfed-p2p-peer-{index}", "p2p-peer")["history"]] == [1, 2, 3]
    assert {name: peer["state"] for name, peer in tracker["peers"].items()} == dict.fromkeys(peers, "left")
    assert tracker["accuracy"] > 0.5  # chance is 0.1
    assert_signed_and_clean({"e2e-splitfed-p2p-tracker-0": "p2p-tracker", **{f"e2e-splitfed-{peer}": "p2p-peer" for peer in peers}})


@pytest.mark.usefixtures("images", "broker_url")
def test_a_signed_smpl_release_runs_as_containers(helm, cluster, tmp_path):
    """The tracker a Deployment that serves until uninstalled (removed with the pods at the end),
    three peers a StatefulSet training two hyperepochs in hyperedges of 3, every frame (hyperedges, start models, sparse changes) signed."""
    peers = [f"smpl-peer-{index}" for index in range(3)]
    keys.generate(tmp_path / "keys", ["p2p-tracker", *peers])
    pods = cluster.install(helm, {
        "fedavgServer": {"enabled": False}, "fedavgWorker": {"enabled": False}, "data": {"dataset": "digits"},
        "p2pTracker": {"enabled": True},
        "smplPeer": {"enabled": True, "replicas": 3, "settings": {"hyperepochs": 2, "sparsity": 0.9, "partition": "iid", "batch-size": 16, "hyperedge-timeout": 30}},
        "smpl": {"settings": {"hyperedge-size": 3, "seed": 5, "peer-timeout": 120}},
        "keys": {"existingSecret": "e2e-keys"},
    }, secrets={"e2e-keys": key_secret(tmp_path / "keys")})
    assert pods == ["e2e-splitfed-p2p-tracker-0", "e2e-splitfed-smpl-peer-0", "e2e-splitfed-smpl-peer-1", "e2e-splitfed-smpl-peer-2"]
    histories = [cluster.wait(f"e2e-splitfed-smpl-peer-{index}", "smpl-peer")["history"] for index in range(3)]
    assert_signed_and_clean({"e2e-splitfed-p2p-tracker-0": "p2p-tracker", **{f"e2e-splitfed-{peer}": "smpl-peer" for peer in peers}})
    assert [len(history) for history in histories] == [2, 2, 2], histories  # every peer trained both hyperepochs
    # Signed changes were exchanged and averaged (a member that has trained all its hyperepochs
    # leaves, so a hyperedge still open elsewhere may close with fewer of them).
    assert sum(record["averaged"] for history in histories for record in history) >= 3, histories
    assert max(history[-1]["accuracy"] for history in histories) > 0.5, histories  # chance is 0.1
