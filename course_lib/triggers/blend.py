"""The blended-injection trigger: a faint full-image pattern mixed into the picture."""
from __future__ import annotations

import torch

from ..checks import check_float, check_int
from .base import Trigger


class BlendTrigger(Trigger):
    """Mix a full-image pattern into the image: ``x' = (1 - alpha) * x + alpha * pattern``.

    Chen, Liu, Li, Lu and Song (2017), "Targeted Backdoor Attacks on Deep Learning Systems
    Using Data Poisoning", introduced this "blended injection": instead of a visible
    sticker, the whole image is blended with a key pattern (they used a Hello Kitty
    picture and random noise). With a small ``alpha`` the change is spread thinly over
    every pixel, so it is much harder to spot by eye than a patch, yet a network still
    learns it from a few dozen poisoned images.

    Args:
        alpha: blend weight of the pattern, in (0, 1].
        pattern: ``"noise"`` (uniform random noise drawn from ``seed``, generated for each
            image shape (C, H, W) the first time it is needed) or a (C, H, W) tensor in
            [0, 1]; a tensor only fits images of exactly that shape.
        seed: seed of the noise pattern.
    """

    name = "blend"

    def __init__(self, alpha: float = 0.1, pattern="noise", seed: int = 0):
        self.alpha = check_float("alpha", alpha, 0.0, 1.0, low_open=True)
        if isinstance(pattern, torch.Tensor):
            if pattern.ndim != 3 or pattern.shape[0] not in (1, 3) or not pattern.is_floating_point():
                raise ValueError(f"pattern must be a float (C, H, W) tensor with C in (1, 3), got "
                                 f"{pattern.dtype} tensor of shape {tuple(pattern.shape)}")
            if pattern.min() < 0 or pattern.max() > 1:
                raise ValueError("pattern must have values in [0, 1]")
            pattern = pattern.detach().to("cpu", torch.float32).clone()
        elif pattern != "noise":
            raise ValueError(f"pattern must be 'noise' or a (C, H, W) tensor, got {pattern!r}")
        self.pattern = pattern
        self.seed = check_int("seed", seed, 0)
        self._noise: dict[tuple[int, int, int], torch.Tensor] = {}

    def pattern_for(self, shape) -> torch.Tensor:
        """The (C, H, W) pattern blended into images of ``shape`` (C, H, W)."""
        shape = tuple(shape)
        if isinstance(self.pattern, torch.Tensor):
            return self.pattern
        if shape not in self._noise:
            generator = torch.Generator().manual_seed(self.seed)
            self._noise[shape] = torch.rand(shape, generator=generator)
        return self._noise[shape]

    def _check_shape(self, channels, height, width):
        super()._check_shape(channels, height, width)
        if isinstance(self.pattern, torch.Tensor):
            c, h, w = self.pattern.shape
            if c != channels:
                raise ValueError(f"this BlendTrigger's pattern has {c} channel(s) but the images "
                                 f"have {channels}")
            if (h, w) != (height, width):
                raise ValueError(f"this BlendTrigger's pattern is {h}x{w} but the images are "
                                 f"{height}x{width}")

    def _apply(self, batch):
        return torch.lerp(batch, self.pattern_for(batch.shape[1:]).to(batch), self.alpha)
