"""What every backdoor trigger has in common, and the placement checks they all share.

A trigger is a function from images to images: the attacker stamps it on a few training
images (relabelled to the target class) and later on any test input to fire the
backdoor. In this course a trigger is a callable object that

- takes one image (C, H, W) or a batch (B, C, H, W) of floats in [0, 1], with 1 or 3
  channels and any height and width;
- returns a NEW tensor of the same shape and dtype, clamped to [0, 1] (the input is
  never written to, so the clean data stays clean);
- is deterministic: the same trigger object gives the same output for the same input;
- works on a whole batch with a few tensor operations, so poisoning 50,000 images
  takes a fraction of a second.
"""
from __future__ import annotations

import inspect
import numbers

import torch


#: Named places for a square trigger; an ``(x, y)`` pair (column, row of the
#: square's top-left pixel) is accepted too.
LOCATIONS = ("bottom-right", "bottom-left", "top-right", "top-left", "center")


def check_location(location):
    """A named location from :data:`LOCATIONS` or an (x, y) pair of non-negative ints."""
    if isinstance(location, str) and location in LOCATIONS:
        return location
    if (isinstance(location, (tuple, list)) and len(location) == 2
            and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 0
                    for v in location)):
        return (int(location[0]), int(location[1]))
    raise ValueError(f"location must be one of {LOCATIONS} or an (x, y) pair of non-negative "
                     f"integers (column, row of the top-left pixel), got {location!r}")


def place(location, size: int, height: int, width: int, *, size_name: str = "size") -> tuple[int, int]:
    """(top, left) of a ``size`` x ``size`` square at ``location`` in a ``height`` x ``width`` image.

    Raises ValueError naming ``size_name`` if the square is larger than the image, or
    naming ``location`` if an (x, y) position would push it over the edge.
    """
    if size > height or size > width:
        raise ValueError(f"{size_name}={size} is larger than the {height}x{width} image")
    if isinstance(location, tuple):
        left, top = location
        if left + size > width or top + size > height:
            raise ValueError(f"location={location} puts the {size}x{size} square outside the "
                             f"{height}x{width} image (need x <= {width - size}, y <= {height - size})")
        return top, left
    if location == "center":
        return (height - size) // 2, (width - size) // 2
    vertical, _, horizontal = location.partition("-")
    top = 0 if vertical == "top" else height - size
    left = 0 if horizontal == "left" else width - size
    return top, left


class Trigger:
    """Base class of all triggers: input checks, batching, clamping and ``repr``.

    Subclasses set ``name`` (the key :func:`course_lib.triggers.make_trigger` knows them
    by) and implement ``_apply(batch)``, which gets a validated (B, C, H, W) tensor and
    returns a new tensor. Patch-like triggers also implement ``_boxes`` so that shape
    checks and :meth:`footprint` come for free.
    """

    name = "trigger"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Return triggered copies of ``images`` ((C, H, W) or (B, C, H, W), floats in [0, 1])."""
        return self._finish(self._apply(self._as_batch(images)), images)

    def _apply(self, batch: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _as_batch(self, images) -> torch.Tensor:
        """Validate ``images`` and return them as a (B, C, H, W) tensor (a view, not a copy)."""
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if images.ndim not in (3, 4):
            raise ValueError(f"images must be one image (C, H, W) or a batch (B, C, H, W), "
                             f"got shape {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"images must be a float tensor in [0, 1], got dtype {images.dtype} "
                             f"(convert uint8 images with images.float() / 255)")
        batch = images if images.ndim == 4 else images.unsqueeze(0)
        self._check_shape(*batch.shape[1:])
        return batch

    def _check_shape(self, channels: int, height: int, width: int) -> None:
        """Raise ValueError if this trigger cannot be applied to (channels, height, width) images."""
        if channels not in (1, 3):
            raise ValueError(f"images must have 1 or 3 channels (dimension -3), got {channels}")
        self._boxes(height, width)

    def _boxes(self, height: int, width: int) -> list[tuple[int, int, int]] | None:
        """The (top, left, size) squares this trigger writes, or None if it may touch every pixel."""
        return None

    @staticmethod
    def _finish(out: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Clamp the fresh tensor ``out`` to [0, 1] in place and give it the input's shape and dtype."""
        out = out.clamp_(0, 1).to(images.dtype)
        return out if images.ndim == 4 else out.squeeze(0)

    def footprint(self, image_shape) -> torch.Tensor:
        """Boolean (H, W) mask of the pixels this trigger may change on images of ``image_shape``.

        ``image_shape`` is (C, H, W). Patch-like triggers mark their squares; triggers that
        act on the whole image (blending, brightness, warping...) mark every pixel.
        """
        shape = tuple(image_shape)
        if len(shape) != 3 or not all(isinstance(v, numbers.Integral) and v > 0 for v in shape):
            raise ValueError(f"image_shape must be (C, H, W) with positive ints, got {image_shape!r}")
        channels, height, width = (int(v) for v in shape)
        self._check_shape(channels, height, width)
        boxes = self._boxes(height, width)
        if boxes is None:
            return torch.ones(height, width, dtype=torch.bool)
        mask = torch.zeros(height, width, dtype=torch.bool)
        for top, left, size in boxes:
            mask[top:top + size, left:left + size] = True
        return mask

    def __repr__(self) -> str:
        params = inspect.signature(type(self).__init__).parameters
        shown = []
        for arg in list(params)[1:]:
            value = getattr(self, arg)
            text = f"Tensor{tuple(value.shape)}" if isinstance(value, torch.Tensor) else repr(value)
            shown.append(f"{arg}={text}")
        return f"{type(self).__name__}({', '.join(shown)})"
