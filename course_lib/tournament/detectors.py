"""The detectors of the tournament that the grader runs itself: the house detectors and two controls.

House detectors are the kit's own sample detectors on an arena's model, training set and
activations, with the arena's clean held-out images as the defender's trusted data, as in
the detection matrix (docs/detection_matrix.jsonl): Activation Clustering (Chen et al.
2018) and Spectral Signatures (Tran, Li & Madry 2018). The controls say what a score means:
a detector that flags every sample scores exactly TPR 1, FPR 1, Detection Score 0; one that
flags each sample with probability one half scores about 0. Students' detectors run in the
sandbox instead (:mod:`.student_code`).
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch

from ..data import ImageDataset
from ..defenses.activation_clustering import activation_clustering
from ..defenses.spectral_signatures import spectral_signatures

HOUSE_DETECTORS = ("house:activation_clustering", "house:spectral_signatures")
CONTROLS = ("control:always_flag", "control:random")


def _mask(indices: torch.Tensor, n: int) -> np.ndarray:
    flags = np.zeros(n, dtype=bool)
    flags[indices.numpy()] = True
    return flags


def house_flags(name: str, arena, defender: ImageDataset) -> np.ndarray:
    """The flags (one bool per training sample) of house detector or control ``name`` on ``arena``."""
    n = len(arena.data)
    if name == "house:activation_clustering":
        found = activation_clustering(arena.model, arena.data, features=arena.features, clean_data=defender,
                                      seed=arena.info.get("seed", 0), progress=False)
        return _mask(found.flagged, n)
    if name == "house:spectral_signatures":
        found = spectral_signatures(arena.model, arena.data, clean_data=defender, features=arena.features,
                                    progress=False)
        return _mask(found.flagged, n)
    if name == "control:always_flag":
        return np.ones(n, dtype=bool)
    if name == "control:random":
        seed = int.from_bytes(hashlib.sha256(arena.name.encode()).digest()[:4], "little")
        return np.random.default_rng(seed).random(n) < 0.5
    raise ValueError(f"name must be one of {HOUSE_DETECTORS + CONTROLS}, got {name!r}")
