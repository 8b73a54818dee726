"""The WaNet trigger: an almost invisible, smooth warp of the image geometry."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..checks import check_float, check_int
from .base import Trigger


class WaNetTrigger(Trigger):
    """Resample the image through a fixed, smooth random warping field (Nguyen & Tran 2021).

    Nguyen and Tran (2021), "WaNet - Imperceptible Warping-based Backdoor Attack", replace
    added pixels by a geometric distortion: every image is slightly bent in the same way.
    No pixel gets a foreign color, so patch detectors and visual inspection miss it.

    The field is built as in the paper: a ``k`` x ``k`` grid of random 2-D offsets in
    [-1, 1] (drawn from ``seed``), normalized to mean absolute value 1, upsampled
    bicubically to the image size, scaled by ``strength / H`` in grid_sample's [-1, 1]
    coordinates (a shift of about ``strength / 2`` pixels on average) and added to the
    identity grid; the image is then resampled bilinearly with ``F.grid_sample``. The
    grid for each image size is computed once and cached.

    Args:
        k: side of the control grid, >= 2 and at most the image size (small k = smoother).
        strength: warping strength ``s`` of the paper, in (0, 10].
        seed: seed of the random control grid.
    """

    name = "wanet"

    def __init__(self, k: int = 4, strength: float = 0.5, seed: int = 0):
        self.k = check_int("k", k, 2)
        self.strength = check_float("strength", strength, 0.0, 10.0, low_open=True)
        self.seed = check_int("seed", seed, 0)
        self._grids: dict[tuple[int, int], torch.Tensor] = {}

    def _check_shape(self, channels, height, width):
        super()._check_shape(channels, height, width)
        if self.k > min(height, width):
            raise ValueError(f"k={self.k} (control grid size) is larger than the {height}x{width} image")

    def grid(self, height: int, width: int) -> torch.Tensor:
        """The (1, H, W, 2) sampling grid (x, y in [-1, 1]) used for ``height`` x ``width`` images."""
        if (height, width) not in self._grids:
            generator = torch.Generator().manual_seed(self.seed)
            offsets = torch.rand(1, 2, self.k, self.k, generator=generator) * 2 - 1
            offsets = offsets / offsets.abs().mean()
            flow = F.interpolate(offsets, size=(height, width), mode="bicubic", align_corners=True)
            ys, xs = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width),
                                    indexing="ij")
            identity = torch.stack((xs, ys), dim=-1)[None]                # (1, H, W, 2)
            warped = identity + self.strength * flow.permute(0, 2, 3, 1) / height
            self._grids[(height, width)] = warped.clamp(-1, 1)
        return self._grids[(height, width)]

    def _apply(self, batch):
        grid = self.grid(*batch.shape[-2:]).to(batch).expand(len(batch), -1, -1, -1)
        return F.grid_sample(batch, grid, mode="bilinear", padding_mode="border", align_corners=True)
