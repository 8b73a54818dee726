"""Checks for notebook 6's exercises: the student repairs the lecture's defense sketches.

Repair tasks for errata of the lecture's defense code (docs/DESIGN.md), each registered
with :func:`course_lib.exercises.exercise` and checked by :func:`course_lib.exercises.check`,
which prints a pass or what is still wrong, never the answer:

- ``06-fp-rank`` (erratum 5): Fine-Pruning ranks whole channels of the last convolutional
  layer by their mean activation on clean data, not flattened positions;
- ``06-dp-clip`` (erratum 7): DP-SGD clips each example's gradient and adds noise of
  standard deviation sigma * C to their sum, not to the batch's mean gradient.

Each check runs the student's function on small inputs built here (or passed by the check
cell), where the lecture's version and the repaired one give different answers.
"""
from __future__ import annotations

import numpy as np
import torch

from ..exercises import exercise

@exercise("06-fp-rank", "repair the lecture's Fine-Pruning ranking: whole channels, by mean activation on clean data")
def _fp_rank(rank_channels):
    """Erratum 5: the lecture ranks flattened positions of single images; Liu et al. rank channels."""
    gen = torch.Generator().manual_seed(0)
    levels = torch.randperm(16, generator=gen).float()           # each channel's typical activation
    activations = torch.rand(64, 16, 6, 6, generator=gen) * levels.view(1, -1, 1, 1)
    activations[0, levels.argmin(), 0, 0] = 100.0               # one image lights up a dormant channel
    before = activations.clone()
    got = torch.as_tensor(np.asarray(rank_channels(activations))).long().flatten()
    if not torch.equal(activations, before):
        return "it changed the activations it was given"
    if len(got) != 16 or got.min() < 0 or got.max() >= 16:
        return (f"it should return the channel indices in order (the check's test tensor has 16 channels, "
                f"0-15, not the 64 of section 3's layer), got {len(got)} values up to "
                f"{int(got.max()) if len(got) else 'none'}: positions (channel x row x column) are not channels")
    if not torch.equal(got, activations.mean(dim=(0, 2, 3)).argsort()):
        return "the order is not the channels' mean activation over all images and positions, least active first"
    return None


@exercise("06-dp-clip", "repair the lecture's differential privacy: clip each example's gradient, then add noise")
def _dp_clip(private_gradient):
    """Erratum 7: clipping the batch bounds the batch, not one example, and noise on the mean is B times too big."""
    gen = torch.Generator().manual_seed(0)
    grads = torch.randn(32, 50, generator=gen) * 0.1
    grads[0] *= 1000                                               # one example dominates the batch
    clipped = grads * (1.0 / grads.norm(dim=1, keepdim=True)).clamp(max=1.0)
    got = torch.as_tensor(private_gradient(grads.clone(), 1.0, 0.0, torch.Generator().manual_seed(1)))
    if got.shape != (50,):
        return f"it should return one averaged gradient of shape (50,), got {tuple(got.shape)}"
    if not torch.allclose(got.float(), clipped.mean(0), atol=1e-5):
        return ("without noise it should return the mean of the per-example gradients, each clipped to norm "
                "max_grad_norm; one example still dominates it")
    batch = torch.zeros(256, 4000)
    noisy = torch.as_tensor(private_gradient(batch, 1.0, 1.0, torch.Generator().manual_seed(2))).float()
    ratio = noisy.std().item() / (1.0 / 256)
    if not 0.9 < ratio < 1.1:
        return (f"the noise on the averaged gradient should have standard deviation sigma * C / batch size; "
                f"yours is {ratio:.0f} times that")
    return None
