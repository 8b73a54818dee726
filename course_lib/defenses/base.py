"""The four kinds of defense, and what each kind returns.

Every defense of the lecture is one of four kinds, and every defense of one kind answers
in the same shape, so that one comparison (:mod:`.compare`) and one notebook can run
them all without adapters:

===================  =========================================  ===========================
kind                 returns                                    defenses
===================  =========================================  ===========================
sample detector      :class:`SampleDetection`: a score per      Activation Clustering,
                     training sample, the flagged samples and   Spectral Signatures,
                     the classes they were flagged in           IsolationForest
model detector       :class:`LabelDetection`: a statistic per   Neural Cleanse
                     label, its anomaly index, flagged labels
input detector       an :class:`InputDetector`: fitted on       STRIP
                     clean inputs; ``scores`` and a
                     ``threshold``, ``rejects`` new inputs
mitigation           :class:`Mitigation`: a repaired *copy* of  retraining without flagged
                     the model                                  samples, unlearning,
                                                                Fine-Pruning, DP-SGD
===================  =========================================  ===========================

Each result names the paper it follows (``paper``) and the wall time it took.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..cache import storable


@storable
@dataclass
class SampleDetection:
    """What a sample detector found in a (possibly poisoned) training set of N samples.

    ``scores`` (N,): higher = more suspicious (comparable within one detector only);
    ``flagged``: sorted indices of the samples judged poisoned; ``flagged_classes``: the
    classes those samples were flagged in (a class-level verdict).
    """

    paper: str
    scores: torch.Tensor
    flagged: torch.Tensor
    flagged_classes: list[int]
    seconds: float


@storable
@dataclass
class LabelDetection:
    """What a model detector found: one ``statistic`` per label (K,), its ``anomaly_index``
    (K,) and the ``flagged`` labels judged backdoored at ``threshold``."""

    paper: str
    statistic: torch.Tensor
    anomaly_index: torch.Tensor
    flagged: list[int]
    threshold: float
    seconds: float


class InputDetector:
    """A run-time filter fitted on clean inputs. Subclasses define :meth:`scores` (lower =
    more suspicious) and set ``threshold``, ``paper`` and ``frr`` (the share of clean
    inputs the threshold was set to reject)."""

    paper: str = ""
    threshold: float
    frr: float

    def scores(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def rejects(self, images: torch.Tensor) -> torch.Tensor:
        """Boolean (N,): True for inputs judged triggered (score below the threshold)."""
        return self.scores(images) < self.threshold


@storable
@dataclass
class Mitigation:
    """A repaired copy of a model (the model given is never modified)."""

    paper: str
    model: nn.Module
    seconds: float
