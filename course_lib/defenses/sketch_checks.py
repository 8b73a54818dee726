"""Checks for notebook 6's exercises: the student repairs the lecture's defense sketches.

One repair task per erratum of the lecture's defense code (docs/DESIGN.md), each registered
with :func:`course_lib.exercises.exercise` and checked by :func:`course_lib.exercises.check`,
which prints a pass or what is still wrong, never the answer:

- ``06-ac-rule`` (erratum 6): Activation Clustering must not flag the smaller cluster of a
  class whose 2-means split is balanced (Chen et al.'s relative-size analysis);
- ``06-nc-mad`` (erratum 3): Neural Cleanse's outlier test: the anomaly index with the MAD's
  consistency constant 1.4826, on the logarithms of the mask norms, small side only;
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
from .neural_cleanse import flag_small_outliers

SIZE_THRESHOLD = 0.35  # Chen et al.: the smaller cluster holds at most 35% of its class


@exercise("06-ac-rule", "repair the lecture's Activation Clustering rule so that a balanced split flags nothing")
def _ac_rule(suspicious):
    """Erratum 6: every class has a smaller cluster; only a lopsided split says "poisoned"."""
    for poisoned_share in (0.5, 0.4, 0.35, 0.1, 0.02):
        n_small = round(200 * poisoned_share)
        clusters = np.array([0] * (200 - n_small) + [1] * n_small)
        np.random.default_rng(0).shuffle(clusters)
        got = sorted(int(i) for i in np.asarray(suspicious(clusters.copy())).flatten())
        want = sorted(np.flatnonzero(clusters == 1).tolist()) if poisoned_share <= SIZE_THRESHOLD else []
        if got == want:
            continue
        if not want:
            return (f"on a class split {200 - n_small}/{n_small} it flags samples: a split that balanced "
                    "is how a clean class looks")
        if len(got) == len(want):
            return "it flags as many samples as the smaller cluster holds, but not the smaller cluster's own"
        return f"on a class split {200 - n_small}/{n_small} it should flag the smaller cluster, got {len(got)} samples"
    return None


@exercise("06-nc-mad", "repair the lecture's outlier test so that it flags the labels Neural Cleanse flags")
def _nc_mad(flag, norms=None):
    """Erratum 3: the anomaly index needs the consistency constant 1.4826, and the kit runs it
    on the logarithms of the mask norms (small outliers only)."""
    sets = [np.array([14, 29, 49, 61, 80, 90, 129, 143, 158, 255.0]),  # the log and the constant both matter
            np.array([9, 20, 30, 35, 40, 45, 50, 60, 80, 120.0]),
            np.array([300, 30, 35, 40, 45, 50, 55, 60, 70, 90.0])]   # a *large* outlier is no backdoor
    if norms is not None:
        sets.append(np.asarray(torch.as_tensor(norms, dtype=torch.float64)))
    for values in sets:
        got = sorted(int(i) for i in flag(values.copy()))
        want = flag_small_outliers(np.log(values))
        if got == want:
            continue
        if sorted(flag_small_outliers(values)) == got:
            return "it runs the test on the mask norms themselves; the kit tests their logarithms (notebook 6, section 3)"
        log, median = np.log(values), np.median(np.log(values))
        if got == [i for i in range(len(values)) if median - log[i] > 2 * np.median(abs(log - median))]:
            return "it compares with 2 MADs: a MAD is not a standard deviation until multiplied by 1.4826"
        if any(values[i] > np.median(values) for i in got):
            return "it flags a label whose mask is larger than the median: only small masks betray a backdoor"
        return f"on mask norms {values.round(1).tolist()} it flags {got}"
    return None


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
                f"0-15, not the 64 of section 4's layer), got {len(got)} values up to "
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
