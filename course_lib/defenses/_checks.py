"""Argument checks shared by the defenses: every error names the argument at fault."""
from __future__ import annotations

import numbers

from torch import nn

from ..data import ImageDataset


def check_model(model, *attributes: str, name: str = "model") -> None:
    """``model`` is an nn.Module that has every one of ``attributes`` (e.g. ``"features"``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module, got {type(model).__name__}")
    missing = [a for a in attributes if not hasattr(model, a)]
    if missing:
        raise TypeError(f"{name} must have {', '.join('.' + a for a in missing)} (a course_lib CourseModel "
                        f"does); {type(model).__name__} has not")


def check_dataset(name: str, data, *, min_size: int = 1) -> None:
    """``data`` is an ImageDataset holding at least ``min_size`` images."""
    if not isinstance(data, ImageDataset):
        raise TypeError(f"{name} must be a course_lib.data.ImageDataset, got {type(data).__name__}")
    if len(data) < min_size:
        raise ValueError(f"{name} must hold at least {min_size} image(s), got {len(data)}")


def check_number(name: str, value, low: float, high: float, *, low_open: bool = False,
                 high_open: bool = False) -> float:
    """``value`` is a real number in the interval [low, high] (ends open as asked)."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")
    return float(value)


def check_int(name: str, value, low: int = 1, high: int | None = None) -> int:
    """``value`` is an integer in [low, high] (no upper bound when ``high`` is None)."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= low
    if not ok or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an integer {bound}, got {value!r}")
    return int(value)


def check_budget(name: str, budget, data, data_name: str) -> int:
    """A number of clean images to use: at least 1 and no more than ``data`` holds."""
    check_dataset(data_name, data)
    if isinstance(budget, bool) or not isinstance(budget, numbers.Integral) or not 1 <= budget <= len(data):
        raise ValueError(f"{name} must be an integer in [1, {len(data)}] (the size of {data_name}), "
                         f"got {budget!r}")
    return int(budget)
