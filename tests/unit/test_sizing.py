"""splitfed.sizing: the models described as shapes agree with learning.models, quantities parse as
Kubernetes reads them, the estimate moves the way memory does, and `splitfed size` speaks like
the rest of the CLI. (tests/integration/test_sizing.py checks the estimates against real peaks.)"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from splitfed import sizing
from splitfed.learning import cutting, models, train
from splitfed.learning.settings import DATASETS, OPTIMIZERS, SPLIT_MODES
from splitfed.roles.registry import ROLES

ROOT = Path(__file__).resolve().parents[2]
VALUES = yaml.safe_load((ROOT / "helm" / "splitfed" / "values.yaml").read_text())
MIB = 1024 * 1024


def run_cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "splitfed", *args], capture_output=True, text=True, timeout=timeout)


# -- the models as shapes -------------------------------------------------------------------------


@pytest.mark.parametrize("model", sorted(sizing.PLANS))
@pytest.mark.parametrize("dataset", sorted(DATASETS))
def test_layers_as_shapes_match_the_torch_models(model, dataset):
    meta = DATASETS[dataset]
    built = models.build(model, meta, seed=1)
    described = sizing.model_layers(model, meta)
    assert len(described) == len(built)
    shape = meta.shape
    for index, (layer, module) in enumerate(zip(described, built)):
        shape = models.output_shape(module, shape)
        assert layer.out == shape, f"layer {index} ({module})"
        assert layer.params == sum(p.numel() for p in module.parameters()), f"layer {index} ({module})"
        assert layer.view == isinstance(module, torch.nn.Flatten)
        assert layer.indices == isinstance(module, torch.nn.MaxPool2d)


def test_default_cut_and_roles_are_the_projects():
    assert sizing.DEFAULT_CUT == models.DEFAULT_CUT
    assert sizing.ROLE_NAMES == tuple(ROLES)
    for role, spec in ROLES.items():
        assert spec.learning is None or issubclass(sizing.settings_class(role), spec.learning)
        assert sizing.values_key(role) == spec.values_key and spec.values_key in VALUES, f"{role}: no {spec.values_key} in values.yaml"
        assert ("gpu" in VALUES[spec.values_key]) == spec.torch == (role in sizing.GPU_ROLES)


@pytest.mark.parametrize("model", sorted(sizing.PLANS))
@pytest.mark.parametrize("mode", SPLIT_MODES)
def test_split_parts_refuse_what_a_run_refuses(model, mode):
    meta = DATASETS["fashion-mnist"]
    layers = sizing.model_layers(model, meta)
    for cut in [None, *range(0, len(layers) + 1)]:
        try:
            parts = cutting.cut(models.build(model, meta, 1), cut, mode)
            for held in ([*parts.head.parameters(), *(parts.tail.parameters() if parts.tail else [])], list(parts.body.parameters())):
                train.optimizer(held, "adam", 1e-3)
        except ValueError:
            with pytest.raises(sizing.CannotSplit):
                sizing.split_parts(layers, cut, mode)
            continue
        found = sizing.split_parts(layers, cut, mode)
        assert (len(found.head), len(found.body), len(found.tail)) == (len(parts.head), len(parts.body), len(parts.tail or []))
        assert found.cut_shape == models.output_shape(parts.head, meta.shape)


# -- Kubernetes quantities ------------------------------------------------------------------------


@pytest.mark.parametrize(("quantity", "expected"), [
    ("640Mi", 640 * MIB), ("1Gi", 1024 * MIB), ("64Ki", 64 * 1024), ("1.5Gi", 1536 * MIB), ("600M", 600_000_000),
    ("1G", 10**9), ("100k", 100_000), ("128974848", 128974848), ("129e6", 129_000_000), ("1E3", 1000), (" 512Mi ", 512 * MIB),
    ("500m", 1), (1073741824, 1024 * MIB), ("0", 0), (".5Ki", 512),
])
def test_kubernetes_quantities(quantity, expected):
    assert sizing.parse_quantity(quantity) == expected


@pytest.mark.parametrize("quantity", ["", "Mi", "1GB", "1gi", "1K", "-1Gi", "1 Gi", "1.2.3", "0x10", "ten", "1Mi1", True, None, [1]])
def test_bad_quantities_say_so(quantity):
    with pytest.raises(ValueError, match="Kubernetes quantity"):
        sizing.parse_quantity(quantity)


# -- how the estimate moves -----------------------------------------------------------------------


def part(estimate, prefix, phase="training"):
    return sum(p.mib for found in estimate.phases if found.name == phase for p in found.parts if p.name.startswith(prefix))


def test_optimizer_state_scales_with_the_optimizer():
    adam = sizing.estimate_from("split-client", {"optimizer": "adam"})
    sgd = sizing.estimate_from("split-client", {"optimizer": "sgd"})  # learning.train's sgd: momentum 0.9, one buffer
    parameters = part(adam, "parameters")
    assert part(adam, "optimizer state") == pytest.approx(2 * parameters)
    assert part(sgd, "optimizer state") == pytest.approx(parameters)
    assert adam.mib > sgd.mib
    assert set(sizing.OPTIMIZER_STATE) == set(OPTIMIZERS)
    # The fedavg-server trains nothing: parameters, no gradients, no optimizer state.
    server = sizing.estimate("fedavg-server")
    assert part(server, "parameters", "aggregating") > 0 and part(server, "gradients", "aggregating") == part(server, "optimizer state", "aggregating") == 0


@pytest.mark.parametrize("role", sizing.ROLE_NAMES)
def test_a_bigger_batch_needs_more(role):
    small, big = (sizing.estimate_from(role, {"batch_size": size, "limit": 5000}) for size in (32, 1024))
    # the server only evaluates (its batch is the evaluation batch); the fed only averages layers; the tracker trains nothing
    if role in ("fedavg-server", "split-fed", "p2p-tracker"):
        assert big.mib == small.mib
    else:
        assert big.mib > small.mib
    if role not in ("fedavg-worker", "split-fed", "p2p-tracker"):  # none of them evaluates
        assert sizing.estimate_from(role, {"eval_batch_size": 2000}).mib > sizing.estimate_from(role, {"eval_batch_size": 100}).mib


def test_a_bigger_model_needs_more():
    for role in ("fedavg-server", "fedavg-worker", "p2p-peer", "smpl-peer"):
        assert sizing.estimate_from(role, {"model": "cnn"}).mib > sizing.estimate_from(role, {"model": "tiny"}).mib


def test_the_relay_imports_no_torch():
    for build in sizing.TORCH_BUILDS:
        relay = sizing.estimate("relay", torch_build=build)
        assert relay.torch_build is None
        assert not any("torch" in p.name for phase in relay.phases for p in phase.parts)
        assert relay.mib < 100
    cpu, cuda = (sizing.estimate("split-server", torch_build=build) for build in sizing.TORCH_BUILDS)
    assert cuda.mib - cpu.mib == pytest.approx(sizing.TORCH_IMPORT_MIB["cuda"] - sizing.TORCH_IMPORT_MIB["cpu"]
                                               + sizing.OPTIMIZER_IMPORT_MIB["cuda"] - sizing.OPTIMIZER_IMPORT_MIB["cpu"])


def test_the_tracker_imports_no_torch_and_holds_little():
    for build in sizing.TORCH_BUILDS:
        tracker = sizing.estimate("p2p-tracker", torch_build=build)
        assert tracker.torch_build is None and tracker.gpu is None
        assert not any("torch" in p.name for phase in tracker.phases for p in phase.parts)
        assert tracker.mib < 100
    # a thousand peers' entries and reports: still a few MiB
    crowd = sizing.estimate_from("p2p-tracker", {"peers": 1000, "hyperepochs": 10})
    assert 0 < crowd.mib - sizing.estimate("p2p-tracker").mib < 32
    with pytest.raises(ValueError, match="no GPU"):
        sizing.estimate("p2p-tracker", gpu=True)


def test_a_peer_holds_its_share_a_whole_model_and_the_models_that_arrive():
    """A peer is sized like a fedavg-worker that also evaluates: its share of the data (fewer
    peers, bigger shares), the whole model with one optimiser, and a copy of the model per peer
    that sends it one (p2p) or per member of its open hyperedges (smpl)."""
    few, many = (sizing.estimate_from("p2p-peer", {"peers": peers}) for peers in (2, 10))
    assert part(few, "data (uint8 share") > part(many, "data (uint8 share")
    assert part(many, "messages") > part(few, "messages")
    worker = sizing.estimate_from("fedavg-worker", {"partition": "iid"})
    assert part(few, "parameters") == part(worker, "parameters") and part(few, "optimizer state") == part(worker, "optimizer state")
    edges = [sizing.estimate_from("smpl-peer", {"peers": 8, "hyperedge_size": size, "max_hyperedges": count}) for size, count in ((2, 1), (4, 1), (4, 3))]
    assert part(edges[0], "messages") < part(edges[1], "messages") < part(edges[2], "messages")
    one, hogwild = (sizing.estimate_from("smpl-peer", {"local_parallel": parallel, "local_workers": 4}) for parallel in ("sgd", "hogwild"))
    assert part(hogwild, "activations") > part(one, "activations")
    with pytest.raises(ValueError, match="--hyperedge-size 5 is more than the 4 peers"):
        sizing.estimate_from("smpl-peer", {"hyperedge_size": 5})


def test_sizing_imports_no_torch():
    code = "import sys; from splitfed import sizing; sizing.check_values({}); sizing.estimate('split-client'); assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).returncode == 0


def test_requests_and_limits_follow_the_charts_convention():
    for role in sizing.ROLE_NAMES:
        found = sizing.estimate(role)
        assert found.low_mib <= found.mib <= found.high_mib
        assert found.request_mib % 32 == 0 and found.limit_mib % 32 == 0
        assert found.mib <= found.request_mib < found.mib + 32
        assert found.limit_mib >= max(1.25 * found.mib, found.high_mib)
        assert found.request == f"{found.request_mib}Mi" and found.limit == f"{found.limit_mib}Mi"


def test_the_defaults_bracket_the_peaks_measured_in_the_images():
    """values.yaml cites ci/measure_memory.py's table: each role in its CPU image at the defaults."""
    comment = re.search(r"Measured peak RSS \(MiB\):(.*?)\. Request", (ROOT / "helm" / "splitfed" / "values.yaml").read_text(), re.S)
    measured = {role: int(mib) for role, mib in re.findall(r"([a-z][a-z0-9-]*)\s+(\d+)\b", comment[1].replace("#", " "))}
    assert set(measured) == set(sizing.ROLE_NAMES)
    for role, peak in measured.items():
        found = sizing.estimate(role, torch_build="cpu", settings=sizing.settings_class(role)(**({"workers": 3} if role.startswith("fedavg") else {})))
        assert found.low_mib <= peak <= found.high_mib, f"{role}: measured {peak}, estimated {found.low_mib:.0f}-{found.high_mib:.0f}"


