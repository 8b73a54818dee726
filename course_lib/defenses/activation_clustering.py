"""Activation Clustering: find the poisoned training samples by how the model sees them.

Chen et al. (2018), "Detecting Backdoor Attacks on Deep Neural Networks by Activation
Clustering" (AAAI SafeAI workshop). Idea: a poisoned image labeled "T-shirt" is put in
that class because of the trigger, not because it looks like a T-shirt, so in the
penultimate layer the class splits into two groups: real T-shirts and triggered images.

Per class: take the penultimate activations of its training images, reduce them to 10
dimensions, split them with 2-means, and judge the split. Chen et al. give three
analyses:

- ``"size"`` (relative size): the smaller cluster holds at most ``size_threshold`` (35%)
  of the class. Cheap, but by arithmetic it misses heavy poisoning: with ten balanced
  classes, poisoning 5.4% of the training set already makes the poison 35% of the target
  class; and some clean classes split lopsidedly by themselves.
- ``"silhouette"``: the silhouette score (Rousseeuw 1987) of the split is at least
  ``silhouette_threshold`` (0.44), i.e. the two clusters are far apart compared to their
  own spread. Its threshold depends on the network, the trigger and the rate.
- ``"exclusionary"`` (exclusionary reclassification): train a fresh model *without* a
  cluster, then classify it. A legitimate cluster is still recognized as its label (the
  rest of the class teaches it); a poisoned cluster is not: without the poison nothing
  links those images to the label, so the model calls them by their true class.
  Chen et al. call a cluster poisoned when its label no longer wins (l / p <= 1, l
  counting its images predicted as their label, p those of the most common other
  class). On Fashion-MNIST that rule accuses clean classes: a model that never saw the
  atypical Shirts does not recognize them either, whatever the poison. The kit calibrates
  it with the defender's trusted clean images (``clean_data``): the cluster's
  *recognition* is the share of it the fresh model calls by its label, divided by the
  share of trusted images of that label it classifies correctly; poisoned when at most
  ``reclassification_threshold`` (0.2). Both clusters are tested (two fresh models: one
  without every smaller cluster, one without every larger one), because from about 10%
  of a ten-class training set on, the poison is the *larger* cluster of its class.

The kit adds a fourth analysis, with the same trusted images and no training run:

- ``"trusted"`` (trusted share, the default): place the trusted clean images of the
  label on the same split (same reduction, nearest 2-means center) and compare, per
  cluster, the share of trusted images that land in it with the share of training images
  that do. A real part of the class (the long-sleeved Shirts, say) holds about as many
  trusted Shirts as training Shirts: a ratio near 1. A poison cluster holds images that
  no clean image of the label resembles: a ratio near 0. Poisoned when a cluster's ratio
  is at most ``trusted_threshold`` (0.5: populated half as much by clean images as by
  training images). It needs at least ``MIN_TRUSTED_PER_CLASS`` (50) trusted images of
  every class: a clean cluster holding 23% of its class (the smallest on the detection
  matrix) falls to half its share by chance with probability 1.9% with 50 trusted images
  (binomial), 0.2% with 100, 0.002% with 200 (notebook 6 has about 200, the matrix 400).
  The same question as exclusionary reclassification ("is this cluster
  a genuine part of its label?"), answered from the clean data directly: it needs no
  retraining, does not depend on which cluster is smaller, and a hard subclass like the
  Shirts does not fool it. Using a small trusted set to model how a clean class varies is
  also the idea of SCAn (Tang et al. 2021, "Demon in the Variant").

**Default, chosen on the detection matrix** (``python -m course_lib bench matrix``: seven
families at 1%, 5% and 10% and five clean models, 20,000 training images; every row
reports the F1 of each analysis on the same clusters, ``f1_by_analysis``, and each class's
statistics, ``splits``; the README has the table):

- ``"trusted"``: the poison clusters of the checkerboard, square and four-corner models at
  every rate, of the blend and SIG models at 5% and 10% and of the 5% clean-label model
  scored 0.00-0.01, WaNet 0.44 (5%) and 0.14 (10%); no cluster of a class without poison,
  on any of the 26 models, scored under 0.86 (0.84 in the previous run, with half the
  trusted images). The threshold 0.5 sits in that gap, with one poison cluster close to it
  (WaNet 5%, 0.44: flagged, F1 0.83). F1 0.95-1.00 on the patch families at every
  rate and 0.97-0.99 on blend at 5% and 10%, no class flagged on a clean model.
- ``"silhouette+exclusionary"`` (the previous default): F1 0.95-1.00 on the patch
  families, no class flagged on a clean model, but F1 0 on every blend, SIG and WaNet
  model: their target classes split no more clearly (silhouette 0.20-0.37) than clean
  classes do (0.34-0.43).
- exclusionary reclassification alone flagged the Shirt class on all five clean models
  (recognition 0.06-0.18), relative size alone one to five classes on every model, and
  the silhouette alone points at the clean part of the target class at 10%.
- What no analysis finds is poison that 2-means does not separate: the 1% blend, SIG,
  WaNet and clean-label models (their backdoors only half took: blend 1% ASR 0.73), where
  the poison is spread over both clusters (trusted share 0.84-0.99); nor the 10%
  clean-label model, whose target class is poisoned whole (0.56). Whitening the
  activations with the trusted images' covariance before the split (measured offline on the
  same 26 models) lifted the 1% blend model to F1 0.70 but split the solid square's poison
  cluster in two (F1 0.52 at 5%): not adopted.

The reduction is PCA, not Chen et al.'s FastICA: ICA rescales every component to unit
variance, so the one direction that separates the poison weighs no more than nine
directions of noise, and 2-means often cuts through the clean images instead (on the
1% checkerboard model ICA's smaller cluster held 22% of the poison; on the solid square,
13%; PCA's held 98% and 95%). ``reducer="ica"`` gives the paper's choice.

Erratum (docs/DESIGN.md, 6): the lecture always flags the smaller cluster of a class, so
every class looks poisoned.

Exclusionary reclassification costs two extra training runs (all classes share them),
run with ``epochs``, ``arch`` and ``device`` like the victim; ``also=("exclusionary",)``
computes it beside another deciding analysis, as the matrix does. A label absent from
``clean_data`` cannot be calibrated by reclassification: its clusters count as recognized. The size analysis, by
its definition, still assumes the poison is the smaller cluster.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA, FastICA
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import silhouette_score
from tqdm.auto import tqdm

from ..cache import storable
from ..checks import check_choice, check_dataset, check_float, check_int, check_model
from ..data import ImageDataset
from ..train import predict
from .activations import dataset_features, extract_features
from .base import SampleDetection
from .retraining import retrain_without

PAPER = "Chen et al. 2018"
REDUCERS = ("pca", "ica")
ANALYSES = ("size", "silhouette", "exclusionary", "trusted")
DEFAULT_ANALYSIS = "trusted"
#: The verdicts the detection matrix measures side by side (one clustering, several rules).
MEASURED_ANALYSES = ("size", "silhouette", "exclusionary", "silhouette+exclusionary", "trusted")
#: The analyses that need the defender's trusted clean images (``clean_data``).
CALIBRATED = ("exclusionary", "trusted")
#: Trusted images of every class the trusted-share analysis needs (see the module docstring).
MIN_TRUSTED_PER_CLASS = 50


@storable
@dataclass
class ClassSplit:
    """The 2-means split of one class and the analyses' statistics.

    ``indices``: dataset indices of the class, in the order of ``clusters`` (1 = smaller
    cluster, 0 = larger); ``view``: (n, 2) PCA projection of the reduced activations, for
    plotting. Per cluster (index 0: the larger, 1: the smaller), when computed:
    ``trusted_share``, the share of trusted images of the label that fall in the cluster
    divided by the share of training images that do (about 1 for a real part of the class,
    about 0 for images no clean image resembles), and ``recognition``, how well a fresh
    model trained without the cluster recognizes it (exclusionary reclassification).
    ``suspect``: the cluster the deciding analysis suspects (the smaller one, unless the
    analysis compared both clusters).
    """

    label: int
    indices: torch.Tensor
    clusters: np.ndarray
    view: np.ndarray
    relative_size: float
    silhouette: float
    trusted_share: tuple[float, float] | None = None
    recognition: tuple[float, float] | None = None
    suspect: int = 1

    def cluster(self, which: int) -> torch.Tensor:
        """Dataset indices of cluster ``which`` (1: the smaller, 0: the larger)."""
        return self.indices[torch.from_numpy(self.clusters == which)]

    @property
    def smaller(self) -> torch.Tensor:
        """Dataset indices of the smaller cluster."""
        return self.cluster(1)

    @property
    def suspected(self) -> torch.Tensor:
        """Dataset indices of the suspect cluster."""
        return self.cluster(self.suspect)

    def suspect_for(self, analysis: str) -> int:
        """The cluster ``analysis`` suspects: the one trusted images populate least
        (``trusted``), else the one recognized least (``exclusionary``), else the smaller."""
        parts = _parse(analysis)
        for name, statistic in (("trusted", self.trusted_share), ("exclusionary", self.recognition)):
            if name in parts and statistic is not None:
                return min((1, 0), key=lambda which: statistic[which])
        return 1


@storable
@dataclass
class ActivationClusteringResult(SampleDetection):
    """A :class:`~.base.SampleDetection` plus every class's split (``per_class``), the
    ``analysis`` that decided, and ``poisoned_by`` each analysis (the classes it flags)."""

    analysis: str = DEFAULT_ANALYSIS
    per_class: list[ClassSplit] = field(default_factory=list, repr=False)
    poisoned_by: dict[str, list[int]] = field(default_factory=dict)

    def classes_by(self, analysis: str) -> list[int]:
        """The classes ``analysis`` calls poisoned; ``"a+b"`` means both a and b must agree."""
        parts = _parse(analysis)
        missing = [a for a in parts if a not in self.poisoned_by]
        if missing:
            raise ValueError(f"analysis {missing[0]!r} was not computed in this run (computed: "
                             f"{sorted(self.poisoned_by)})")
        return [s.label for s in self.per_class if all(s.label in self.poisoned_by[a] for a in parts)]

    def flagged_by(self, analysis: str) -> torch.Tensor:
        """Sorted indices ``analysis`` would flag: the cluster it suspects in each class it flags."""
        classes = self.classes_by(analysis)
        parts = [s.cluster(s.suspect_for(analysis)) for s in self.per_class if s.label in classes]
        return torch.cat(parts + [torch.empty(0, dtype=torch.long)]).sort().values


def _parse(analysis, name: str = "analysis") -> list[str]:
    """``"silhouette+exclusionary"`` -> ``["silhouette", "exclusionary"]``, each checked
    (an error names the argument ``name``)."""
    if not isinstance(analysis, str):
        raise TypeError(f"{name} must be one of {ANALYSES} or several joined by '+', got {analysis!r}")
    return [check_choice(name, part, ANALYSES) for part in analysis.split("+")]


def activation_clustering(model, data: ImageDataset, *, analysis: str = DEFAULT_ANALYSIS, reducer: str = "pca",
                          n_components: int = 10, size_threshold: float = 0.35,
                          silhouette_threshold: float = 0.44, reclassification_threshold: float = 0.2,
                          trusted_threshold: float = 0.5, clean_data: ImageDataset | None = None,
                          also: tuple[str, ...] = (), epochs: int = 2, arch: str | None = None, device=None,
                          features: torch.Tensor | None = None, seed: int = 0,
                          progress: bool = True) -> ActivationClusteringResult:
    """Run Activation Clustering on the (possibly poisoned) training set ``data``.

    ``analysis`` decides which classes are poisoned: one of ``"size"``, ``"silhouette"``,
    ``"exclusionary"``, ``"trusted"``, or several joined by ``+`` (all must agree; see the
    module docstring). The size and silhouette verdicts are always computed
    (``poisoned_by``), the others when ``analysis`` or ``also`` (more analyses to compute
    on the same clusters, for comparison) names them; they need ``clean_data``, images the
    defender trusts. ``features``: precomputed ``model.features`` of ``data`` (shared with
    other detectors). ``epochs``, ``arch``, ``device``: the training runs of exclusionary
    reclassification. Every class must hold more images than ``n_components``. Neither the
    model nor the data is modified.
    """
    check_dataset("data", data)
    analyses = _parse(analysis)
    if isinstance(also, str) or not isinstance(also, (tuple, list)):
        raise TypeError(f"also must be a tuple of analyses among {ANALYSES}, got {also!r}")
    computed = set(analyses) | {part for extra in also for part in _parse(extra, "also")}
    check_model(model, "features")
    check_choice("reducer", reducer, REDUCERS)
    check_int("n_components", n_components, 2)
    check_float("size_threshold", size_threshold, 0.0, 0.5, low_open=True)
    check_float("silhouette_threshold", silhouette_threshold, -1.0, 1.0)
    check_float("reclassification_threshold", reclassification_threshold, 0.0, float("inf"))
    check_float("trusted_threshold", trusted_threshold, 0.0, float("inf"))
    check_int("epochs", epochs)
    calibrated = sorted(computed & set(CALIBRATED))
    if calibrated:
        if clean_data is None:
            raise ValueError(f"clean_data is required by the {' and '.join(calibrated)} analysis (trusted clean "
                             f"images calibrate its verdict); give it, or choose another analysis, got {analysis!r}")
        check_dataset("clean_data", clean_data, like=data)
        trusted_counts = clean_data.class_counts()
        if "trusted" in computed and int(trusted_counts.min()) < MIN_TRUSTED_PER_CLASS:
            raise ValueError(f"clean_data must hold at least {MIN_TRUSTED_PER_CLASS} trusted images of every class "
                             f"for the trusted analysis (fewer let a clean cluster look empty by chance), got "
                             f"{[int(c) for c in trusted_counts]}")
    start = time.perf_counter()
    features = dataset_features(model, data, features, progress=progress)
    counts = data.class_counts()
    small = [c for c in range(data.num_classes) if counts[c] <= n_components]
    if small:
        raise ValueError(f"data must hold more than n_components={n_components} images in every class "
                         f"(an empty or tiny class cannot be split); classes {small} have "
                         f"{[int(counts[c]) for c in small]}")
    trusted = None
    if "trusted" in computed:
        trusted = (extract_features(model, clean_data.images, progress=False), clean_data.labels)
    splits = [_split_class(features, data.labels, label, reducer, n_components, seed, trusted)
              for label in tqdm(range(data.num_classes), desc="activation clustering", disable=not progress,
                                leave=False)]
    poisoned_by = {"size": [s.label for s in splits if s.relative_size <= size_threshold],
                   "silhouette": [s.label for s in splits if s.silhouette >= silhouette_threshold]}
    if "trusted" in computed:
        poisoned_by["trusted"] = [s.label for s in splits if min(s.trusted_share) <= trusted_threshold]
    if "exclusionary" in computed:
        _reclassify(splits, data, clean_data, epochs=epochs, arch=arch, device=device, seed=seed,
                    progress=progress)
        poisoned_by["exclusionary"] = [s.label for s in splits if min(s.recognition) <= reclassification_threshold]
    for s in splits:
        s.suspect = s.suspect_for(analysis)
    result = ActivationClusteringResult(PAPER, _scores(splits, len(data)), torch.empty(0, dtype=torch.long), [],
                                        0.0, analysis, splits, poisoned_by)
    result.flagged_classes, result.flagged = result.classes_by(analysis), result.flagged_by(analysis)
    result.seconds = time.perf_counter() - start
    return result


def _scores(splits, n: int) -> torch.Tensor:
    """A score per sample: 1 - its cluster's trusted share (how much less clean images
    populate it) when computed, else its class's silhouette if it sits in the suspect cluster."""
    scores = torch.zeros(n)
    for s in splits:
        if s.trusted_share is not None:
            for which in (0, 1):
                scores[s.cluster(which)] = max(0.0, 1.0 - s.trusted_share[which])
        else:
            scores[s.suspected] = float(s.silhouette)
    return scores


