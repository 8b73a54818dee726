"""Spectral Signatures: poisoned samples stick out along one direction of the activations.

Tran, Li & Madry (2018), "Spectral Signatures in Backdoor Attacks" (NeurIPS). Idea: in
a class that contains poison, the poisoned samples' penultimate activations are shifted
from the clean ones by roughly the same vector. After centering the class, that shift is
the direction of largest variance, so it is the top right singular vector v of the
centered activation matrix, and a sample's outlier score is its squared projection
``((r - mean) . v) ** 2``. Tran et al. remove the ``1.5 * eps * n`` highest-scoring
samples of each class, where eps bounds the poisoned fraction of a class, and retrain.

Removing samples from *every* class throws away clean data in every class. The kit adds
a class-level test that the paper does not have (pass ``bimodality_threshold=None`` for
the paper's behavior): a class is flagged only when the projections on v form two
groups, measured by Sarle's bimodality coefficient ``(skewness^2 + 1) / kurtosis``
(about 0.33 for a normal distribution, up to 1 for two separated spikes). Its default
threshold 0.7 was chosen on Fashion-MNIST models, where clean classes stayed below it;
other datasets and poisoning rates may need another value.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..data import ImageDataset
from ._checks import check_dataset, check_number
from .activations import dataset_features


@dataclass
class SpectralSignaturesResult:
    """``suspicious``: sorted flagged indices; ``scores`` (N,): outlier score of every sample;
    ``bimodality`` (K,): the class test; ``flagged_classes``: classes samples were removed from."""

    suspicious: torch.Tensor
    flagged_classes: list[int]
    scores: torch.Tensor
    bimodality: torch.Tensor
    seconds: float


def spectral_signatures(model, data: ImageDataset, *, expected_fraction: float = 0.35,
                        removal_factor: float = 1.5, bimodality_threshold: float | None = 0.7,
                        features: torch.Tensor | None = None, progress: bool = True) -> SpectralSignaturesResult:
    """Score every sample of ``data`` and flag the top ``removal_factor * expected_fraction``
    of each flagged class.

    ``expected_fraction``: an upper bound on the poisoned share of a class (eps in the
    paper; the default matches Activation Clustering's 35%). ``features``: precomputed
    ``model.features`` of ``data``, to share with other detectors. Nothing is modified.
    """
    check_dataset("data", data)
    check_number("expected_fraction", expected_fraction, 0.0, 1.0, low_open=True)
    check_number("removal_factor", removal_factor, 0.0, float("inf"), low_open=True)
    if bimodality_threshold is not None:
        check_number("bimodality_threshold", bimodality_threshold, 0.0, 1.0)
    start = time.perf_counter()
    features = dataset_features(model, data, features, progress=progress).double()
    scores = torch.zeros(len(data), dtype=torch.float64)
    bimodality = torch.zeros(data.num_classes, dtype=torch.float64)
    flagged, suspicious = [], []
    for label in range(data.num_classes):
        indices = (data.labels == label).nonzero().flatten()
        if len(indices) < 3:
            raise ValueError(f"data must hold at least 3 images in every class; class {label} has {len(indices)}")
        projection = _top_direction_projection(features[indices])
        scores[indices] = projection ** 2
        bimodality[label] = _bimodality_coefficient(projection)
        if bimodality_threshold is None or bimodality[label] > bimodality_threshold:
            count = min(len(indices), round(removal_factor * expected_fraction * len(indices)))
            flagged.append(label)
            suspicious.append(indices[scores[indices].topk(count).indices])
    suspicious = torch.cat(suspicious + [torch.empty(0, dtype=torch.long)]).sort().values
    return SpectralSignaturesResult(suspicious, flagged, scores.float(), bimodality.float(),
                                    time.perf_counter() - start)


def _top_direction_projection(activations: torch.Tensor) -> torch.Tensor:
    """Projection of the centered activations on their top right singular vector."""
    centered = activations - activations.mean(0)
    top = torch.linalg.svd(centered, full_matrices=False).Vh[0]
    return centered @ top


def _bimodality_coefficient(x: torch.Tensor) -> float:
    """Sarle's bimodality coefficient (skewness^2 + 1) / kurtosis of a 1-D sample."""
    centered = x - x.mean()
    m2, m3, m4 = (centered ** 2).mean(), (centered ** 3).mean(), (centered ** 4).mean()
    if m2 == 0:
        return 0.0
    return float(((m3 / m2 ** 1.5) ** 2 + 1) / (m4 / m2 ** 2))
