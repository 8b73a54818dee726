"""Figures for the attack side of the lecture: triggers, poisoned samples, training curves.

Every function returns a matplotlib ``Figure`` (it never calls ``plt.show``), so the same
figure is shown inline in a notebook or saved as a PNG by the command line.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import torch

from .train import History


def _show(ax, image: torch.Tensor, title: str = "") -> None:
    """Draw one (C, H, W) image in [0, 1] on ``ax``, grayscale for one channel."""
    img = image.detach().cpu().float()
    if img.shape[0] == 1:
        ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(img.permute(1, 2, 0).clamp(0, 1).numpy())
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():  # a thin frame: white pixels at the border stay visible on a white page
        spine.set_edgecolor("0.6")
        spine.set_linewidth(0.8)


def image_grid(images: torch.Tensor, titles=None, *, ncols: int = 8, scale: float = 1.4):
    """A grid of images (N, C, H, W) with optional titles."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise ValueError("images must be a 4-D tensor (N, C, H, W)")
    if len(images) == 0:
        raise ValueError("images must hold at least one image")
    n = len(images)
    ncols = min(ncols, n)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(scale * ncols, scale * nrows + 0.3), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i < n:
            _show(ax, images[i], titles[i] if titles else "")
        else:
            ax.axis("off")
    fig.tight_layout()
    return fig


def trigger_gallery(image: torch.Tensor, triggers: dict, *, scale: float = 1.6):
    """One clean image and the same image under each named trigger, with the difference below."""
    if not triggers:
        raise ValueError("triggers must name at least one trigger")
    fig, axes = plt.subplots(2, len(triggers) + 1, figsize=(scale * (len(triggers) + 1), 2 * scale + 0.4))
    _show(axes[0, 0], image, "clean")
    axes[1, 0].axis("off")
    axes[1, 0].text(0.5, 0.5, "|difference|\n(x4)", ha="center", va="center", fontsize=8)
    for col, (name, trigger) in enumerate(triggers.items(), start=1):
        triggered = trigger(image)
        _show(axes[0, col], triggered, name)
        _show(axes[1, col], ((triggered - image).abs() * 4).clamp(0, 1))
    fig.tight_layout()
    return fig


def poisoned_samples(poisoned_dataset, indices: torch.Tensor, clean_labels: torch.Tensor, *, count: int = 8):
    """The first ``count`` poisoned training images titled "true → given" label."""
    if len(indices) == 0:
        raise ValueError("indices must name at least one poisoned image")
    chosen = indices[:count]
    names = poisoned_dataset.classes
    titles = [f"{names[int(clean_labels[i])]}\n→ {names[int(poisoned_dataset.labels[i])]}"
              for i in chosen]
    return image_grid(poisoned_dataset.images[chosen], titles, ncols=count)


def training_curves(history: History, title: str = "training"):
    """Loss and accuracy per epoch (training data, and test data when it was measured)."""
    if not history.loss:
        raise ValueError("history must hold at least one epoch")
    epochs = range(1, len(history.loss) + 1)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(8, 3))
    ax_loss.plot(epochs, history.loss, marker="o")
    ax_loss.set(xlabel="epoch", ylabel="loss", title=f"{title}: loss")
    ax_acc.plot(epochs, history.accuracy, marker="o", label="train (poisoned)")
    if history.test_accuracy:
        ax_acc.plot(epochs, history.test_accuracy, marker="s", label="clean test")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title=f"{title}: accuracy", ylim=(0, 1))
    ax_acc.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def percent_ticks(ax, rates) -> None:
    """A log-scale x axis with one tick per rate, labelled in percent ("0.1%", not "10^-3")."""
    from matplotlib.ticker import FixedLocator, NullLocator

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator(list(rates)))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([f"{100 * r:g}%" for r in rates], rotation=45, ha="right")  # close rates: no overlap


def rate_curve(rates, clean_acc, asr, *, title: str = "ASR and clean accuracy vs poisoning rate"):
    """Clean accuracy and attack success rate against the poisoning rate (log x axis)."""
    if not (len(rates) == len(clean_acc) == len(asr)) or not rates:
        raise ValueError("rates, clean_acc and asr must be non-empty and of equal length")
    fig, ax = plt.subplots(figsize=(7.5, 3.2))
    ax.plot(rates, asr, marker="o", label="ASR (non-target test images)")
    ax.plot(rates, clean_acc, marker="s", label="clean accuracy")
    percent_ticks(ax, rates)
    ax.set(xlabel="poisoning rate (share of the training set, log scale)", ylabel="share of test images",
           ylim=(0, 1.02), title=title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)  # outside: never over the curves
    fig.tight_layout()
    return fig
