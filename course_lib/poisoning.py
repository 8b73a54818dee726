"""Label-flipping poisoning: the attacks of the lecture's taxonomy that touch only labels.

- :func:`flip_labels_random` is an *availability* attack: it mislabels a random
  fraction of the training set so that the whole model gets worse.
- :func:`flip_labels_targeted` is an *integrity* (targeted misclassification) attack:
  it relabels some images of one source class as a target class, so the model learns to
  confuse those two classes while its overall accuracy barely moves.

Both are "dirty-label" poisoning (the label no longer matches the image), the simplest
data poisoning studied e.g. by Biggio, Nelson & Laskov (2012) and Xiao et al. (2015).

Both return ``(new_labels, indices)``: the poisoned labels and the sorted indices of
the samples that were changed. The indices are the ground truth a detector is scored
against. The input tensor is never modified, and randomness comes only from ``seed``.

Errata: the lecture's ``availability_attack`` draws the new label with
``np.random.randint(0, 10)``, which returns the *original* label one time in ten, so
"20% poisoned" actually changes only about 18% of the labels. Here a flipped label is
always a different class.
"""
from __future__ import annotations

import numbers

import torch


def flip_labels_random(labels: torch.Tensor, rate: float, *, num_classes: int,
                       seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Availability attack: give ``round(rate * N)`` random samples a *different* random label.

    The new label is drawn uniformly from the ``num_classes - 1`` other classes (adding a
    random offset in ``1 .. num_classes-1`` modulo ``num_classes`` can never land on the
    old label). ``rate`` is in [0, 1]; 0 returns an unpoisoned copy, handy as a baseline.
    """
    labels = _check_labels(labels)
    _check_rate(rate, allow_zero=True)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if len(labels) and labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, num_classes - 1] = [0, {num_classes - 1}], "
                         f"got a label {labels.max().item()}")
    gen = torch.Generator().manual_seed(seed)
    count = round(rate * len(labels))
    indices = torch.randperm(len(labels), generator=gen)[:count].sort().values
    offsets = torch.randint(1, num_classes, (count,), generator=gen)
    new_labels = labels.clone()
    new_labels[indices] = (labels[indices] + offsets) % num_classes
    return new_labels, indices


def flip_labels_targeted(labels: torch.Tensor, *, source: int, target: int, rate: float,
                         seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Targeted attack: relabel ``round(rate * n_source)`` random ``source`` samples as ``target``.

    ``rate`` is the fraction of the *source class* (not of the whole set), in [0, 1].
    Samples of every other class are left alone.
    """
    labels = _check_labels(labels)
    _check_rate(rate, allow_zero=True)
    _check_class_index("source", source)
    _check_class_index("target", target)
    if source == target:
        raise ValueError(f"source and target must be different classes, got {source} for both")
    candidates = (labels == source).nonzero().flatten()
    if len(candidates) == 0:
        raise ValueError(f"source class {source} has no samples in labels")
    gen = torch.Generator().manual_seed(seed)
    count = round(rate * len(candidates))
    indices = candidates[torch.randperm(len(candidates), generator=gen)[:count]].sort().values
    new_labels = labels.clone()
    new_labels[indices] = target
    return new_labels, indices


def _check_labels(labels) -> torch.Tensor:
    """A 1-D tensor of non-negative integer labels, returned as int64."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.ndim != 1 or labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be a 1-D integer tensor, got dtype {labels.dtype} "
                         f"and shape {tuple(labels.shape)}")
    if len(labels) and labels.min() < 0:
        raise ValueError(f"labels must be >= 0, got {labels.min().item()}")
    return labels.long()


def _check_rate(rate, *, allow_zero: bool) -> None:
    """``rate`` is a real number in [0, 1] (or (0, 1] when ``allow_zero`` is False)."""
    is_number = isinstance(rate, numbers.Real) and not isinstance(rate, bool)
    if not (is_number and (0 <= rate if allow_zero else 0 < rate) and rate <= 1):
        interval = "[0, 1]" if allow_zero else "(0, 1]"
        raise ValueError(f"rate must be a number in {interval}, got {rate!r}")


def _check_class_index(name: str, value, num_classes: int | None = None) -> None:
    """``value`` is an int class index, below ``num_classes`` when that is known."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer class index, got {value!r}")
    if num_classes is not None and value >= num_classes:
        raise ValueError(f"{name} must be a class of the dataset, in [0, {num_classes - 1}], got {value}")
