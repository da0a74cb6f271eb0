"""Classifier calibration after federated training: CCVR (Luo et al., NeurIPS 2021, "No Fear of
Heterogeneity: Classifier Calibration for Federated Learning with Non-IID Data"). Pure torch.

Under label skew the shared feature extractor learns well, but the last layer is the average of
heads each trained on a few classes: it has never seen the classes that no single worker holds
together side by side. CCVR fixes the head after the last round. Each worker summarises the
penultimate features of its share, under the final global model, as per-class count, mean and
covariance (`feature_statistics`); the server pools them into one Gaussian per class (`pool`),
draws virtual features from them and retrains only the last layer on those (`retrain_head`).
No raw sample leaves a worker; the statistics do, which is the method's privacy cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from splitfed.learning import data, models, train


def split_head(model: nn.Sequential) -> tuple[nn.Sequential, nn.Linear]:
    """The model as feature extractor and last layer; a model that does not end in a linear
    layer cannot be calibrated."""
    if not isinstance(model, nn.Sequential) or not isinstance(model[-1], nn.Linear):
        raise ValueError(f"--calibration ccvr needs a model whose last layer is linear, not {type(model[-1] if isinstance(model, nn.Sequential) else model).__name__}")
    return model[:-1], model[-1]


@dataclass
class ClassStatistics:
    """Per-class summaries of penultimate features. counts: (C,), means: (C, D), covariances:
    (C, D, D), float64; a class with fewer than two samples has a zero covariance."""

    counts: torch.Tensor
    means: torch.Tensor
    covariances: torch.Tensor

    def tensors(self) -> dict[str, torch.Tensor]:
        """As float32 tensors for the wire."""
        return {"class_counts": self.counts.float(), "class_means": self.means.float(), "class_covariances": self.covariances.float()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> ClassStatistics:
        return cls(tensors["class_counts"].double(), tensors["class_means"].double(), tensors["class_covariances"].double())


def statistics_shapes(model: nn.Sequential, classes: int) -> dict[str, tuple[int, ...]]:
    """The shape of each tensor in `ClassStatistics.tensors` for this model."""
    features = split_head(model)[1].in_features
    return {"class_counts": (classes,), "class_means": (classes, features), "class_covariances": (classes, features, features)}


def features_of(model: nn.Sequential, samples: data.Samples, batch_size: int) -> torch.Tensor:
    """(N, D) penultimate features of `samples` under `model`, in eval mode, on the CPU."""
    body, _ = split_head(model)
    with models.evaluating(body):
        return torch.cat([body(samples.batch(slice(start, start + batch_size))[0]).cpu() for start in range(0, len(samples), batch_size)])


def feature_statistics(model: nn.Sequential, share: data.Samples, classes: int, batch_size: int) -> ClassStatistics:
    """What a worker sends: the count, mean and (unbiased) covariance of each class's features.
    The features come off the device and the statistics are float64 on the CPU, so that they, and
    the virtual features drawn from them, are the same whichever device computed the features."""
    features = features_of(model, share, batch_size).double()  # (N, D)
    labels = share.labels.cpu()
    dim = features.shape[1]
    counts = torch.bincount(labels, minlength=classes).double()  # (C,)
    means, covariances = torch.zeros(classes, dim, dtype=torch.float64), torch.zeros(classes, dim, dim, dtype=torch.float64)
    for label in labels.unique().tolist():
        own = features[labels == label]  # (n_c, D)
        means[label] = own.mean(0)
        if len(own) > 1:
            centred = own - means[label]
            covariances[label] = centred.T @ centred / (len(own) - 1)
    return ClassStatistics(counts, means, covariances)


def pool(parts: list[ClassStatistics]) -> ClassStatistics:
    """The statistics of all workers' features together, from each worker's (exact, as if one
    worker had held every sample): sum of (n_k - 1) S_k + n_k m_k m_k^T, less n m m^T."""
    counts = torch.stack([part.counts for part in parts]).sum(0)  # (C,)
    sums = torch.stack([part.counts[:, None] * part.means for part in parts]).sum(0)  # (C, D)
    means = sums / counts.clamp(min=1)[:, None]
    scatter = sum((part.counts - 1).clamp(min=0)[:, None, None] * part.covariances
                  + part.counts[:, None, None] * part.means[:, :, None] * part.means[:, None, :] for part in parts)  # (C, D, D)
    scatter = scatter - counts[:, None, None] * means[:, :, None] * means[:, None, :]
    covariances = scatter / (counts - 1).clamp(min=1)[:, None, None]
    covariances[counts < 2] = 0.0
    return ClassStatistics(counts, means, covariances)


def virtual_features(pooled: ClassStatistics, per_class: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`per_class` draws from N(mean_c, cov_c) for every class some worker holds: features
    (M, D) float32 and labels (M,). Any input gives a valid Gaussian: the covariance is made
    symmetric and positive semi-definite (negative eigenvalues, from rounding or a worker's bad
    numbers, clipped). Draws go through its Cholesky factor, not its eigenvectors: the factor
    moves little when the statistics do (the last bit differs between a worker and the plain
    loop), while eigenvectors of close eigenvalues can turn around and change every draw."""
    features, labels = [], []
    for label in (pooled.counts > 0).nonzero().flatten().tolist():
        root = gaussian_root(pooled.covariances[label])  # (D, D): root @ root.T = covariance
        noise = torch.randn(per_class, root.shape[0], generator=generator, dtype=torch.float64)  # (M_c, D)
        features.append((pooled.means[label] + noise @ root.T).float())
        labels.append(torch.full((per_class,), label, dtype=torch.long))
    return torch.cat(features), torch.cat(labels)


def gaussian_root(covariance: torch.Tensor) -> torch.Tensor:
    """(D, D) lower-triangular L with L L^T = the nearest positive semi-definite matrix to
    `covariance`, plus a jitter of 1e-6 of its mean variance (dead ReLU units give zero rows,
    which Cholesky cannot take)."""
    symmetric = (covariance + covariance.T) / 2
    eigenvalues, eigenvectors = torch.linalg.eigh(symmetric)
    semidefinite = (eigenvectors * eigenvalues.clamp(min=0)) @ eigenvectors.T  # continuous in the input, unlike the eigenvectors
    jitter = 1e-6 * semidefinite.diagonal().mean().clamp(min=1e-12)
    return torch.linalg.cholesky(semidefinite + jitter * torch.eye(len(symmetric), dtype=symmetric.dtype))


def retrain_head(model: nn.Sequential, pooled: ClassStatistics, per_class: int, epochs: int, lr: float, batch_size: int, seed: int) -> float:
    """Retrain `model`'s last layer in place on virtual features (SGD with momentum 0.9, the
    paper's choice); the feature extractor is not touched. Returns the last epoch's mean loss.
    The features are drawn on the CPU (the same on any device) and the head retrains where it is."""
    _, head = split_head(model)
    generator = torch.Generator().manual_seed(seed)
    features, labels = virtual_features(pooled, per_class, generator)  # (M, D), (M,)
    features, labels = features.to(head.weight.device), labels.to(head.weight.device)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9)
    losses: list[float] = []
    for _ in range(epochs):
        losses = []
        for indices in data.batch_order(len(features), batch_size, generator):
            opt.zero_grad(set_to_none=True)
            loss = train.loss_fn(head(features[indices]), labels[indices])
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return sum(losses) / max(1, len(losses))
