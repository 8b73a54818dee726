"""Backdoor poisoning attacks: build a poisoned training set from a clean one and a trigger.

- :func:`badnets`: the dirty-label backdoor of Gu, Dolan-Gavitt & Garg (2017), "BadNets".
  Stamp the trigger on some images and relabel them as the target class.
- :func:`label_consistent`: the clean-label backdoor of Turner, Tsipras & Madry (2019),
  "Label-Consistent Backdoor Attacks". Only *target-class* images are poisoned and their
  labels stay correct, so a human checking the labels finds nothing wrong.
- :func:`lecture_clean_label`: the lecture's "clean-label" recipe, kept for comparison.

Every attack returns a :class:`PoisonResult`: a new dataset plus the indices it changed
(the ground truth that detectors are scored against). The input dataset is never
modified, and all randomness comes from the ``seed`` argument.

Errata (see docs/DESIGN.md): the lecture's BadNets demo may pick images that already belong
to the target class, where relabeling does nothing; :func:`badnets` picks only
non-target images. The lecture's reading list calls Liu et al. (2018), "Trojaning Attack
on Neural Networks", a clean-label attack: it is not (it retrains the model on trojaned
inputs *with the target label*). The clean-label references are Shafahi et al. (2018),
"Poison Frogs!", and Turner et al. (2019).
"""
from __future__ import annotations

import copy
import math
import numbers
from dataclasses import dataclass
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .data import ImageDataset
from .poisoning import _check_class_index, _check_rate
from .train import pick_device


@dataclass(frozen=True)
class PoisonResult:
    """A poisoned training set and what was done to it.

    ``dataset``: the full training set, poisoned images included;
    ``indices``: sorted int64 indices of the poisoned images in ``dataset``;
    ``target``: the class the trigger is meant to send inputs to;
    ``trigger``: the trigger that was stamped (apply it to test images to measure ASR).
    """

    dataset: ImageDataset
    indices: torch.Tensor
    target: int
    trigger: Callable[[torch.Tensor], torch.Tensor]


def badnets(data: ImageDataset, *, trigger, target: int, rate: float, seed: int = 0) -> PoisonResult:
    """Dirty-label backdoor (Gu et al. 2017): trigger + relabel ``round(rate * len(data))`` images.

    ``rate`` in (0, 1] is the poisoned fraction of the *whole* training set. The images
    are drawn only from classes other than ``target``: relabeling a target-class image as
    the target changes nothing, so the lecture's draw relabels fewer images than the rate
    says (erratum 9).
    The trigger is applied in one batched call.
    """
    _check_attack_args(data, trigger, target, rate)
    candidates = (data.labels != target).nonzero().flatten()
    count = round(rate * len(data))
    if count > len(candidates):
        raise ValueError(f"rate={rate} asks for {count} poisoned images, but only {len(candidates)} "
                         f"images are outside the target class {target}; lower rate")
    indices = _choose(candidates, count, seed)
    images, labels = data.images.clone(), data.labels.clone()
    images[indices] = trigger(data.images[indices])
    labels[indices] = target
    return PoisonResult(data.replace(images=images, labels=labels), indices, target, trigger)


def label_consistent(data: ImageDataset, *, trigger, target: int, rate: float, surrogate: nn.Module,
                     eps: float = 16 / 255, steps: int = 10, step_size: float | None = None,
                     seed: int = 0, device=None, batch_size: int = 256,
                     progress: bool = True) -> PoisonResult:
    """Clean-label backdoor of Turner et al. (2019): hard target-class images + trigger, labels kept.

    Why it works: a correctly labeled target-class image is normally learned from its
    content, so a trigger on it teaches nothing. Turner et al. first make the image *hard
    to learn*: a PGD attack (Madry et al. 2018) on a separately trained ``surrogate``
    model pushes it away from its true class inside an L-inf ball of radius ``eps``
    (pixel space, result clamped to [0, 1]). The victim then finds the trigger the easiest
    feature explaining the label, and at test time the trigger sends any input to ``target``.

    ``rate`` in (0, 1] is the fraction of the *target class* that is poisoned.
    ``eps`` defaults to 16/255: big enough to make images hard to learn, small enough to
    stay close to the original. ``step_size`` defaults to ``2.5 * eps / steps`` so that
    the steps can cross the whole ball. The surrogate is not modified: the attack runs on
    a private copy on ``device`` (default: :func:`~course_lib.train.pick_device`).
    """
    _check_attack_args(data, trigger, target, rate)
    _check_model("surrogate", surrogate)
    _check_budget(eps, steps, step_size, batch_size)
    candidates = (data.labels == target).nonzero().flatten()
    if len(candidates) == 0:
        raise ValueError(f"target class {target} has no images in data: nothing to poison")
    indices = _choose(candidates, round(rate * len(candidates)), seed)
    hard = _signed_gradient_steps(
        surrogate, data.images[indices], data.labels[indices], eps=eps, steps=steps,
        step_size=2.5 * eps / steps if step_size is None else step_size, toward=False,
        random_start_seed=seed, device=device, batch_size=batch_size, progress=progress)
    images = data.images.clone()
    images[indices] = trigger(hard)
    return PoisonResult(data.replace(images=images), indices, target, trigger)


