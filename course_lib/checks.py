"""Argument checks for the whole library: one rule per kind of argument, one wording.

Every public function of ``course_lib`` validates its arguments with these helpers, so
a student who passes something wrong gets the same kind of message everywhere:

- ``TypeError`` when the argument has the wrong type ("size must be an integer >= 1,
  got 2.5");
- ``ValueError`` when it has the right type but an impossible value ("alpha must be in
  (0, 1], got 1.5");
- the message always starts with the argument's name.

``bool`` is never accepted as a number (``True`` is an ``int`` to Python, but nobody
means "one epoch" by ``epochs=True``).
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import nn


def _interval(low, high, low_open: bool, high_open: bool) -> str:
    return f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def check_int(name: str, value, low: int = 1, high: int | None = None) -> int:
    """``value`` as an int in [low, high] (no upper bound when ``high`` is None)."""
    bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer {bound}, got {value!r}")
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be an integer {bound}, got {value!r}")
    return int(value)


def check_float(name: str, value, low: float, high: float, *, low_open: bool = False,
                high_open: bool = False) -> float:
    """``value`` as a float in the interval from ``low`` to ``high`` (ends open as asked)."""
    interval = _interval(low, high, low_open, high_open)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number in {interval}, got {value!r}")
    value = float(value)
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if math.isnan(value) or too_low or too_high:
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return value


def check_bool(name: str, value) -> bool:
    """``value`` is True or False (not 0, 1 or a string that looks like one)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def check_choice(name: str, value, choices) -> str:
    """``value`` is one of ``choices`` (e.g. a method name)."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_model(model, *attributes: str, name: str = "model") -> None:
    """``model`` is an nn.Module that has every one of ``attributes`` (e.g. ``"features"``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module, got {type(model).__name__}")
    missing = [a for a in attributes if not hasattr(model, a)]
    if missing:
        raise TypeError(f"{name} must have {', '.join('.' + a for a in missing)} (a course_lib CourseModel "
                        f"does); {type(model).__name__} has not")


def check_dataset(name: str, data, *, min_size: int = 1, like=None, like_name: str = "data") -> None:
    """``data`` is a :class:`course_lib.data.ImageDataset` holding at least ``min_size`` images;
    with ``like``, another dataset, its images have the same (C, H, W) and it has the same
    number of classes (so one model can read both)."""
    from .data import ImageDataset  # data imports nothing from here; the late import keeps it that way

    if not isinstance(data, ImageDataset):
        raise TypeError(f"{name} must be a course_lib.data.ImageDataset, got {type(data).__name__}")
    if len(data) < min_size:
        raise ValueError(f"{name} must hold at least {min_size} image(s), got {len(data)}")
    if like is not None and (data.images.shape[1:] != like.images.shape[1:] or data.num_classes != like.num_classes):
        raise ValueError(f"{name} must hold images like {like_name}'s: {tuple(like.images.shape[1:])} in "
                         f"{like.num_classes} classes, got {tuple(data.images.shape[1:])} in {data.num_classes}")


def check_budget(name: str, budget, data, data_name: str) -> int:
    """A number of images to take from ``data``: an integer in [1, len(data)]."""
    check_dataset(data_name, data)
    if isinstance(budget, bool) or not isinstance(budget, numbers.Integral):
        raise TypeError(f"{name} must be an integer in [1, {len(data)}] (the size of {data_name}), got {budget!r}")
    if not 1 <= budget <= len(data):
        raise ValueError(f"{name} must be an integer in [1, {len(data)}] (the size of {data_name}), "
                         f"got {budget!r}")
    return int(budget)


def check_images(name: str, images, *, min_count: int = 1) -> torch.Tensor:
    """``images`` is a float (N, C, H, W) tensor with at least ``min_count`` images."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (N, C, H, W), got {type(images).__name__}")
    if images.ndim != 4 or not images.is_floating_point():
        raise ValueError(f"{name} must be a float tensor of shape (N, C, H, W), got "
                         f"{images.dtype} {tuple(images.shape)}")
    if len(images) < min_count:
        raise ValueError(f"{name} must hold at least {min_count} image(s), got {len(images)}")
    return images


def check_indices(name: str, indices, n: int) -> torch.Tensor:
    """``indices`` (integer indices or a boolean mask into ``n`` items) as a boolean (n,) mask.

    A float tensor is refused (0.7 is no index), and a boolean mask must have length ``n``.
    """
    try:
        idx = torch.as_tensor(indices)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"{name} must be integer indices or a boolean mask, got {type(indices).__name__}") from err
    if idx.dtype == torch.bool:
        if idx.shape != (n,):
            raise ValueError(f"{name} as a boolean mask must have length {n}, got {tuple(idx.shape)}")
        return idx.clone()
    if idx.numel() and (idx.is_floating_point() or idx.is_complex()):  # [] is a float tensor
        raise TypeError(f"{name} must be integer indices or a boolean mask, got dtype {idx.dtype}")
    idx = idx.long().flatten()
    if len(idx) and (idx.min() < 0 or idx.max() >= n):
        raise ValueError(f"{name} must lie in [0, {n - 1}]")
    mask = torch.zeros(n, dtype=torch.bool)
    mask[idx] = True
    return mask
