"""The lecture's "advanced" triggers: dynamic, distributed and sample-specific."""
from __future__ import annotations

import torch

from ..checks import check_int
from .base import Trigger, check_location, place


class DynamicTrigger(Trigger):
    """A square whose brightness adapts to the image: bright on dark images, dark on bright ones.

    Dynamic backdoors (Salem et al. 2022, "Dynamic Backdoor Attacks Against Machine
    Learning Models") use triggers that change from input to input, so no single fixed
    pattern exists for a defender to search for. This is the lecture's simple
    content-adaptive version: a solid square whose value is 1 if the image's mean
    intensity is below 0.3, 0 if it is above 0.7, and ``1 - mean`` in between, so the
    square always contrasts with the picture. Its place is still fixed, so patch-based
    defenses can still localize it.

    Args:
        size: side of the square in pixels.
        location: a named location (see :class:`PatchTrigger`) or an ``(x, y)`` pair.
    """

    name = "dynamic"

    def __init__(self, size: int = 5, location="bottom-right"):
        self.size = check_int("size", size, 1)
        self.location = check_location(location)

    def _boxes(self, height, width):
        return [(*place(self.location, self.size, height, width), self.size)]

    def _apply(self, batch):
        mean = batch.mean(dim=(1, 2, 3))
        value = torch.where(mean < 0.3, 1.0, torch.where(mean > 0.7, 0.0, 1.0 - mean))
        (top, left, size), = self._boxes(*batch.shape[-2:])
        out = batch.clone()
        out[:, :, top:top + size, left:left + size] = value.view(-1, 1, 1, 1)
        return out


class DistributedTrigger(Trigger):
    """Solid squares in up to four corners, alternating white and black.

    Spreading the trigger over several places makes it survive a crop or an occlusion
    that removes one piece, at the price of touching more pixels (less stealthy). The
    idea of a trigger split into parts is developed for federated learning by Xie et al.
    (2020), "DBA: Distributed Backdoor Attacks against Federated Learning"; here all parts
    are stamped at once, as in the lecture. Corners are filled in the order top-left
    (white), top-right (black), bottom-left (white), bottom-right (black).

    Args:
        patch_size: side of each square in pixels.
        num_patches: how many corners to use, 1 to 4.
    """

    name = "distributed"

    def __init__(self, patch_size: int = 3, num_patches: int = 4):
        self.patch_size = check_int("patch_size", patch_size, 1)
        self.num_patches = check_int("num_patches", num_patches, 1)
        if self.num_patches > 4:
            raise ValueError(f"num_patches must be between 1 and 4 (one per corner), got {num_patches}")

    def _boxes(self, height, width):
        size = self.patch_size
        needed = size if self.num_patches == 1 else 2 * size
        if needed > min(height, width):
            raise ValueError(f"patch_size={size} is too large for the {height}x{width} image: "
                             f"{self.num_patches} corner squares need {needed} pixels per side")
        corners = ("top-left", "top-right", "bottom-left", "bottom-right")[:self.num_patches]
        return [(*place(corner, size, height, width), size) for corner in corners]

    def _apply(self, batch):
        out = batch.clone()
        for i, (top, left, size) in enumerate(self._boxes(*batch.shape[-2:])):
            out[:, :, top:top + size, left:left + size] = 1.0 if i % 2 == 0 else 0.0
        return out


_MASK31 = (1 << 31) - 1
_KNUTH = 2654435761  # Knuth's multiplicative-hashing constant, about 2**32 / golden ratio


def _hash31(x: torch.Tensor) -> torch.Tensor:
    """Scramble non-negative int64 values below 2**31 into pseudo-random values below 2**31.

    Rounds of xor-shift and multiplication by an odd constant. Keeping values below 2**31
    means the product stays below 2**63, so int64 arithmetic never overflows.
    """
    for _ in range(3):
        x = ((x ^ (x >> 15)) * _KNUTH) & _MASK31
    return x ^ (x >> 15)


class SampleSpecificTrigger(Trigger):
    """A different random black-and-white square for every sample, derived from a secret key.

    Sample-specific triggers (Li et al. 2021, "Invisible Backdoor Attack with
    Sample-Specific Triggers") break the assumption of many defenses that all poisoned
    images share one trigger. This is the lecture's simple version: the ``size`` x
    ``size`` binary pattern of sample ``i`` is a keyed hash of (``key``, ``i``), so the
    attacker can regenerate it from the key alone. What a network actually learns from
    such data is their common feature, "a random binary square in this corner", so at
    test time any such square (any sample id) tends to fire the backdoor.

    Unlike the lecture code (erratum 9), nothing here reseeds NumPy's or torch's global
    random generator: the bits come from an integer hash computed for all ids at once.

    Args:
        key: secret integer in [0, 2**31).
        size: side of the square in pixels.
        location: a named location (see :class:`PatchTrigger`) or an ``(x, y)`` pair.
    """

    name = "sample_specific"

    def __init__(self, key: int = 42, size: int = 5, location="bottom-right"):
        self.key = check_int("key", key, 0)
        if self.key > _MASK31:
            raise ValueError(f"key must be below 2**31, got {key}")
        self.size = check_int("size", size, 1)
        self.location = check_location(location)

    def patterns(self, sample_ids, channels: int = 3) -> torch.Tensor:
        """The (N, channels, size, size) 0/1 patterns of the N ``sample_ids``."""
        ids = self._check_ids(sample_ids)
        count = check_int("channels", channels, 1) * self.size * self.size
        per_sample = _hash31(_hash31(torch.tensor(self.key)) ^ ids)             # (N,)
        bits = (_hash31(per_sample[:, None] ^ torch.arange(count)) >> 11) & 1   # (N, count)
        return bits.float().view(-1, channels, self.size, self.size)

    @staticmethod
    def _check_ids(sample_ids) -> torch.Tensor:
        try:
            ids = torch.as_tensor(sample_ids)
        except (TypeError, ValueError, RuntimeError):
            ids = None
        if (ids is None or ids.ndim > 1 or ids.dtype == torch.bool or ids.dtype.is_floating_point
                or ids.dtype.is_complex):
            raise ValueError(f"sample_ids must be an int or a 1-D sequence of ints, got {sample_ids!r}")
        ids = ids.reshape(-1).long().cpu()
        if len(ids) and (ids.min() < 0 or ids.max() > _MASK31):
            raise ValueError("sample_ids must lie in [0, 2**31)")
        return ids

    def __call__(self, images: torch.Tensor, sample_ids=None) -> torch.Tensor:
        """Stamp each image's own pattern; ``sample_ids`` defaults to 0, 1, ..., B - 1.

        For one image (C, H, W), ``sample_ids`` is a single int (default 0).
        """
        batch = self._as_batch(images)
        ids = torch.arange(len(batch)) if sample_ids is None else self._check_ids(sample_ids)
        if len(ids) != len(batch):
            raise ValueError(f"sample_ids must give one id per image ({len(batch)}), got {len(ids)}")
        (top, left, size), = self._boxes(*batch.shape[-2:])
        out = batch.clone()
        out[:, :, top:top + size, left:left + size] = self.patterns(ids, batch.shape[1]).to(batch)
        return self._finish(out, images)

    def _boxes(self, height, width):
        return [(*place(self.location, self.size, height, width), self.size)]