def lecture_clean_label(data: ImageDataset, *, model: nn.Module, trigger, base_class: int,
                        target: int, rate: float, eps: float = 0.1, seed: int = 0,
                        device=None, batch_size: int = 256, progress: bool = True) -> PoisonResult:
    """The lecture's clean-label recipe, kept so students can compare it with :func:`label_consistent`.

    Take a fraction ``rate`` of the ``base_class`` images, move each one FGSM step of
    size ``eps`` *toward* the ``target`` class on ``model``, stamp the trigger and keep
    the base label. (The lecture's code adds the gradient sign of the loss toward the
    target, which moves *away* from it, and clamps to [-1, 1]; here the step goes toward
    the target and pixels are clamped to [0, 1].)

    How it differs from Turner et al. (erratum 2): the poisoned images keep the *base*
    label, so the only association the trigger can learn is "trigger -> base class", not
    "trigger -> target". It needs the attacked model itself, and takes one step instead
    of PGD. Measure the attack success rate toward both ``target`` and ``base_class`` to
    see which way the trigger actually points. ``model`` is not modified.
    """
    _check_attack_args(data, trigger, target, rate)
    _check_class_index("base_class", base_class, data.num_classes)
    if base_class == target:
        raise ValueError(f"base_class and target must be different classes, got {target} for both")
    _check_model("model", model)
    _check_budget(eps, 1, None, batch_size)
    candidates = (data.labels == base_class).nonzero().flatten()
    if len(candidates) == 0:
        raise ValueError(f"base_class {base_class} has no images in data: nothing to poison")
    indices = _choose(candidates, round(rate * len(candidates)), seed)
    toward_target = torch.full((len(indices),), target, dtype=torch.int64)
    moved = _signed_gradient_steps(model, data.images[indices], toward_target, eps=eps, steps=1,
                                  step_size=eps, toward=True, device=device,
                                  batch_size=batch_size, progress=progress)
    images = data.images.clone()
    images[indices] = trigger(moved)
    return PoisonResult(data.replace(images=images), indices, target, trigger)


def _signed_gradient_steps(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *,
                          eps: float, steps: int, step_size: float, toward: bool,
                          random_start_seed: int | None = None, device=None,
                          batch_size: int = 256, progress: bool = True) -> torch.Tensor:
    """Projected signed-gradient steps on the cross-entropy (PGD; one step = FGSM).

    Each step moves every pixel by ``step_size`` in the direction that lowers
    (``toward=True``) or raises (``toward=False``) the loss of ``labels``, then projects
    back into the L-inf ball of radius ``eps`` around ``images`` and into [0, 1].
    With ``random_start_seed``, the start is a uniform random point of the ball (Madry et
    al. 2018). Works on a frozen copy of ``model``; returns new CPU tensors.
    """
    device = pick_device(device)
    frozen = copy.deepcopy(model).to(device).eval().requires_grad_(False)
    gen = None if random_start_seed is None else torch.Generator().manual_seed(random_start_seed)
    sign = -1.0 if toward else 1.0
    out = []
    for start in tqdm(range(0, len(images), batch_size), desc="perturb", disable=not progress, leave=False):
        clean = images[start:start + batch_size].to(device)
        y = labels[start:start + batch_size].to(device)
        x = clean
        if gen is not None:
            noise = torch.empty(clean.shape).uniform_(-eps, eps, generator=gen)
            x = (clean + noise.to(device)).clamp(0, 1)
        for _ in range(steps):
            x = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(F.cross_entropy(frozen(x), y), x)
            x = x.detach() + sign * step_size * grad.sign()
            x = (clean + (x - clean).clamp(-eps, eps)).clamp(0, 1)
        out.append(x.detach().cpu())
    return torch.cat(out)


def _choose(candidates: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """``count`` distinct random entries of ``candidates``, sorted."""
    if count == 0:
        raise ValueError(f"rate is too small: it poisons 0 of {len(candidates)} candidate images")
    gen = torch.Generator().manual_seed(seed)
    return candidates[torch.randperm(len(candidates), generator=gen)[:count]].sort().values


def _check_attack_args(data, trigger, target, rate) -> None:
    if not isinstance(data, ImageDataset):
        raise TypeError(f"data must be a course_lib.data.ImageDataset, got {type(data).__name__}")
    if not callable(trigger):
        raise TypeError(f"trigger must be callable (a course_lib.triggers.Trigger), got {type(trigger).__name__}")
    _check_class_index("target", target, data.num_classes)
    _check_rate(rate, allow_zero=False)


def _check_model(name: str, model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module, got {type(model).__name__}")


def _check_budget(eps, steps, step_size, batch_size) -> None:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not 0 < eps <= 1:
        raise ValueError(f"eps must be a number in (0, 1] (pixel space), got {eps!r}")
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if step_size is not None and (not isinstance(step_size, numbers.Real) or not math.isfinite(step_size)
                                  or step_size <= 0):
        raise ValueError(f"step_size must be a positive number or None, got {step_size!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
