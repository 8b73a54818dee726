"""Data sanitization before training: transform the images, or drop the outliers.

Two recipes from the lecture, made measurable:

(a) **Transform-based sanitization** (:func:`lecture_transform_sanitize`): apply one
    random mild transformation to every training image (a 3x3 Gaussian blur, a rotation
    of up to 5 degrees, or a brightness change of up to 10%), hoping to break the trigger.
    A BadNets patch survives such mild changes, and the network learns the blurred or
    rotated trigger just as well: the lecture's recipe is expected to leave the ASR high.

(b) **Outlier removal** with an Isolation Forest (Liu, Ting & Zhou 2008, "Isolation
    Forest", ICDM), which scores a sample as anomalous when random axis-aligned splits
    isolate it quickly. The lecture feeds it four pixel statistics per image (mean, std,
    max, min); a 3x3 patch hardly moves them. :func:`isolation_forest_outliers` can also
    use the model's penultimate features instead. Either way, an isolation forest looks
    for *rare* points, and 5% of the data sharing one trigger is not rare: it forms a
    dense cluster of its own (the "masking" effect). Compare with Activation Clustering,
    which looks for a split *within each class*.

Neither recipe modifies the dataset given; both return new objects.
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from sklearn.ensemble import IsolationForest
from torchvision.transforms.v2 import functional as TF

from ..checks import check_choice, check_dataset, check_float
from ..data import ImageDataset
from .activations import extract_features
from .base import SampleDetection

FEATURE_KINDS = ("learned", "pixel_stats")
PAPERS = {"learned": "Liu, Ting & Zhou 2008 (on penultimate features)",
          "pixel_stats": "lecture (IsolationForest on pixel statistics)"}


def lecture_transform_sanitize(data: ImageDataset, *, max_degrees: float = 5.0, max_brightness: float = 0.1,
                               blur_sigma: float = 1.0, seed: int = 0) -> ImageDataset:
    """A copy of ``data`` in which every image got one random transformation of the lecture.

    A third of the images (at random) is blurred with a 3x3 Gaussian (``blur_sigma``), a
    third is rotated by a uniform angle in [-max_degrees, max_degrees], and a third has its
    brightness scaled by a uniform factor in [1 - max_brightness, 1 + max_brightness].
    """
    check_dataset("data", data)
    check_float("max_degrees", max_degrees, 0.0, 180.0)
    check_float("max_brightness", max_brightness, 0.0, 1.0)
    check_float("blur_sigma", blur_sigma, 0.0, 10.0, low_open=True)
    gen = torch.Generator().manual_seed(seed)
    choice = torch.randint(3, (len(data),), generator=gen)
    uniform = torch.rand(len(data), generator=gen) * 2 - 1       # one draw in [-1, 1] per image
    images = data.images.clone()
    blur, rotate, bright = choice == 0, choice == 1, choice == 2
    if blur.any():
        images[blur] = TF.gaussian_blur(data.images[blur], kernel_size=[3, 3], sigma=[blur_sigma, blur_sigma])
    if rotate.any():
        images[rotate] = _rotate(data.images[rotate], uniform[rotate] * max_degrees)
    if bright.any():
        factor = (1 + uniform[bright] * max_brightness).view(-1, 1, 1, 1)
        images[bright] = (data.images[bright] * factor).clamp(0, 1)
    return data.replace(images=images)


def _rotate(images: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Rotate each image about its center by its own angle (bilinear, black fill), batched."""
    radians = degrees * math.pi / 180
    cos, sin, zero = radians.cos(), radians.sin(), torch.zeros_like(radians)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def pixel_statistics(images: torch.Tensor) -> torch.Tensor:
    """The lecture's four features per image: mean, std, max and min of its pixels, (N, 4)."""
    flat = images.flatten(1)
    return torch.stack([flat.mean(1), flat.std(1), flat.amax(1), flat.amin(1)], 1)


def isolation_forest_outliers(data: ImageDataset, *, model=None, features: str = "learned",
                              contamination: float = 0.05, seed: int = 0, progress: bool = True) -> SampleDetection:
    """Flag the ``contamination`` share of ``data`` an Isolation Forest finds most anomalous.

    ``features="learned"`` uses ``model.features`` (penultimate activations; ``model``
    required), ``"pixel_stats"`` the lecture's :func:`pixel_statistics` (no model needed).
    ``scores`` are the negated ``score_samples`` (higher = more anomalous). The forest has
    no class-level verdict: ``flagged_classes`` lists every class a flagged sample is in.
    """
    check_dataset("data", data, min_size=2)
    check_choice("features", features, FEATURE_KINDS)
    check_float("contamination", contamination, 0.0, 0.5, low_open=True)
    if features == "learned" and model is None:
        raise ValueError('model is required when features="learned"')
    start = time.perf_counter()
    x = extract_features(model, data.images, progress=progress) if features == "learned" \
        else pixel_statistics(data.images)
    x = x.double().numpy()
    forest = IsolationForest(contamination=contamination, random_state=seed, n_jobs=1)
    flagged = torch.from_numpy(forest.fit_predict(x) == -1).nonzero().flatten()
    return SampleDetection(PAPERS[features], torch.from_numpy(-forest.score_samples(x)).float(), flagged,
                           data.labels[flagged].unique().tolist(), time.perf_counter() - start)