def test_gpu_memory_with_gpu_only():
    assert sizing.estimate("split-client").gpu is None
    found = sizing.estimate("split-client", gpu=True)
    low, mid, high = found.gpu
    assert sizing.CUDA_CONTEXT_MIB[0] < low < mid < high
    assert found.torch_build == "cuda" and found.resources()["gpu"] == {"enabled": True}
    with pytest.raises(ValueError, match="CUDA build"):
        sizing.estimate("split-client", gpu=True, torch_build="cpu")
    with pytest.raises(ValueError, match="no GPU"):
        sizing.estimate("relay", gpu=True)


def test_what_a_run_refuses_is_refused():
    with pytest.raises(sizing.CannotSplit, match="cut layer 9"):
        sizing.estimate_from("split-client", {"model": "tiny"})
    with pytest.raises(ValueError, match="--batch-size 0"):
        sizing.estimate_from("fedavg-worker", {"batch_size": 0})
    with pytest.raises(ValueError, match="--torch-build"):
        sizing.estimate("split-server", torch_build="rocm")
    with pytest.raises(ValueError, match="--role"):
        sizing.estimate("tracker")


def test_worker_share_follows_the_partition():
    share = {spec: part(sizing.estimate_from("fedavg-worker", {"partition": spec, "workers": 3}), "data (uint8 share)")
             for spec in ("iid", "classes:0-3,4-6,7-9", "classes:0-7,8,9")}
    assert share["iid"] < share["classes:0-3,4-6,7-9"] < share["classes:0-7,8,9"]
    dirichlet = sizing.estimate_from("fedavg-worker", {"partition": "dirichlet:0.1"})
    assert dirichlet.high_mib > sizing.estimate_from("fedavg-worker", {"partition": "iid"}).high_mib


