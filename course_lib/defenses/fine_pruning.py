"""Fine-Pruning: switch off the channels clean data never uses, then fine-tune.

Liu, Dolan-Gavitt & Garg (2018), "Fine-Pruning: Defending Against Backdooring Attacks
on Deep Neural Networks" (RAID). Idea: a backdoor needs neurons that fire on the trigger;
on clean images those neurons are mostly idle, because clean images do not carry the
trigger. So:

1. run clean images through the model and record the mean activation of every channel
   of the **last convolutional layer** (Liu et al. found the later layers hold the most
   specialized, backdoor-carrying features);
2. prune whole channels in increasing order of that mean (here: set the model's
   ``channel_mask`` entries to 0) until clean accuracy on held-out clean data drops by
   more than ``max_accuracy_drop``;
3. fine-tune the pruned model on clean data: this repairs clean accuracy and weakens
   whatever part of the backdoor the pruning missed (pruning alone can be evaded by an
   attacker who hides the backdoor in busy channels; fine-tuning alone often is not
   enough either; together they work better).

Erratum (docs/DESIGN.md, 5): the lecture's sketch ranks flattened activation *positions* of
every Conv2d and Linear layer, on single images, and zeroes weight rows by those
positions, which do not correspond to the neurons it measured. Liu et al. prune whole
channels of the last convolutional layer, ranked by mean activation on clean data.

Nothing here modifies the model given: pruning and fine-tuning work on copies.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..cache import storable
from ..checks import check_dataset, check_float, check_indices, check_int, check_model
from ..data import ImageDataset
from ..metrics import attack_success_rate, clean_accuracy
from ..train import inference_batch, model_device, train
from .base import Mitigation

PAPER = "Liu, Dolan-Gavitt & Garg 2018"


@torch.no_grad()
def channel_activations(model, images: torch.Tensor, *, batch_size: int | None = None) -> torch.Tensor:
    """Mean activation of each channel of the last conv layer over ``images``, shape (C,).

    Read from the input of ``model.channel_mask``, which sits right after that layer.
    """
    check_model(model, "channel_mask")
    sums = []

    def record(_module, inputs):
        sums.append(inputs[0].float().mean(dim=(2, 3)).sum(0).cpu())

    handle = model.channel_mask.register_forward_pre_hook(record)
    device, was_training = model_device(model), model.training
    batch_size = inference_batch(device, batch_size)
    model.eval()
    try:
        for start in range(0, len(images), batch_size):
            model(images[start:start + batch_size].to(device))
    finally:
        handle.remove()
        model.train(was_training)
    return torch.stack(sums).sum(0) / len(images)


def pruning_order(model, clean_data: ImageDataset) -> torch.Tensor:
    """Channels of the last conv layer, least active on ``clean_data`` first."""
    check_dataset("clean_data", clean_data)
    return channel_activations(model, clean_data.images).argsort()


def prune(model, channels) -> torch.nn.Module:
    """A copy of ``model`` with the given last-conv-layer channels switched off."""
    check_model(model, "channel_mask")
    off = check_indices("channels", channels, len(model.channel_mask.mask))
    pruned = copy.deepcopy(model)
    pruned.channel_mask.mask[off.to(pruned.channel_mask.mask.device)] = 0.0
    return pruned


@storable
@dataclass
class PruningCurve:
    """Clean accuracy and ASR after pruning each fraction of the channels (for the plot)."""

    fractions: list[float]
    clean_acc: list[float]
    asr: list[float]


def pruning_curve(model, clean_data: ImageDataset, eval_data: ImageDataset, trigger, target: int, *,
                  points: int = 17) -> PruningCurve:
    """CA and ASR on ``eval_data`` as channels are pruned in order (ranked on ``clean_data``).

    This needs the trigger, which a defender does not have: it is for teaching, to show
    *why* pruning dormant channels removes the backdoor before it hurts clean accuracy.
    """
    check_dataset("eval_data", eval_data)
    check_int("points", points, 2)
    order = pruning_order(model, clean_data)
    fractions = np.linspace(0.0, 1.0 - 1.0 / len(order), points).tolist()
    curve = PruningCurve([], [], [])
    for fraction in fractions:
        pruned = prune(model, order[:round(fraction * len(order))])
        curve.fractions.append(fraction)
        curve.clean_acc.append(clean_accuracy(pruned, eval_data))
        curve.asr.append(attack_success_rate(pruned, eval_data, trigger, target))
    return curve


@storable
@dataclass
class FinePruningResult(Mitigation):
    """The mitigated copy (a :class:`~.base.Mitigation`) and what was done: ``pruned``
    channels, clean accuracy on the defender's validation images before pruning, after
    pruning (the stopping rule's measure) and after fine-tuning."""

    pruned: torch.Tensor | None = None
    fraction: float = 0.0
    val_acc_before: float = 0.0
    val_acc_pruned: float = 0.0
    val_acc_after: float = 0.0
    tuned_images: int = 0


def fine_prune(model, clean_data: ImageDataset, *, max_accuracy_drop: float = 0.10,
               val_fraction: float = 0.2, epochs: int = 5, lr: float = 0.05, seed: int = 0,
               device=None, progress: bool = True) -> FinePruningResult:
    """Prune (Liu et al.'s stopping rule) and fine-tune a copy of ``model`` on ``clean_data``.

    ``val_fraction`` of ``clean_data`` is held out to watch clean accuracy: channels are
    pruned, least active first, as long as that accuracy stays within ``max_accuracy_drop``
    of the unpruned model. The copy is then fine-tuned on the rest of ``clean_data`` for
    ``epochs`` with peak learning rate ``lr`` (the pruned channels stay off: the mask is a
    buffer, not a parameter).

    Liu et al. stop at a 4% drop. On the kit's small CNN the backdoor also lives in
    channels that clean images use, so a 4-5% budget leaves much of it in place after
    fine-tuning; the default allows 10 points. What that costs in clean accuracy, and how
    little of it fine-tuning on the defender's few images wins back, is measured by notebook
    6 and ``python -m course_lib bench defenses`` (``val_acc_*`` and ``tuned_images`` say it).
    """
    check_model(model, "channel_mask")
    check_dataset("clean_data", clean_data, min_size=2)
    check_float("max_accuracy_drop", max_accuracy_drop, 0.0, 1.0)
    check_float("val_fraction", val_fraction, 0.0, 1.0, low_open=True, high_open=True)
    check_int("epochs", epochs)
    check_float("lr", lr, 0.0, float("inf"), low_open=True)
    start = time.perf_counter()
    n_val = min(len(clean_data) - 1, max(1, round(val_fraction * len(clean_data))))
    val, tune = clean_data.split(n_val, seed=seed)
    order = pruning_order(model, tune)
    before = clean_accuracy(model, val)
    count, pruned_acc = _prune_count(model, order, val, before - max_accuracy_drop)
    mitigated = prune(model, order[:count])
    train(mitigated, tune, epochs=epochs, lr=lr, seed=seed,
          device=device if device is not None else model_device(model), progress=progress)
    return FinePruningResult(PAPER, mitigated, time.perf_counter() - start, order[:count].sort().values,
                             count / len(order), before, pruned_acc, clean_accuracy(mitigated, val), len(tune))


def _prune_count(model, order, val, floor: float) -> tuple[int, float]:
    """The most channels (taken in ``order``) that keep validation accuracy at or above ``floor``."""
    probe = prune(model, [])
    mask = probe.channel_mask.mask
    best, best_acc = 0, clean_accuracy(probe, val)
    step = max(1, len(order) // 64)  # one channel at a time for small layers, coarser for wide ones
    for count in range(step, len(order), step):
        mask[order[count - step:count].to(mask.device)] = 0.0
        acc = clean_accuracy(probe, val)
        if acc < floor:
            break
        best, best_acc = count, acc
    return best, best_acc
