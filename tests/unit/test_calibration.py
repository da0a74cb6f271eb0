"""CCVR: per-class feature statistics, their pooling, virtual features and the retrained head."""

import math

import pytest
import torch
from torch import nn

from splitfed.learning import calibration, data, federated, models
from splitfed.learning.settings import FederatedSettings


def digits_model() -> tuple[nn.Sequential, data.Samples]:
    share = data.load("digits", train=True)
    return models.build("cnn", data.info("digits"), 1), share


def test_pooled_statistics_equal_those_of_all_the_features_together():
    """Three workers' statistics, pooled, are what one worker holding every sample would send,
    whatever classes each part holds (one part has a class with a single sample)."""
    model, share = digits_model()
    whole = calibration.feature_statistics(model, share, 10, 256)
    order = torch.argsort(share.labels, stable=True)  # label-skewed parts: classes split across them
    cuts = [order[:400], order[400:401], order[401:]]
    parts = [calibration.feature_statistics(model, share.subset(cut), 10, 64) for cut in cuts]
    assert int(parts[1].counts.sum()) == 1 and not parts[1].covariances.any()
    pooled = calibration.pool(parts)
    assert torch.equal(pooled.counts, whole.counts)
    assert torch.allclose(pooled.means, whole.means, atol=1e-9)
    assert torch.allclose(pooled.covariances, whole.covariances, atol=1e-9)
    # The covariances are real: a class's features vary, and differ between classes.
    assert whole.covariances[0].diagonal().sum() > 0 and not torch.allclose(whole.means[0], whole.means[1])


def test_virtual_features_follow_the_pooled_gaussians():
    generator = torch.Generator().manual_seed(0)
    means = torch.tensor([[1.0, -2.0], [0.0, 0.0], [5.0, 5.0]], dtype=torch.float64)
    covariances = torch.stack([
        torch.tensor([[2.0, 0.6], [0.6, 1.0]]),
        torch.zeros(2, 2),
        torch.tensor([[1.0, 2.0], [2.0, 1.0]]),  # indefinite (eigenvalues 3 and -1): clipped to rank one
    ]).double()
    pooled = calibration.ClassStatistics(torch.tensor([50.0, 0.0, 9.0], dtype=torch.float64), means, covariances)
    features, labels = calibration.virtual_features(pooled, 20000, generator)
    assert features.shape == (40000, 2) and sorted(labels.unique().tolist()) == [0, 2]  # a class nobody holds gets none
    first = features[labels == 0].double()
    assert torch.allclose(first.mean(0), means[0], atol=0.05)
    assert torch.allclose(torch.cov(first.T), covariances[0], atol=0.08)
    third = features[labels == 2].double()
    assert torch.allclose(torch.cov(third.T), torch.full((2, 2), 1.5, dtype=torch.float64), atol=0.08)  # 3 * v v^T, v = (1, 1)/sqrt 2


def test_retraining_moves_only_the_last_layer():
    model, share = digits_model()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    pooled = calibration.pool([calibration.feature_statistics(model, share, 10, 256)])
    loss = calibration.retrain_head(model, pooled, per_class=200, epochs=2, lr=0.01, batch_size=64, seed=1)
    assert math.isfinite(loss)
    changed = sorted(name for name, value in model.state_dict().items() if not torch.equal(value, before[name]))
    assert changed == ["11.bias", "11.weight"]


def test_ccvr_lifts_a_label_skewed_federation_and_repeats_exactly():
    """Five rounds on digits split by class (each worker holds 3 or 4 classes): the averaged head
    still confuses the classes no worker held together; recalibrated on the pooled statistics it
    scores far better. The same settings give the same calibrated model."""
    settings = FederatedSettings(dataset="digits", rounds=5, partition="classes:0-3,4-6,7-9", strategy="fedavgm", optimizer="sgd", lr=0.02,
                                 server_momentum=0.7, calibration="ccvr")
    records = []
    model, history = federated.reference_run(settings, on_calibrated=records.append)
    assert len(records) == 1 and records[0].step == settings.rounds
    assert records[0].accuracy > history[-1].accuracy + 0.3
    again, _ = federated.reference_run(settings)
    assert all(torch.equal(value, again.state_dict()[name]) for name, value in model.state_dict().items())


def test_a_model_without_a_linear_last_layer_cannot_be_calibrated():
    with pytest.raises(ValueError, match="last layer is linear, not ReLU"):
        calibration.split_head(nn.Sequential(nn.Linear(4, 3), nn.ReLU()))