# -- check_fits, and the chart's values -----------------------------------------------------------


def test_check_fits_warns_only_below_the_estimate():
    found = sizing.estimate("split-client")
    below = f"{int(found.mib) - 1}Mi"
    warning = sizing.check_fits(found, below)
    assert warning and "split-client" in warning and below in warning and found.limit in warning
    for fits in (found.request, found.limit, "2Gi", f"{int(found.mib * MIB) + 1}", None):
        assert sizing.check_fits(found, fits) is None
    with pytest.raises(ValueError, match="Kubernetes quantity"):
        sizing.check_fits(found, "lots")


@pytest.mark.parametrize("name", ["default", "split", "splitnn", "p2p", "smpl"])
def test_the_charts_own_values_fit(name):
    values = yaml.safe_load((ROOT / "ci" / "chart-values" / f"{name}.yaml").read_text()) or {}
    assert sizing.check_values(merge(VALUES, values)) == []


def test_check_values_sizes_the_peers_from_their_replicas_and_family():
    values = merge(VALUES, {"p2pTracker": {"enabled": True}, "smplPeer": {"enabled": True, "replicas": 6},
                            "smpl": {"settings": {"hyperedge-size": 3, "seed": 2}}})
    peer = sizing.role_settings(values, "smpl-peer")
    tracker = sizing.role_settings(values, "p2p-tracker")
    assert peer["peers"] == tracker["peers"] == 6 and peer["hyperedge_size"] == tracker["hyperedge_size"] == 3 and tracker["seed"] == 2
    assert sizing.family_of(values, "p2p-tracker") == "smpl" and sizing.family_of(merge(values, {"p2pPeer": {"enabled": True}}), "p2p-tracker") == "p2p"
    # p2p: the tracker is sized without the peers' count (it draws no hyperedges; one peer is a run)
    p2p = merge(VALUES, {"p2pTracker": {"enabled": True}, "p2pPeer": {"enabled": True, "replicas": 1}, "p2p": {"settings": {"seed": 4}}})
    assert "peers" not in sizing.role_settings(p2p, "p2p-tracker") and sizing.role_settings(p2p, "p2p-peer")["peers"] == 1
    assert sizing.check_values(p2p) == []
    small = sizing.check_values(merge(p2p, {"p2pPeer": {"resources": {"limits": {"memory": "256Mi"}}}}))
    assert len(small) == 1 and small[0].startswith("p2p-peer: memory limit 256Mi") and "p2pPeer.resources.limits.memory" in small[0]


def test_check_values_reads_the_settings_the_chart_passes():
    bigger = merge(VALUES, {"fedavg": {"settings": {"eval-batch-size": 5000}}, "fedavgWorker": {"settings": {"batch-size": 8192}}})
    warned = sizing.check_values(bigger)
    assert [w.split(":")[0] for w in warned] == ["fedavg-server", "fedavg-worker"]
    settings = sizing.role_settings(bigger, "fedavg-worker")
    assert settings["batch_size"] == 8192 and settings["eval_batch_size"] == 5000 and settings["workers"] == VALUES["fedavgWorker"]["replicas"]
    # A GPU role runs the -cuda image: the CUDA build alone outgrows the CPU-sized limits.
    gpu = sizing.check_values(merge(VALUES, {"fedavgWorker": {"gpu": {"enabled": True}}}))
    assert len(gpu) == 1 and gpu[0].startswith("fedavg-worker") and "cuda torch" in gpu[0]
    with pytest.raises(ValueError, match="--batch-size"):
        sizing.check_values(merge(VALUES, {"fedavgWorker": {"settings": {"batch-size": "many"}}}))


def merge(base: dict, changes: dict) -> dict:
    merged = dict(base)
    for key, value in changes.items():
        merged[key] = merge(base.get(key) or {}, value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return merged


# -- the command ----------------------------------------------------------------------------------


def test_size_prints_json_with_out():
    completed = run_cli("size", "--model", "cnn", "--batch-size", "128", "--out", "-")
    assert completed.returncode == 0, completed.stderr
    document = json.loads(completed.stdout)
    roles = [e["role"] for e in document["estimates"]]
    assert roles == list(sizing.ROLE_NAMES)
    client = document["estimates"][roles.index("split-client")]
    assert client["settings"]["batch_size"] == 128 and client["request"].endswith("Mi")
    assert document["values"]["splitClient"]["resources"]["limits"]["memory"] == client["limit"]
    assert "split-client" in completed.stderr  # the table, for people


def test_size_writes_json_and_prints_a_values_snippet(tmp_path):
    completed = run_cli("size", "--role", "fedavg-worker", "--gpu", "--out", str(tmp_path / "size.json"))
    assert completed.returncode == 0, completed.stderr
    document = json.loads((tmp_path / "size.json").read_text())
    assert document["estimates"][0]["gpu"]["count"] == 1
    snippet = run_cli("size", "--role", "split-server")
    values = yaml.safe_load(snippet.stdout)
    expected = sizing.estimate("split-server")
    assert values == {"splitServer": {"resources": {"requests": {"memory": expected.request}, "limits": {"memory": expected.limit}}}}


def test_size_leaves_out_the_split_roles_of_a_model_that_cannot_be_split():
    completed = run_cli("size", "--model", "tiny", "--out", "-")
    assert completed.returncode == 0, completed.stderr
    document = json.loads(completed.stdout)
    assert [e["role"] for e in document["estimates"]] == ["fedavg-server", "fedavg-worker", "p2p-tracker", "p2p-peer", "smpl-peer"]
    assert set(document["skipped"]) == {"relay", "split-client", "split-server", "split-fed"}


@pytest.mark.parametrize(("args", "says"), [
    (["--role", "tracker"], "--role 'tracker': choose one of"),
    (["--batch-size", "0"], "--batch-size 0: must be at least 1"),
    (["--torch-build", "rocm"], "--torch-build 'rocm': choose one of cpu, cuda"),
    (["--role", "split-client", "--model", "tiny"], "cut layer 9 must be in 1..1"),
    (["--out", "/missing/folder/size.json"], "folder /missing/folder does not exist"),
])
def test_size_fails_cleanly(args, says):
    completed = run_cli("size", *args)
    assert completed.returncode == 2, completed.stderr
    assert completed.stdout == ""
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], completed.stderr
