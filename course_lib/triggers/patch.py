"""The pixel-pattern trigger of BadNets: a small square stamped at a fixed place."""
from __future__ import annotations

import torch

from ..checks import check_float, check_int
from .base import Trigger, check_location, place

PATTERNS = ("checkerboard", "solid")


class PatchTrigger(Trigger):
    """Overwrite a ``size`` x ``size`` square with a fixed pattern (BadNets, Gu et al. 2017).

    Gu, Dolan-Gavitt and Garg (2017), "BadNets: Identifying Vulnerabilities in the Machine
    Learning Model Supply Chain", showed that a few training images stamped with a small
    sticker and relabelled to a target class are enough: the network learns "sticker ->
    target" on top of the normal task, so clean accuracy stays high while every stamped
    input goes to the target class. A fixed pattern at a fixed place is the easiest
    trigger to learn, and also the easiest to see and to reverse-engineer (Neural Cleanse).

    Args:
        size: side of the square in pixels.
        pattern: ``"checkerboard"`` (alternating ``value`` and ``1 - value``, starting with
            ``value`` at the square's top-left pixel) or ``"solid"`` (all ``value``).
        location: one of ``"bottom-right"``, ``"bottom-left"``, ``"top-right"``,
            ``"top-left"``, ``"center"``, or an ``(x, y)`` pair: column and row of the
            square's top-left pixel.
        value: pixel value of the square (in every channel), in [0, 1].
    """

    name = "patch"

    def __init__(self, size: int = 3, pattern: str = "checkerboard", location="bottom-right",
                 value: float = 1.0):
        self.size = check_int("size", size, 1)
        if pattern not in PATTERNS:
            raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")
        self.pattern = pattern
        self.location = check_location(location)
        self.value = check_float("value", value, 0.0, 1.0)

    def tile(self) -> torch.Tensor:
        """The (size, size) square that is stamped into every channel."""
        if self.pattern == "solid":
            return torch.full((self.size, self.size), self.value)
        rows = torch.arange(self.size)
        even = (rows[:, None] + rows[None, :]) % 2 == 0
        return torch.where(even, self.value, 1.0 - self.value)

    def _boxes(self, height, width):
        return [(*place(self.location, self.size, height, width), self.size)]

    def _apply(self, batch):
        (top, left, size), = self._boxes(*batch.shape[-2:])
        out = batch.clone()
        out[:, :, top:top + size, left:left + size] = self.tile().to(batch)
        return out
