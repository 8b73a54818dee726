"""Spectral Signatures: poisoned samples stick out along one direction of the activations.

Tran, Li & Madry (2018), "Spectral Signatures in Backdoor Attacks" (NeurIPS). Idea: in
a class that contains poison, the poisoned samples' penultimate activations are shifted
from the clean ones by roughly the same vector. After centering the class, that shift is
the direction of largest variance: the top right singular vector v of the centered
activation matrix. Tran et al. score each sample by its squared projection
``((r - mean) . v) ** 2``, remove the ``1.5 * eps * n`` highest-scoring samples of each
class (eps bounds the poisoned fraction of a class) and retrain the network from scratch
on what is left (:func:`~.retraining.retrain_without`).

Two scores (``score=``):

- ``"squared"``: the paper's two-sided score. A large class of clean images has long tails
  on *both* sides of v, so the clean tail opposite the poison is ranked as high as the poison.
- ``"one_sided"`` (default): the signed projection, oriented so that the tail holding the
  minority points positive (the poison is a minority of its class, so the projection is
  skewed toward it). Chosen by measurement on the detection matrix, whose rows report the
  F1 of both scores (``f1_by_score``): on the checkerboard, solid-square and four-corner
  models at 5% the one-sided score reached F1 0.77-0.79 (the F1 is capped by the removal
  budget, which takes 1.5 times the expected share) against 0.68-0.71 for the squared one,
  and retraining after its removal brought the ASR from 1.00 down to 0.01-0.02.

**Which classes.** The paper removes the top-scoring samples of *every* class: the
projection alone does not say which class holds the poison (call without ``clean_data``).
That throws away half of each class (``1.5 * 0.35``), and the atypical half at that, since
the top of every clean class's projection is its unusual images: on the detection
matrix's 5% models clean accuracy fell from 0.89-0.91 to 0.68-0.76, and that weakened
model sent 1-17% of the dirty-label families' triggered images to the target
(checkerboard 0.11, blend 0.04). With the
defender's trusted clean images (``clean_data``, as Neural Cleanse and STRIP use them) the
kit adds a class test the paper does not have: project the trusted images of the class on
the same direction, and flag the class when more than ``tail_threshold`` (5%) of its
training samples lie beyond *every* trusted image. In a clean class training and trusted
images are draws from one distribution, so few training samples pass the farthest of a few
hundred trusted ones; poison, shifted along v by its trigger, passes it in bulk. On the 26
models of the matrix no class without poison exceeded 0.02 with ~200 trusted images per
class, 0.011 with ~400 (the latest run); the patch triggers scored 0.08-0.09 at 1% and
0.32-0.51 at 5% and 10%, blend 0.32 and 0.46 at 5% and 10%, SIG 0.14 and 0.21, WaNet 0.20
at 10% (and blend 1%, 0.01: its poison does not stand out along v). The threshold sits
between the two groups, with one poisoned class on it: WaNet 5% scored 0.06 (flagged) with
~200 trusted images and 0.04 (missed) with ~400. It needs enough trusted images per class
(``2 / tail_threshold`` at least: with n of them, about 1 / (n + 1) of a clean class lies
beyond the farthest by chance). Before it, the kit used a bimodality test on the
projection alone (Sarle's coefficient above 0.7), which missed the 5% blend model (0.695,
with clean classes up to 0.69).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..cache import storable
from ..checks import check_choice, check_dataset, check_float
from ..data import ImageDataset
from .activations import dataset_features, extract_features
from .base import SampleDetection

PAPER = "Tran, Li & Madry 2018"
SCORES = ("one_sided", "squared")
#: The kit's class test (see the module docstring): the share of a class's training samples
#: that project beyond every trusted clean image of the class, above which it is flagged.
TAIL_THRESHOLD = 0.05


@storable
@dataclass
class SpectralSignaturesResult(SampleDetection):
    """A :class:`~.base.SampleDetection` plus each class's ``tail`` (K,): the share of its
    training samples scored above every trusted image of the class (empty without trusted images)."""

    tail: torch.Tensor = field(default_factory=lambda: torch.empty(0))


def spectral_signatures(model, data: ImageDataset, *, score: str = "one_sided", expected_fraction: float = 0.35,
                        removal_factor: float = 1.5, clean_data: ImageDataset | None = None,
                        tail_threshold: float = TAIL_THRESHOLD, features: torch.Tensor | None = None,
                        progress: bool = True) -> SpectralSignaturesResult:
    """Score every sample of ``data`` and flag the top ``removal_factor * expected_fraction``
    of each flagged class.

    With ``clean_data`` (images the defender trusts, at least ``2 / tail_threshold`` of
    every class) a class is flagged when more than ``tail_threshold`` of its training
    samples score above all of its trusted images (the kit's class test); without it,
    every class is, as in the paper. ``expected_fraction``: an upper bound on the poisoned
    share of a class (eps in the paper; the default matches Activation Clustering's 35%).
    ``features``: precomputed ``model.features`` of ``data``, to share with other detectors.
    Nothing is modified.
    """
    check_dataset("data", data)
    check_choice("score", score, SCORES)
    check_float("expected_fraction", expected_fraction, 0.0, 1.0, low_open=True)
    check_float("removal_factor", removal_factor, 0.0, float("inf"), low_open=True)
    check_float("tail_threshold", tail_threshold, 0.0, 1.0, low_open=True)
    if clean_data is not None:
        check_dataset("clean_data", clean_data, like=data)
        counts, needed = clean_data.class_counts(), int(2 / tail_threshold)
        if int(counts.min()) < needed:
            raise ValueError(f"clean_data must hold at least {needed} trusted images of every class (2 / "
                             f"tail_threshold: fewer make the class test flag clean classes by chance), got "
                             f"{[int(c) for c in counts]}")
    start = time.perf_counter()
    features = dataset_features(model, data, features, progress=progress).double()
    trusted = None if clean_data is None else extract_features(model, clean_data.images, progress=False).double()
    scores = torch.zeros(len(data), dtype=torch.float64)
    tail = torch.zeros(data.num_classes if trusted is not None else 0, dtype=torch.float64)
    flagged, chosen = [], []
    for label in range(data.num_classes):
        indices = (data.labels == label).nonzero().flatten()
        if len(indices) < 3:
            raise ValueError(f"data must hold at least 3 images in every class; class {label} has {len(indices)}")
        own = features[indices]
        mean, top = _top_direction(own)
        sign = _toward_minority((own - mean) @ top)
        projection = sign * ((own - mean) @ top)
        scores[indices] = projection ** 2 if score == "squared" else projection
        if trusted is not None:
            reach = (sign * ((trusted[clean_data.labels == label] - mean) @ top)).max()
            tail[label] = (projection > reach).double().mean()
        if trusted is None or tail[label] > tail_threshold:
            count = min(len(indices), round(removal_factor * expected_fraction * len(indices)))
            flagged.append(label)
            chosen.append(indices[scores[indices].topk(count).indices])
    chosen = torch.cat(chosen + [torch.empty(0, dtype=torch.long)]).sort().values
    return SpectralSignaturesResult(PAPER, scores.float(), chosen, flagged, time.perf_counter() - start,
                                    tail.float())


def _top_direction(activations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The class mean and the top right singular vector of the centered activations."""
    mean = activations.mean(0)
    return mean, torch.linalg.svd(activations - mean, full_matrices=False).Vh[0]


def _toward_minority(projection: torch.Tensor) -> float:
    """+1 or -1: the sign that makes the projection's skewed (minority) tail positive."""
    centered = projection - projection.mean()
    return 1.0 if (centered ** 3).mean() >= 0 else -1.0
