"""Every figure of the defenses, in one module (matplotlib is imported only here).

Each function returns a matplotlib ``Figure`` (never calls ``plt.show``), sized to be
read at notebook width (about 10 inches): class names are written whole, legends sit
outside the data, every axis and colorbar says what it measures.
"""
from __future__ import annotations

import textwrap

import matplotlib.pyplot as plt
import numpy as np
import torch

from ..checks import check_indices
from .activation_clustering import ActivationClusteringResult
from .compare import NAMES
from .fine_pruning import PruningCurve
from .neural_cleanse import NeuralCleanseResult

WIDTH = 10.0  # inches: the width of a notebook's output area at the default zoom


def _name(classes, label: int, width: int = 12) -> str:
    """A class's whole name, wrapped onto lines of ``width`` characters (never cut)."""
    name = classes[label] if classes is not None else str(label)
    return "\n".join(textwrap.wrap(str(name), width)) or str(label)


def plot_activation_clusters(result: ActivationClusteringResult, poisoned=None, classes=None, *, columns: int = 5):
    """Each class's activations in 2-D: colored by 2-means cluster, and below by ground truth.

    ``poisoned``: the true poisoned indices (``PoisonResult.indices``), when known. The
    classes are laid out ``columns`` to a row, so the figure stays readable at notebook width.
    """
    splits = result.per_class
    n = sum(len(s.indices) for s in splits)  # every sample belongs to one class
    truth = torch.zeros(n, dtype=torch.bool) if poisoned is None else check_indices("poisoned", poisoned, n)
    rows = -(-len(splits) // columns)
    fig, axes = plt.subplots(2 * rows, columns, figsize=(WIDTH, 4.0 * rows + 0.8), squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_visible(False)
    flagged = set(result.flagged_classes)
    for i, split in enumerate(splits):
        top, bottom = axes[2 * (i // columns), i % columns], axes[2 * (i // columns) + 1, i % columns]
        suspect = split.clusters == split.suspect
        for ax, colors in ((top, suspect), (bottom, truth[split.indices].numpy())):
            ax.set_visible(True)
            ax.scatter(split.view[:, 0], split.view[:, 1], c=colors, s=2, cmap="coolwarm", vmin=0, vmax=1)
        trusted = "-" if split.trusted_share is None else f"{split.trusted_share[split.suspect]:.2f}"
        top.set_title(f"{_name(classes, split.label, 18)}{' - FLAGGED' if split.label in flagged else ''}\n"
                      f"smaller cluster {split.relative_size:.0%}\ntrusted ratio {trusted}", fontsize=7)
        if i % columns == 0:
            top.set_ylabel("2-means clusters\n(red: the one tested;\nsuspect if FLAGGED)", fontsize=8)
            bottom.set_ylabel("ground truth\n(red: poisoned)", fontsize=8)
    fig.suptitle(f"Activation Clustering ({result.analysis} analysis decides): each class's activations, "
                 "PCA to 2-D", fontsize=10)
    fig.tight_layout()
    return fig


def plot_reversed_triggers(result: NeuralCleanseResult, classes=None, *, columns: int = 5):
    """Each label's reversed mask and stamp m*p, with its mask norm and anomaly index."""
    k = len(result.masks)
    rows = -(-k // columns)
    fig, axes = plt.subplots(2 * rows, columns, figsize=(WIDTH, 4.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for label in range(k):
        top, bottom = axes[2 * (label // columns), label % columns], axes[2 * (label // columns) + 1, label % columns]
        flag = " - FLAGGED" if label in result.flagged else ""
        top.imshow(result.masks[label, 0].numpy(), cmap="gray", vmin=0, vmax=1)
        top.set_title(f"{_name(classes, label, 18)}{flag}\n|m|1 = {result.norms[label]:.0f}, "
                      f"index {result.anomaly_index[label]:.1f}", fontsize=8)
        stamp = (result.masks[label] * result.patterns[label]).permute(1, 2, 0).squeeze(-1)
        bottom.imshow(stamp.numpy(), cmap="gray" if stamp.ndim == 2 else None, vmin=0, vmax=1)
        bottom.set_title("stamp m*p", fontsize=7)
    fig.suptitle("Neural Cleanse: the reversed mask m of each label (white = stamped pixel) and its stamp",
                 fontsize=10)
    fig.tight_layout()
    return fig


def plot_anomaly_index(results: dict[str, NeuralCleanseResult], classes=None):
    """The signed anomaly index of every label for each named model, with the flag threshold.

    A bar above the line is exactly a flagged label (index > threshold, small norms only):
    labels whose mask is *larger* than the median get negative bars.
    """
    fig, ax = plt.subplots(figsize=(WIDTH, 3.6))
    k = len(next(iter(results.values())).anomaly_index)
    x, width = np.arange(k), 0.8 / len(results)
    for i, (name, result) in enumerate(results.items()):
        ax.bar(x + (i - (len(results) - 1) / 2) * width, result.anomaly_index.numpy(), width, label=name)
    threshold = next(iter(results.values())).threshold
    ax.axhline(threshold, color="red", linestyle=":", label=f"flag threshold {threshold:g}")
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_xticks(x, [_name(classes, label, 11) for label in range(k)], fontsize=8)
    ax.set_ylabel("anomaly index of log |m|1\n(robust std. devs below median)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title("Neural Cleanse: a label is flagged when its bar rises above the threshold", fontsize=10)
    fig.tight_layout()
    return fig


def plot_pruning_curve(curve: PruningCurve, chosen_fraction: float | None = None):
    """CA and ASR versus the fraction of last-conv channels pruned (before fine-tuning)."""
    fig, ax = plt.subplots(figsize=(WIDTH * 0.75, 3.4))
    ax.plot(curve.fractions, curve.clean_acc, "o-", label="clean accuracy")
    ax.plot(curve.fractions, curve.asr, "s-", label="attack success rate")
    if chosen_fraction is not None:
        ax.axvline(chosen_fraction, color="gray", linestyle="--", label="the stopping rule\nstops here")
    ax.set_xlabel("fraction of last-conv channels pruned (least active on clean data first)")
    ax.set_ylabel("rate (fraction of test images)")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title("Fine-Pruning: pruning curve before fine-tuning", fontsize=10)
    fig.tight_layout()
    return fig


def plot_strip_entropy(clean_entropy: torch.Tensor, triggered_entropy: torch.Tensor, threshold: float):
    """Histograms of STRIP entropy for clean and triggered inputs, with the threshold."""
    fig, ax = plt.subplots(figsize=(WIDTH * 0.75, 3.4))
    top = max(clean_entropy.max().item(), triggered_entropy.max().item())
    bins = torch.linspace(0, top + 1e-6, 40).tolist()
    ax.hist(clean_entropy.tolist(), bins=bins, alpha=0.6, label="clean inputs")
    ax.hist(triggered_entropy.tolist(), bins=bins, alpha=0.6, label="triggered inputs")
    ax.axvline(threshold, color="black", linestyle="--", label="threshold\n(reject below)")
    ax.set_xlabel("mean prediction entropy over blends (nats)")
    ax.set_ylabel("number of inputs")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title("STRIP: entropy of superimposed inputs", fontsize=10)
    fig.tight_layout()
    return fig


def plot_comparison(rows: list[dict]):
    """Bar chart of CA and ASR after each defense (dashed lines: before), and wall times.

    A defense without a mitigation (a detector on its own) shows no bars, and says so.
    """
    names = [r["defense"].replace("_", " ") for r in rows]
    y = np.arange(len(rows))
    fig, (ax, ax_time) = plt.subplots(1, 2, figsize=(WIDTH, 0.45 * len(rows) + 1.8), sharey=True,
                                      gridspec_kw={"width_ratios": [3, 1]})
    ca = [np.nan if r["ca_after"] is None else r["ca_after"] for r in rows]
    asr = [np.nan if r["asr_after"] is None else r["asr_after"] for r in rows]
    ax.barh(y - 0.2, ca, height=0.4, label="clean accuracy after")
    ax.barh(y + 0.2, asr, height=0.4, label="attack success rate after")
    ax.axvline(rows[0]["ca_before"], color="C0", linestyle="--", label="clean accuracy before")
    ax.axvline(rows[0]["asr_before"], color="C1", linestyle="--", label="attack success rate before")
    for i, value in enumerate(ca):
        if np.isnan(value):
            ax.text(0.02, i, "detection only", va="center", fontsize=7, color="gray")
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.05)
    ax.set_xlabel("rate (fraction of test images)", fontsize=8)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)
    ax.set_title("CA and ASR after each defense", fontsize=10)
    ax_time.barh(y, [r["seconds"] for r in rows], color="gray")
    ax_time.set_xlabel("wall seconds", fontsize=8)
    ax_time.set_title("time", fontsize=10)
    fig.tight_layout()
    return fig


def plot_matrix(cells: dict[tuple[str, str], float | None], *, title: str, value_label: str,
                model_label: str = "model (trigger, poisoning rate)", digits: int = 2):
    """A heat map of one value per (model, defense) cell (blank where it does not apply).

    ``cells`` maps (model name, column name) to a number in [0, 1], or None; rows and columns
    keep the order of first appearance; each cell is written with ``digits`` places (three
    where a threshold such as ASR <= 0.10 must be told from 0.103).
    """
    models = list(dict.fromkeys(m for m, _ in cells))
    defenses = list(dict.fromkeys(d for _, d in cells))
    grid = np.full((len(models), len(defenses)), np.nan)
    for (m, d), value in cells.items():
        if value is not None:
            grid[models.index(m), defenses.index(d)] = value
    fig, ax = plt.subplots(figsize=(WIDTH, 0.32 * len(models) + 2.2))
    image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    for (i, j), value in np.ndenumerate(grid):
        if not np.isnan(value):
            ax.text(j, i, f"{value:.{digits}f}", ha="center", va="center", fontsize=7 if digits < 3 else 6,
                    color="white" if value < 0.5 else "black")
    ax.set_xticks(range(len(defenses)), [NAMES.get(d, d).replace(" ", "\n") for d in defenses], fontsize=8)
    ax.set_yticks(range(len(models)), models, fontsize=8)
    ax.set_xlabel("defense")
    ax.set_ylabel(model_label)
    fig.colorbar(image, ax=ax, label=value_label, fraction=0.04)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig
