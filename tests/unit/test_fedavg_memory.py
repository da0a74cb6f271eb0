"""FedAvg in one process equals the plain loop that does the same training and averaging."""

import numpy as np
import pytest
import torch
from prometheus_client import REGISTRY
from safetensors.torch import load_file

from splitfed.learning import data, federated, models
from splitfed.learning.settings import FederatedSettings
from splitfed.observability.metrics import rejected_count
from splitfed.protocol import Message, decode, encode, encode_body, signed_bytes
from splitfed.roles.declaration import Identity
from splitfed.roles.fedavg import WorkerDeployment, worker_ids
from splitfed.roles.fedavg.worker import FedAvgWorker
from splitfed.scenarios import fedavg, launch
from splitfed.scenarios.fedavg import FedAvgRun
from splitfed.security import keys
from splitfed.transport import MemoryBroker, MemoryTransport


def final_diff(model, checkpoint_dir) -> float:
    saved = load_file(str(checkpoint_dir / "model.safetensors"))
    return max((model.state_dict()[k] - saved[k]).abs().max().item() for k in saved)


@pytest.mark.parametrize(("strategy", "workers", "local"), [
    ("fedavg", 3, {}), ("fedprox", 3, {}), ("median", 4, {}), ("trimmed-mean", 5, {}), ("krum", 5, {}),
    ("fedavgm", 3, {"local_steps": 10, "lr_decay": 0.8}), ("fedadam", 3, {"rule": "trimmed-mean", "trim": 0.34}),
    ("fedyogi", 3, {"local_steps": 10}), ("fedadagrad", 3, {}), ("scaffold", 3, {"local_steps": 10, "optimizer": "sgd", "lr": 0.05}),
    ("fedrs", 3, {"partition": "classes:0-3,4-6,7-9", "rs_alpha": 0.3}),
    ("fedbabu", 3, {"partition": "classes:0-3,4-6,7-9"}),
    ("fedlc", 3, {"partition": "classes:0-3,4-6,7-9", "optimizer": "sgd", "lr": 0.05, "server_momentum": 0.7, "lc_tau": 1.0}),
])
def test_fedavg_in_memory_equals_the_plain_loop(tmp_path, strategy, workers, local):
    settings = FederatedSettings(dataset="digits", rounds=2, workers=workers, strategy=strategy, **{"partition": "iid", **local})
    reference, history = federated.reference_run(settings)
    result = launch.run(fedavg.SCENARIO, settings, FedAvgRun(session=f"mem-{strategy}", checkpoint_dir=tmp_path))
    assert final_diff(reference, tmp_path) <= 1e-5
    assert [r["accuracy"] for r in result["history"]] == pytest.approx([r.accuracy for r in history], abs=1e-3)
    assert result["contributors"] == {str(r): [f"worker-{i}" for i in range(workers)] for r in (1, 2)}


def test_reference_partition_keeps_classes_apart_and_reports_rounds(tmp_path):
    settings = FederatedSettings(dataset="digits", rounds=3)
    result = launch.run(fedavg.SCENARIO, settings, FedAvgRun(session="mem-classes", checkpoint_dir=tmp_path))
    assert [r["step"] for r in result["history"]] == [1, 2, 3]
    assert all(r["workers"] == ["worker-0", "worker-1", "worker-2"] for r in result["history"])
    labels = {"role": "fedavg-server", "session": "mem-classes"}
    assert REGISTRY.get_sample_value("splitfed_unsafe_mode", labels) == 1.0
    assert REGISTRY.get_sample_value("splitfed_updates_total", {**labels, "outcome": "accepted"}) == 9
    assert REGISTRY.get_sample_value("splitfed_round_duration_seconds_count", labels) == 3
    assert REGISTRY.get_sample_value("splitfed_active_workers", labels) == 3
    assert REGISTRY.get_sample_value("splitfed_round", labels) == 3
    assert REGISTRY.get_sample_value("splitfed_round_bytes", labels) > 0
    assert REGISTRY.get_sample_value("splitfed_test_accuracy", labels) == result["accuracy"]
    # Each worker trains on its own classes only: the default partition gives worker-0 digits
    # 0-3, worker-1 4-6 and worker-2 7-9, and between them every training sample once.
    expected = [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    full = data.load(settings.dataset, train=True)
    shares = data.partition(full.labels, settings.partition, settings.workers, settings.seed)
    assert [sorted(full.labels[share].unique().tolist()) for share in shares] == expected
    assert sorted(torch.cat(shares).tolist()) == list(range(len(full)))
    for index, classes in enumerate(expected):
        deployment = WorkerDeployment(session="mem-classes", worker_id=f"worker-{index}", index=index)
        worker = FedAvgWorker(settings, deployment, MemoryTransport(MemoryBroker()), Identity())  # what each worker of the run held
        assert sorted(worker.data.labels.unique().tolist()) == classes
        assert len(worker.data) == int(torch.isin(full.labels, torch.tensor(classes)).sum())


def test_signed_run_in_memory_is_not_unsafe(tmp_path):
    key_list = keys.generate(tmp_path / "keys", ["fedavg-server", "worker-0", "worker-1", "worker-2"])
    settings = FederatedSettings(dataset="digits", rounds=2, partition="iid")
    shared = MemoryBroker()
    result = launch.run(
        fedavg.SCENARIO, settings, FedAvgRun(session="mem-signed", key_list=key_list, checkpoint_dir=tmp_path / "ckpt"),
        connect_as=lambda role: (ForgedCopies if role == "worker-0" else MemoryTransport)(shared),
    )
    assert REGISTRY.get_sample_value("splitfed_unsafe_mode", {"role": "fedavg-server", "session": "mem-signed"}) == 0.0
    assert torch.isfinite(torch.tensor(result["loss"]))
    # Signatures are checked, not merely configured: every forged copy was refused, and the
    # genuine updates alone make the model.
    for reason in ("unsigned", "signature"):
        assert rejected_count("fedavg-server", "mem-signed", reason) == settings.rounds, reason
    assert result["contributors"] == {"1": worker_ids(3), "2": worker_ids(3)}
    reference, _ = federated.reference_run(settings)
    assert final_diff(reference, tmp_path / "ckpt") <= 1e-5


class ForgedCopies(MemoryTransport):
    """worker-0's connection, and someone without its key who sees its updates: before each real
    update the server gets a copy with other numbers, once unsigned and once signed with a key
    that is not worker-0's."""

    def publish(self, queue, body, *, persistent=False, must_exist=False):
        message = decode(body)
        if message.kind == "update":
            forged = Message(message.kind, message.session, message.sender, message.seq, message.round, message.meta,
                             {name: array * 100 for name, array in message.tensors.items()})
            super().publish(queue, encode(forged))  # unsigned
            stranger = keys.Signer(message.sender, keys.Ed25519PrivateKey.generate())
            forged.sig = stranger.sign(signed_bytes(forged, encode_body(forged.tensors)))
            super().publish(queue, encode(forged))
        super().publish(queue, body, persistent=persistent, must_exist=must_exist)


def test_uneven_shares_are_averaged_by_their_sample_counts(tmp_path):
    """One round over shares of very different sizes: the server's model must be
    sum_k n_k w_k / sum_k n_k of the workers' own models, computed here in numpy from each
    worker's local training (not from the plain loop's or the server's aggregation)."""
    settings = FederatedSettings(dataset="digits", rounds=1, workers=3, partition="classes:0-5,6-7,8-9")
    launch.run(fedavg.SCENARIO, settings, FedAvgRun(session="mem-uneven", checkpoint_dir=tmp_path))

    full = data.load(settings.dataset, train=True)
    shares = data.partition(full.labels, settings.partition, settings.workers, settings.seed)
    counts = np.array([len(share) for share in shares], dtype=np.float64)
    assert counts[0] > 2.5 * max(counts[1], counts[2])  # uneven enough for the weights to matter
    locals_ = []
    for index, share in enumerate(shares):
        model = models.build(settings.model, data.info(settings.dataset), settings.seed)
        federated.local_training(model, data.Samples(full.images[share], full.labels[share]), settings, federated.round_seed(settings.seed, index, 1), 1)
        locals_.append({name: value.detach().numpy().astype(np.float64) for name, value in model.state_dict().items()})

    saved = load_file(str(tmp_path / "model.safetensors"))
    weighted = {name: sum(n * w[name] for n, w in zip(counts, locals_)) / counts.sum() for name in saved}
    unweighted = {name: sum(w[name] for w in locals_) / len(locals_) for name in saved}
    assert max(np.abs(saved[name].numpy() - weighted[name]).max() for name in saved) <= 1e-5
    assert max(np.abs(weighted[name] - unweighted[name]).max() for name in saved) > 1e-3  # the check above has teeth
    reference, _ = federated.reference_run(settings)  # the baseline every other comparison trusts weighs the same way
    assert max(np.abs(reference.state_dict()[name].numpy() - weighted[name]).max() for name in saved) <= 1e-5


class TamperedStatistics(MemoryTransport):
    """worker-0's connection in an unsigned run, and someone who can publish as worker-0: before
    its real statistics the server gets copies with impossible class counts or shapes."""

    def publish(self, queue, body, *, persistent=False, must_exist=False):
        message = decode(body)
        if message.kind == "statistics":
            counts = message.tensors["class_counts"]
            for tampered in ({"class_counts": counts + 0.5}, {"class_counts": counts - 2 * counts.max()},
                             {"class_counts": counts * 2}, {"class_means": message.tensors["class_means"][:, :3]}):
                copy = Message(message.kind, message.session, message.sender, message.seq, message.round, message.meta, {**message.tensors, **tampered})
                super().publish(queue, encode(copy))
        super().publish(queue, body, persistent=persistent, must_exist=must_exist)


def test_ccvr_in_memory_equals_the_plain_loop_and_refuses_bad_statistics(tmp_path):
    """The calibrated model the server leaves is the plain loop's, the results say so, and
    statistics whose counts are not whole, are negative, do not add up to the worker's samples,
    or whose shapes are wrong are each refused and counted, leaving the genuine ones to count."""
    settings = FederatedSettings(dataset="digits", rounds=2, partition="classes:0-3,4-6,7-9", strategy="fedlc", optimizer="sgd", lr=0.05,
                                 server_momentum=0.7, calibration="ccvr")
    calibrated = []
    reference, history = federated.reference_run(settings, on_calibrated=calibrated.append)
    shared = MemoryBroker()
    result = launch.run(fedavg.SCENARIO, settings, FedAvgRun(session="mem-ccvr", checkpoint_dir=tmp_path),
                        connect_as=lambda role: (TamperedStatistics if role == "worker-0" else MemoryTransport)(shared))
    assert final_diff(reference, tmp_path) <= 1e-5
    assert result["calibration"]["workers"] == worker_ids(3) and result["calibration"]["round"] == settings.rounds + 1
    assert result["accuracy"] == result["calibration"]["accuracy"] == pytest.approx(calibrated[0].accuracy, abs=1e-3)
    assert result["accuracy"] > result["history"][-1]["accuracy"]  # the calibrated model is the one the run leaves
    assert rejected_count("fedavg-server", "mem-ccvr", "value") == 3
    assert rejected_count("fedavg-server", "mem-ccvr", "shape") == 1
    assert REGISTRY.get_sample_value("splitfed_updates_total", {"role": "fedavg-server", "session": "mem-ccvr", "outcome": "accepted"}) == 2 * 3 + 3
