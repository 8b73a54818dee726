"""Neural Cleanse: reverse-engineer a trigger for every label and look for a too-small one.

Wang et al. (2019), "Neural Cleanse: Identifying and Mitigating Backdoor Attacks in Neural
Networks" (IEEE S&P). Idea: a backdoor is a shortcut. If a small patch sends *any* image
to label t, then the smallest change that turns clean images into t is much smaller for
t than for the other labels, where the change has to redraw the object.

For every label t the method searches a mask m (H, W, values in [0, 1]) and a pattern p
(C, H, W) such that the stamped images ``(1 - m) * x + m * p`` of *clean* images x are
classified as t, while keeping the mask small:

    minimize  CE(model((1 - m) x + m p), t)  +  cost_t * |m|_1

The weight ``cost_t`` is adapted during the search (Wang et al., Sec. IV-B): raised when
the stamp already fools the model on at least ``success_threshold`` of the images (now
shrink the mask), lowered when it does not (first make it work). The smallest mask that
succeeded is kept. A label is flagged when its mask's L1 norm is a small outlier by the
MAD test: anomaly index ``|x - median| / (1.4826 * MAD) > 2`` on the low side.

Errata (docs/DESIGN.md, 3): the lecture's sketch *maximizes* the cross-entropy (a sign error),
optimizes a 5x5 patch fixed in one corner on uniform noise instead of a full-image mask
on clean images, and runs the MAD test on losses instead of mask norms.

Here all labels are optimized together in one batch: masks (K, 1, H, W) and patterns
(K, C, H, W), the same clean images repeated for each label. On a CPU that is several
times faster than K separate searches. Mask and pattern live in tanh space so that
Adam's unconstrained steps always map to valid values in [0, 1].

Mitigation (:func:`unlearn`, Wang et al. Sec. VI-C): fine-tune a copy of the model on
clean images, some of them stamped with the reversed trigger but keeping their *correct*
labels, so the model learns to ignore the trigger.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data import ImageDataset
from ..train import model_device, train
from ._checks import check_budget, check_dataset, check_int, check_model, check_number

MAD_CONSISTENCY = 1.4826  # makes the MAD estimate the standard deviation of normal data


def anomaly_index(values) -> torch.Tensor:
    """``|x - median| / (1.4826 * MAD)`` of each value (Wang et al. 2019, Sec. IV-C).

    MAD is the median absolute deviation from the median. Unlike the mean and standard
    deviation, median and MAD barely move when one value is an outlier, so the outlier
    stands out. All indices are 0 when the MAD is 0 and all values are equal; an index is
    inf for a value that differs from the others when the MAD is 0.
    """
    x = torch.as_tensor(values, dtype=torch.float64).flatten()
    if len(x) < 3:
        raise ValueError(f"values must hold at least 3 numbers for a median test, got {len(x)}")
    deviation = (x - _median(x)).abs()
    mad = _median(deviation)
    if mad == 0:
        return torch.where(deviation == 0, 0.0, float("inf")).to(torch.float64)
    return deviation / (MAD_CONSISTENCY * mad)


def _median(x: torch.Tensor) -> torch.Tensor:
    """The usual median: the mean of the two middle values for an even count (as numpy does;
    ``torch.median`` returns the lower one)."""
    ordered = x.sort().values
    return ordered[[(len(x) - 1) // 2, len(x) // 2]].mean()


def flag_small_outliers(values, threshold: float = 2.0) -> list[int]:
    """Positions whose value is below the median with an anomaly index above ``threshold``."""
    check_number("threshold", threshold, 0.0, float("inf"), low_open=True)
    x = torch.as_tensor(values, dtype=torch.float64).flatten()
    index = anomaly_index(x)
    below = x < _median(x)
    return [i for i in range(len(x)) if below[i] and index[i] > threshold]


@dataclass
class NeuralCleanseResult:
    """Reversed triggers and the verdict.

    ``masks`` (K, 1, H, W) and ``patterns`` (K, C, H, W) in [0, 1]: the smallest successful
    stamp found for each label; ``norms`` (K,): their L1 norms; ``success`` (K,): the share
    of clean images the stamp sends to the label; ``anomaly_index`` (K,); ``flagged``: the
    labels judged backdoored; ``seconds``: wall time of the search.
    """

    masks: torch.Tensor
    patterns: torch.Tensor
    norms: torch.Tensor
    success: torch.Tensor
    anomaly_index: torch.Tensor
    flagged: list[int]
    threshold: float
    seconds: float

    def stamp(self, images: torch.Tensor, label: int) -> torch.Tensor:
        """Apply the reversed trigger of ``label``: ``(1 - m) * x + m * p`` (new tensor)."""
        check_int("label", label, 0, len(self.masks) - 1)
        return (1 - self.masks[label]) * images + self.masks[label] * self.patterns[label]


def neural_cleanse(model, clean_data: ImageDataset, *, n_images: int = 1000, steps: int = 400,
                   batch_size: int = 24, lr: float = 0.1, init_cost: float = 1e-3,
                   success_threshold: float = 0.99, patience: int = 3, round_steps: int = 5,
                   threshold: float = 2.0, seed: int = 0, progress: bool = True) -> NeuralCleanseResult:
    """Reverse-engineer a trigger for every label of ``model`` and flag the backdoored ones.

    ``clean_data``: images the defender trusts (a held-out set); ``n_images`` of them are
    drawn with ``seed`` and ``batch_size`` of those are stamped per label and step.
    The cost schedule looks at the success rate over rounds of ``round_steps`` steps:
    ``patience`` rounds above ``success_threshold`` multiply the label's cost by 1.5,
    ``patience`` rounds below divide it by 1.5 ** 1.5 (Wang et al.'s constants).
    The model is not modified (the search runs on a frozen copy, on the model's device).
    """
    check_model(model, "forward")
    check_dataset("clean_data", clean_data)
    if clean_data.num_classes < 3:
        raise ValueError(f"clean_data must have at least 3 classes for the median test over labels, "
                         f"got {clean_data.num_classes}")
    check_budget("n_images", n_images, clean_data, "clean_data")
    check_int("steps", steps)
    check_int("batch_size", batch_size)
    check_int("patience", patience)
    check_int("round_steps", round_steps)
    check_number("lr", lr, 0.0, float("inf"), low_open=True)
    check_number("init_cost", init_cost, 0.0, float("inf"), low_open=True)
    check_number("success_threshold", success_threshold, 0.0, 1.0, low_open=True)
    check_number("threshold", threshold, 0.0, float("inf"), low_open=True)
    start = time.perf_counter()
    frozen = copy.deepcopy(model).eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    images = clean_data.images[torch.randperm(len(clean_data), generator=gen)[:n_images]]
    masks, patterns, success = _search(frozen, images, clean_data.num_classes, steps=steps,
                                       batch_size=batch_size, lr=lr, init_cost=init_cost,
                                       success_threshold=success_threshold, patience=patience,
                                       round_steps=round_steps, gen=gen, progress=progress)
    norms = masks.flatten(1).sum(1)
    return NeuralCleanseResult(masks, patterns, norms, success, anomaly_index(norms).float(),
                               flag_small_outliers(norms, threshold), threshold, time.perf_counter() - start)


def _search(model, images, num_classes, *, steps, batch_size, lr, init_cost, success_threshold,
            patience, round_steps, gen, progress):
    """The batched optimization of all K masks and patterns; returns the best ones found."""
    device = model_device(model)
    k, (c, h, w) = num_classes, images.shape[1:]
    mask_raw = torch.zeros(k, 1, h, w, device=device, requires_grad=True)     # mask 0.5 everywhere
    pattern_raw = torch.zeros(k, c, h, w, device=device, requires_grad=True)  # pattern 0.5 everywhere
    optimizer = torch.optim.Adam([mask_raw, pattern_raw], lr=lr, betas=(0.5, 0.9))
    targets = torch.arange(k, device=device).repeat_interleave(batch_size)
    schedule = _CostSchedule(k, init_cost, success_threshold, patience, device)
    best_norm = torch.full((k,), float("inf"), device=device)
    best_mask, best_pattern = torch.zeros_like(mask_raw), torch.zeros_like(pattern_raw)
    hits = torch.zeros(k, device=device)
    for step in tqdm(range(steps), desc="neural cleanse", disable=not progress, leave=False):
        x = images[torch.randint(len(images), (batch_size,), generator=gen)].to(device)
        mask, pattern = _squash(mask_raw), _squash(pattern_raw)
        stamped = (1 - mask.unsqueeze(1)) * x + (mask * pattern).unsqueeze(1)     # (K, B, C, H, W)
        logits = model(stamped.flatten(0, 1))
        ce = F.cross_entropy(logits, targets, reduction="none").view(k, batch_size).mean(1)
        norm = mask.flatten(1).sum(1)
        loss = (ce + schedule.cost * norm).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        hits += (logits.argmax(1) == targets).view(k, batch_size).float().mean(1).detach()
        if (step + 1) % round_steps == 0:
            rate = hits / round_steps
            improved = (rate >= success_threshold) & (norm.detach() < best_norm)
            best_norm = torch.where(improved, norm.detach(), best_norm)
            best_mask[improved], best_pattern[improved] = mask.detach()[improved], pattern.detach()[improved]
            schedule.update(rate)
            hits.zero_()
    never = best_norm.isinf()  # labels that never reached the threshold: report the last try
    best_mask[never], best_pattern[never] = _squash(mask_raw).detach()[never], _squash(pattern_raw).detach()[never]
    success = _success_rate(model, images, best_mask, best_pattern)
    return best_mask.cpu(), best_pattern.cpu(), success.cpu()


def _squash(raw: torch.Tensor) -> torch.Tensor:
    """Map unconstrained values to [0, 1] with (tanh + 1) / 2, as Wang et al. do."""
    return (torch.tanh(raw) + 1) / 2


class _CostSchedule:
    """Wang et al.'s adaptive weight of the mask-size penalty, one weight per label."""

    UP, DOWN = 1.5, 1.5 ** 1.5

    def __init__(self, k, init_cost, success_threshold, patience, device):
        self.cost = torch.full((k,), init_cost, device=device)
        self.threshold, self.patience = success_threshold, patience
        self.above = torch.zeros(k, dtype=torch.long, device=device)
        self.below = torch.zeros(k, dtype=torch.long, device=device)

    def update(self, success_rate: torch.Tensor) -> None:
        ok = success_rate >= self.threshold
        self.above = torch.where(ok, self.above + 1, 0)
        self.below = torch.where(ok, 0, self.below + 1)
        raise_cost, lower_cost = self.above >= self.patience, self.below >= self.patience
        self.cost = torch.where(raise_cost, self.cost * self.UP, self.cost)
        self.cost = torch.where(lower_cost, self.cost / self.DOWN, self.cost)
        self.above[raise_cost], self.below[lower_cost] = 0, 0


@torch.no_grad()
def _success_rate(model, images, masks, patterns, batch_size: int = 512) -> torch.Tensor:
    """Share of ``images`` that each label's stamp sends to that label, (K,)."""
    device = model_device(model)
    rates = []
    for label in range(len(masks)):
        hits = 0
        for start in range(0, len(images), batch_size):
            x = images[start:start + batch_size].to(device)
            stamped = (1 - masks[label]) * x + masks[label] * patterns[label]
            hits += (model(stamped).argmax(1) == label).sum().item()
        rates.append(hits / len(images))
    return torch.tensor(rates)


def unlearn(model, result: NeuralCleanseResult, clean_data: ImageDataset, *, labels=None,
            stamp_fraction: float = 0.2, epochs: int = 5, lr: float = 0.02, seed: int = 0,
            device=None, progress: bool = True):
    """A copy of ``model`` fine-tuned to ignore the reversed triggers (Wang et al. Sec. VI-C).

    ``stamp_fraction`` of ``clean_data`` gets the reversed trigger of one of ``labels``
    (default: the flagged labels) and keeps its true label; the copy is then trained on
    the whole set for ``epochs`` with peak learning rate ``lr``. Too little training
    (one epoch at 0.01, as for Wang et al.'s larger sets) removes the backdoor but also
    much of the target class: the model first learns "avoid the target", and needs a few
    epochs to relearn the class from its real features. The model and the data given are
    not modified.
    """
    check_model(model, "forward")
    check_dataset("clean_data", clean_data)
    labels = result.flagged if labels is None else list(labels)
    if not labels:
        raise ValueError("labels is empty and result flagged no label: there is no trigger to unlearn")
    for label in labels:
        check_int("labels", label, 0, len(result.masks) - 1)
    check_number("stamp_fraction", stamp_fraction, 0.0, 1.0, low_open=True)
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(clean_data), generator=gen)[:max(1, round(stamp_fraction * len(clean_data)))]
    images = clean_data.images.clone()
    for i, label in enumerate(labels):
        part = chosen[i::len(labels)]
        images[part] = result.stamp(clean_data.images[part], label)
    mitigated = copy.deepcopy(model)
    train(mitigated, clean_data.replace(images=images), epochs=epochs, lr=lr, seed=seed,
          device=device if device is not None else model_device(model), progress=progress)
    return mitigated


def plot_reversed_triggers(result: NeuralCleanseResult, classes=None):
    """Masks (top row) and masked patterns m * p (bottom row) of every label, with norms."""
    k = len(result.masks)
    fig, axes = plt.subplots(2, k, figsize=(1.3 * k, 3.2), squeeze=False)
    for label in range(k):
        name = classes[label] if classes is not None else str(label)
        flag = " (flagged)" if label in result.flagged else ""
        axes[0, label].imshow(result.masks[label, 0].numpy(), cmap="gray", vmin=0, vmax=1)
        axes[0, label].set_title(f"{name}{flag}\nL1={result.norms[label]:.0f} "
                                 f"a={result.anomaly_index[label]:.1f}", fontsize=7)
        stamp = (result.masks[label] * result.patterns[label]).permute(1, 2, 0).squeeze(-1)
        axes[1, label].imshow(stamp.numpy(), cmap="gray" if stamp.ndim == 2 else None, vmin=0, vmax=1)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle("Neural Cleanse: reversed masks (top) and stamps m*p (bottom)", fontsize=9)
    fig.tight_layout()
    return fig
