"""An optimizable "physical" patch: a sticker whose pixels are trained to fool a given model."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..checks import check_float, check_int
from .base import Trigger, check_location, place


def paste_at_random(batch: torch.Tensor, patch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A copy of ``batch`` (B, C, H, W) with ``patch`` (C, s, s) pasted at a random place per image.

    All images are handled by one indexed assignment; it is differentiable with respect
    to ``patch``, which is what :meth:`PhysicalPatch.optimize` needs.
    """
    n, channels, height, width = batch.shape
    size = patch.shape[-1]
    tops = torch.randint(0, height - size + 1, (n,), generator=generator).to(batch.device)
    lefts = torch.randint(0, width - size + 1, (n,), generator=generator).to(batch.device)
    offsets = torch.arange(size, device=batch.device)
    rows = (tops[:, None] + offsets)[:, :, None]      # (B, s, 1)
    cols = (lefts[:, None] + offsets)[:, None, :]     # (B, 1, s)
    images = torch.arange(n, device=batch.device)[:, None, None]
    channels_last = batch.permute(0, 2, 3, 1)         # index (image, row, col) -> channel vector
    values = patch.permute(1, 2, 0).expand(n, size, size, channels)
    return channels_last.index_put((images, rows, cols), values).permute(0, 3, 1, 2)


class PhysicalPatch(Trigger):
    """A square patch whose pixels are optimized so that a model predicts the target class.

    Brown et al. (2017), "Adversarial Patch", showed that a small printed sticker, trained
    by gradient descent, can make a classifier see the target class wherever the sticker
    is placed in a photo. Such a patch needs no poisoning at all: it exploits the model
    as it is. In a backdoor course it is the physical-world counterpart of a trigger and
    a reminder that "a patch flips the prediction" does not prove a backdoor.

    :meth:`optimize` trains the patch the way the method works (erratum 4: the lecture
    maximizes the cross-entropy toward the target and trains on noise at one spot): it
    MINIMIZES the cross-entropy toward ``target`` on REAL images, with the patch pasted
    at a RANDOM place in each image, so it works anywhere in any picture.

    Before optimization the patch is uniform noise drawn from ``seed`` for the images'
    channel count; after it, the patch is fixed to the model's channel count.

    Args:
        size: side of the patch in pixels.
        location: where ``__call__`` pastes it by default: a named location (see
            :class:`PatchTrigger`), an ``(x, y)`` pair, or ``"random"`` (a random place
            per image).
        seed: seed of the initial patch and of the default random placements.
    """

    name = "physical"

    def __init__(self, size: int = 6, location="bottom-right", seed: int = 0):
        self.size = check_int("size", size, 1)
        self.location = "random" if location == "random" else check_location(location)
        self.seed = check_int("seed", seed, 0)
        self.patch: torch.Tensor | None = None  # (C, size, size) once optimized

    def patch_for(self, channels: int) -> torch.Tensor:
        """The (channels, size, size) patch: the optimized one, or the seeded random start."""
        if self.patch is not None:
            if self.patch.shape[0] != channels:
                raise ValueError(f"this patch was optimized for {self.patch.shape[0]}-channel images, "
                                 f"got {channels} channel(s)")
            return self.patch
        generator = torch.Generator().manual_seed(self.seed)
        return torch.rand(channels, self.size, self.size, generator=generator)

    def _check_shape(self, channels, height, width):
        super()._check_shape(channels, height, width)
        self.patch_for(channels)

    def _boxes(self, height, width):
        if self.location == "random":  # it may land anywhere, but it must fit
            place("center", self.size, height, width)
            return None
        return [(*place(self.location, self.size, height, width), self.size)]

    def __call__(self, images: torch.Tensor, location=None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Paste the patch on ``images`` at ``location`` (default: the one given at construction).

        ``location="random"`` draws one place per image from ``generator`` (default: a
        fresh generator seeded with ``seed``, so the result is reproducible).
        """
        batch = self._as_batch(images)
        location = self.location if location is None else location
        patch = self.patch_for(batch.shape[1]).to(batch)
        if location == "random":
            generator = generator or torch.Generator().manual_seed(self.seed)
            return self._finish(paste_at_random(batch, patch, generator), images)
        top, left = place(check_location(location), self.size, *batch.shape[-2:])
        out = batch.clone()
        out[:, :, top:top + self.size, left:left + self.size] = patch
        return self._finish(out, images)

    def optimize(self, model: torch.nn.Module, data, target: int, steps: int = 200,
                 batch_size: int = 64, lr: float = 0.05, seed: int = 0,
                 progress: bool = True) -> PhysicalPatch:
        """Train the patch so that ``model`` predicts ``target`` on patched real images.

        Each step samples ``batch_size`` images from ``data`` (an ImageDataset or an
        (N, C, H, W) tensor), pastes the patch at a random place in each, and takes an
        Adam step that lowers the cross-entropy toward ``target``; pixels are clipped to
        [0, 1] after every step. The model is only read: it runs in eval mode, no
        gradient reaches its parameters, and its train/eval mode is restored afterwards.
        Runs on the model's device. Returns ``self``, with :attr:`patch` set.
        """
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        images = getattr(data, "images", data)
        batch = self._as_batch(images)
        if images.ndim != 4 or len(batch) == 0:
            raise ValueError("data must be an ImageDataset or a non-empty (N, C, H, W) tensor")
        target = check_int("target", target, 0)
        steps = check_int("steps", steps, 1)
        batch_size = check_int("batch_size", batch_size, 1)
        lr = check_float("lr", lr, 0.0, 10.0, low_open=True)
        generator = torch.Generator().manual_seed(check_int("seed", seed, 0))
        params = list(model.parameters())
        device = params[0].device if params else batch.device
        patch = self.patch_for(batch.shape[1]).to(device).clone().requires_grad_(True)
        optimizer = torch.optim.Adam([patch], lr=lr)
        was_training = model.training
        model.eval()
        try:
            bar = tqdm(range(steps), desc="optimizing patch", disable=not progress)
            for _ in bar:
                chosen = torch.randint(0, len(batch), (batch_size,), generator=generator)
                clean = batch[chosen].to(device, torch.float32)
                logits = model(paste_at_random(clean, patch, generator))
                if target >= logits.shape[1]:
                    raise ValueError(f"target must be a class index in [0, {logits.shape[1] - 1}], "
                                     f"got {target!r}")
                loss = F.cross_entropy(logits, torch.full((len(clean),), target, device=device))
                patch.grad, = torch.autograd.grad(loss, [patch])
                optimizer.step()
                with torch.no_grad():
                    patch.clamp_(0, 1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
        finally:
            model.train(was_training)
        self.patch = patch.detach().cpu()
        return self
