"""The mitigation every sample detector shares: drop the flagged samples and train again.

Chen et al. (2018) and Tran, Li & Madry (2018) both repair a model this way: once the
poisoned training samples are found, a fresh model trained without them has no reason
to learn the trigger. How well it works depends only on how much poison the detector
missed: a few hundred poisoned samples left behind still plant the backdoor.
"""
from __future__ import annotations

import time

from ..checks import check_dataset, check_indices, check_int
from ..data import ImageDataset
from ..models import model_for
from ..train import train
from .base import Mitigation


def remove(data: ImageDataset, indices) -> ImageDataset:
    """A copy of ``data`` without the samples at ``indices`` (indices or a boolean mask)."""
    check_dataset("data", data)
    keep = ~check_indices("indices", indices, len(data))
    if not keep.any():
        raise ValueError("indices must leave at least one sample of data")
    return data.subset(keep)


def retrain_without(data: ImageDataset, flagged, *, epochs: int = 2, arch: str | None = None, seed: int = 0,
                    device=None, progress: bool = True, paper: str = "retraining without flagged samples"
                    ) -> Mitigation:
    """A fresh model (``arch``, ``seed``) trained for ``epochs`` on ``data`` minus ``flagged``."""
    check_int("epochs", epochs)
    start = time.perf_counter()
    cleaned = remove(data, flagged)
    model = model_for(cleaned, arch=arch, seed=seed)
    train(model, cleaned, epochs=epochs, seed=seed, device=device, progress=progress)
    return Mitigation(paper, model, time.perf_counter() - start)