def _split_class(features, labels, label, reducer, n_components, seed, trusted=None) -> ClassSplit:
    """Reduce one class's activations and split them in two with 2-means; with ``trusted``
    (features, labels of trusted images), place the trusted images of the class on the same
    split and compare how the two sets populate each cluster."""
    indices = (labels == label).nonzero().flatten()
    x = features[indices].double().numpy()
    reduction, reduced = _reduce(x, reducer, n_components, seed)
    kmeans = KMeans(2, n_init=10, random_state=seed).fit(reduced)
    smaller = int(np.bincount(kmeans.labels_, minlength=2).argmin())
    clusters = (kmeans.labels_ == smaller).astype(int)
    variance_view = reduced if reducer == "pca" else _reduce(x, "pca", n_components, seed)[1]
    split = ClassSplit(label, indices, clusters, PCA(2, random_state=seed).fit_transform(reduced),
                       float(clusters.mean()), _silhouette(variance_view, clusters, seed))
    if trusted is not None:
        own = trusted[0][trusted[1] == label].double().numpy()
        placed = (kmeans.predict(reduction.transform(own)) == smaller).astype(int)
        split.trusted_share = tuple(float((placed == which).mean() / (clusters == which).mean()) for which in (0, 1))
    return split


def _reduce(x: np.ndarray, reducer: str, n_components: int, seed: int):
    """Fit PCA or FastICA with ``n_components`` on the activations ``x``: (fitted, projected x)."""
    n_components = min(n_components, x.shape[1])
    if reducer == "pca":
        reduction = PCA(n_components, random_state=seed)
        return reduction, reduction.fit_transform(x)
    reduction = FastICA(n_components, whiten="unit-variance", max_iter=400, tol=1e-3, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # a rough ICA is enough for 2-means
        return reduction, reduction.fit_transform(x)


def _silhouette(x: np.ndarray, clusters: np.ndarray, seed: int, sample_size: int = 3000) -> float:
    """Mean silhouette of the split (on a PCA view: ICA's unit variances would hide how
    clear the split is), on at most ``sample_size`` points (the exact score is O(n^2)).
    A sample that misses a tiny cluster scores -1 (no split seen)."""
    if len(x) > sample_size:
        pick = np.random.RandomState(seed).permutation(len(x))[:sample_size]
        x, clusters = x[pick], clusters[pick]
    if clusters.min() == clusters.max():
        return -1.0
    return float(silhouette_score(x, clusters))


def _reclassify(splits, data, clean_data, *, epochs, arch, device, seed, progress) -> None:
    """Exclusionary reclassification of both clusters of every class: one fresh model trained
    without every smaller cluster, one without every larger cluster."""
    recognition = {}
    for which in (1, 0):
        excluded = torch.cat([s.cluster(which) for s in splits])
        model = retrain_without(data, excluded, epochs=epochs, arch=arch, seed=seed, device=device,
                                progress=progress).model
        trusted = predict(model, clean_data.images)
        for s in splits:
            clean_hits = trusted[clean_data.labels == s.label] == s.label
            own = (predict(model, data.images[s.cluster(which)]) == s.label).double().mean().item()
            recognition[s.label, which] = own / clean_hits.double().mean().item() if clean_hits.any() else float("inf")
    for s in splits:
        s.recognition = (recognition[s.label, 0], recognition[s.label, 1])
