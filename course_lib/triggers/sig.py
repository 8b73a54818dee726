"""The SIG trigger: a faint horizontal sine wave added to the whole image."""
from __future__ import annotations

import math

import torch

from ..checks import check_float
from .base import Trigger


class SIGTrigger(Trigger):
    """Add ``delta * sin(2 * pi * frequency * j / W)`` to pixel column ``j`` (all rows, all channels).

    Barni, Kallas and Tondi (2019), "A New Backdoor Attack in CNNs by Training Set
    Corruption Without Label Poisoning", used this signal for a clean-label attack: they
    add it only to images that already belong to the target class and keep their
    labels, so every poisoned sample looks correctly labelled. The wave varies along the
    horizontal axis (faint vertical stripes) and is hard to notice at small ``delta``.

    Args:
        delta: amplitude of the wave in pixel units, in (0, 1].
        frequency: number of periods across the image width, > 0 and below half the
            width (at W / 2 the samples would all fall on zeros of the sine).
    """

    name = "sig"

    def __init__(self, delta: float = 0.08, frequency: float = 6):
        self.delta = check_float("delta", delta, 0.0, 1.0, low_open=True)
        self.frequency = check_float("frequency", frequency, 0.0, 1e6, low_open=True)

    def _check_shape(self, channels, height, width):
        super()._check_shape(channels, height, width)
        if self.frequency >= width / 2:
            raise ValueError(f"frequency must be below half the image width ({width / 2:g}), "
                             f"got {self.frequency:g}")

    def signal(self, width: int) -> torch.Tensor:
        """The (width,) wave added to every row of a ``width``-pixel-wide image."""
        columns = torch.arange(width, dtype=torch.float64)
        return (self.delta * torch.sin(2 * math.pi * self.frequency * columns / width)).float()

    def _apply(self, batch):
        return batch + self.signal(batch.shape[-1]).to(batch)
