"""Part 2's rules: what an activation extractor and an Activation Clustering detector must do.

Part 2 asks for ``extract_activations`` (a model's penultimate activations, computed in eval
mode) and ``activation_clustering`` (one boolean flag per training sample: is it poisoned?).
Each rule is a function of what the student's function returned: on a fixed probe model and
random images (``verify_activations``), on synthetic activations with one planted,
well-separated poisoned cluster (``verify_planted``), and on the activations of the hidden
graded zoo, whose answer key only the grader reads (``zoo_report`` and the ``verify_zoo_*``
rules: clean models must not be accused, and enough poisoned samples must be found with few
false alarms; thresholds in :mod:`.rules`).
"""
from __future__ import annotations

import numpy as np
import torch

from ..models import model_for
from .rules import MAX_ZOO_FPR, MIN_ZOO_FOUND, MIN_ZOO_TPR, GradingFailure, all_problems, require


def activation_probe(dataset: str = "fashion-mnist"):
    """The model and images ``extract_activations`` is checked on: a fresh small CNN whose
    batch normalization has not been trained (so an extraction in training mode gives
    different numbers) and 300 random images."""
    images = torch.rand(300, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    return model_for(dataset, seed=0), images


def verify_activations(result) -> None:
    """What ``extract_activations`` returned equals ``model.features`` in eval mode on the probe."""
    model, images = activation_probe()
    require(isinstance(result, (torch.Tensor, np.ndarray)), f"extract_activations must return an array or a "
                                                            f"tensor, got {type(result).__name__}")
    result = torch.as_tensor(np.asarray(result.detach() if isinstance(result, torch.Tensor) else result))
    # imported here, not at the top: the defenses package loads scikit-learn (about a second),
    # which Part 1's notebook, and its sandbox for every student, never needs
    from ..defenses.activations import extract_features
    expected = extract_features(model, images, progress=False)
    require(result.shape == expected.shape, f"extract_activations must return shape {tuple(expected.shape)} "
                                            f"(images x features), got {tuple(result.shape)}")
    require(result.dtype.is_floating_point and torch.allclose(result.float(), expected, atol=1e-4),
            "extract_activations must return model.features(images), computed in eval mode")


def verify_flags(flags, labels: np.ndarray, what: str) -> np.ndarray:
    """A detector's answer is one boolean per sample."""
    flags = np.asarray(flags.detach().cpu() if isinstance(flags, torch.Tensor) else flags)
    require(flags.dtype == bool and flags.shape == labels.shape,
            f"activation_clustering must return a boolean array with one entry per sample {labels.shape} "
            f"({what}), got dtype {flags.dtype} and shape {flags.shape}")
    return flags


def planted_activations(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Synthetic activations with one planted poisoned cluster: (activations, labels, poisoned mask).

    Ten classes of 300 samples, each a Gaussian blob in 32 dimensions; class 3 also holds
    60 samples of a far-away blob, as a backdoor's triggered images would.
    """
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 4, size=(10, 32))
    labels = np.concatenate([np.repeat(np.arange(10), 300), np.full(60, 3)])
    direction = rng.normal(size=32)
    shifted = centers[3] + 15 * direction / np.linalg.norm(direction)
    means = np.concatenate([centers[labels[:3000]], np.repeat(shifted[None], 60, axis=0)])
    activations = (means + rng.normal(0, 1, size=means.shape)).astype(np.float32)
    return activations, labels, np.arange(len(labels)) >= 3000


def verify_planted(flags) -> None:
    """The detector found the planted, well-separated cluster and (almost) nothing else."""
    _, labels, poisoned = planted_activations()
    flags = verify_flags(flags, labels, "the planted example")
    found = flags[poisoned].mean()
    require(found >= 0.9, f"only {found:.0%} of the 60 planted samples were flagged (need at least 90%)")
    wrong = int(flags[~poisoned].sum())
    require(wrong <= 15, f"{wrong} of the {int((~poisoned).sum())} clean samples were flagged "
                         f"(at most 15 allowed)")


def zoo_report(flags_by_model: dict, answer_key: dict) -> dict:
    """Per-model verdicts and per-sample TPR/FPR of a detector's flags on the graded zoo.

    ``flags_by_model[name]`` is the detector's answer for zoo model ``name``, or a
    GradingFailure when it gave none (it raised, hung, or answered in the wrong form).
    """
    report = {}
    for name, entry in answer_key["models"].items():
        flags = flags_by_model.get(name)
        if isinstance(flags, Exception) or flags is None:
            raise GradingFailure(f"no answer on zoo model {name}: {flags or 'the detector was not run'}")
        truth = np.zeros(len(flags), dtype=bool)
        truth[entry.get("poisoned_indices", [])] = True
        report[name] = {"backdoored": entry["backdoored"], "verdict": bool(flags.any()),
                        "tpr": float(flags[truth].mean()) if truth.any() else None,
                        "fpr": float(flags[~truth].mean())}
    return report


def verify_zoo_verdicts(report: dict, min_found: float = MIN_ZOO_FOUND) -> None:
    """Every clean zoo model is judged clean, and at least ``min_found`` of the backdoored ones
    backdoored (a model is judged backdoored when any of its samples is flagged)."""
    accused = [name for name, r in report.items() if r["verdict"] and not r["backdoored"]]
    backdoored = [r for r in report.values() if r["backdoored"]]
    found = sum(r["verdict"] for r in backdoored) / len(backdoored)
    with all_problems() as problems:
        problems.require(not accused, f"{len(accused)} clean zoo model(s) judged backdoored: a clean model must "
                                      f"have no sample flagged")
        problems.require(found >= min_found, f"{sum(r['verdict'] for r in backdoored)} of the {len(backdoored)} "
                                             f"backdoored zoo models were found ({found:.6g} of them); at least "
                                             f"{min_found:g} must be")


def verify_zoo_tpr(report: dict, minimum: float = MIN_ZOO_TPR) -> None:
    """Mean per-sample true-positive rate over the backdoored zoo models is at least ``minimum``."""
    tpr = float(np.mean([r["tpr"] for r in report.values() if r["backdoored"]]))
    require(tpr >= minimum, f"mean true-positive rate over the backdoored zoo models is {tpr:.6g}; "
                            f"it must be at least {minimum:g}")


def verify_zoo_fpr(report: dict, maximum: float = MAX_ZOO_FPR) -> None:
    """Mean per-sample false-positive rate over all zoo models is at most ``maximum``."""
    fpr = float(np.mean([r["fpr"] for r in report.values()]))
    require(fpr <= maximum, f"mean false-positive rate over the zoo models is {fpr:.6g}; "
                            f"it must be at most {maximum:g}")


