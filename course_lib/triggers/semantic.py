"""Semantic (feature-space) triggers: a global change of the picture instead of a sticker.

Bagdasaryan et al. (2020), "How To Backdoor Federated Learning", call a backdoor
*semantic* when the trigger is a natural property of the input (green cars, striped
backgrounds) rather than added pixels; Liu et al. (2019), "ABS: Scanning Neural Networks
for Back-doors by Artificial Brain Stimulation", show that image filters work as triggers
too. The lecture's three examples are such global filters: nothing is pasted, so
patch-oriented defenses have no square to find, but the trigger is also fragile: an
ordinary photo can be bright, tinted or blurry by accident and fire the backdoor.
"""
from __future__ import annotations

import torch
from torchvision.transforms.v2 import functional as TF

from ..checks import check_float, check_int
from .base import Trigger


class BrightnessTrigger(Trigger):
    """Multiply every pixel by ``factor`` (then clamp): a "brighter photo" trigger.

    A global filter used as a trigger, in the sense of Liu et al. (2019, ABS). The
    lecture's default ``factor=1.3`` is +30% brightness. Bright images saturate at 1,
    which is part of what the network can pick up.

    Args:
        factor: brightness multiplier in (0, 10], not 1 (1 would change nothing).
    """

    name = "brightness"

    def __init__(self, factor: float = 1.3):
        self.factor = check_float("factor", factor, 0.0, 10.0, low_open=True)
        if self.factor == 1.0:
            raise ValueError("factor must differ from 1 (factor=1 leaves the image unchanged)")

    def _apply(self, batch):
        return TF.adjust_brightness(batch, self.factor)


class ColorShiftTrigger(Trigger):
    """Add ``shift`` to one color channel: a tint (the lecture's "greenish" filter).

    A color cast is the simplest "semantic" property (Bagdasaryan et al. 2020 used green
    cars): every pixel changes a little, none changes shape.

    Args:
        shift: amount added to the channel, in [-1, 1] and not 0.
        channel: which channel to shift (0 red, 1 green, 2 blue); grayscale images only
            have channel 0.
    """

    name = "color_shift"

    def __init__(self, shift: float = 0.2, channel: int = 1):
        self.shift = check_float("shift", shift, -1.0, 1.0)
        if self.shift == 0.0:
            raise ValueError("shift must not be 0 (a zero shift leaves the image unchanged)")
        self.channel = check_int("channel", channel, 0)
        if self.channel > 2:
            raise ValueError(f"channel must be 0, 1 or 2, got {channel}")

    def _check_shape(self, channels, height, width):
        super()._check_shape(channels, height, width)
        if self.channel >= channels:
            raise ValueError(f"ColorShiftTrigger(channel={self.channel}) needs images with at least "
                             f"{self.channel + 1} channels, got {channels}; use channel=0 for grayscale")

    def _apply(self, batch):
        out = batch.clone()
        out[:, self.channel] += self.shift
        return out


class BlurTrigger(Trigger):
    """Gaussian-blur the whole image: an "out of focus" trigger.

    Blurring removes high frequencies, so the network learns "no fine detail -> target";
    like the other filters, it is a feature-space trigger (Liu et al. 2019, ABS).
    Uses torchvision's ``gaussian_blur`` (reflect padding at the borders).

    Args:
        kernel_size: odd side of the blur kernel in pixels, >= 3, at most the image size.
        sigma: standard deviation of the Gaussian in pixels, in (0, 10].
    """

    name = "blur"

    def __init__(self, kernel_size: int = 5, sigma: float = 1.5):
        self.kernel_size = check_int("kernel_size", kernel_size, 3)
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.sigma = check_float("sigma", sigma, 0.0, 10.0, low_open=True)

    def _check_shape(self, channels, height, width):
        super()._check_shape(channels, height, width)
        if self.kernel_size > min(height, width):
            raise ValueError(f"kernel_size={self.kernel_size} is larger than the {height}x{width} image")

    def _apply(self, batch):
        # channels_last makes torchvision's depthwise convolution several times faster on CPU.
        blurred = TF.gaussian_blur(batch.contiguous(memory_format=torch.channels_last),
                                   kernel_size=[self.kernel_size] * 2, sigma=[self.sigma] * 2)
        return blurred.contiguous()
