"""Scoring defenses the same way for every method.

Detectors that flag training samples are scored against the ground truth an attack
returns (``PoisonResult.indices``): true-positive rate (the share of poisoned samples
caught), false-positive rate (the share of clean samples thrown away) and F1.

Mitigations are scored by clean accuracy (CA) and attack success rate (ASR) before and
after. The lecture ranks defenses by a "mitigation score", ASR reduction divided by CA
drop. Taken literally that ratio breaks exactly when a defense is good: a CA drop of 0
divides by zero, and a CA *gain* (negative drop) flips the sign, ranking the best
defense last. :func:`mitigation_scores` therefore floors the drop at ``min_drop`` (one
percentage point by default): CA measured on a few thousand test images moves by about
half a point between runs anyway (binomial standard error sqrt(0.9 * 0.1 / 5000) is
0.4 points), so a smaller drop cannot be told apart from no drop at all.
"""
from __future__ import annotations

from sklearn.metrics import confusion_matrix, f1_score

from ..checks import check_float, check_indices, check_int


def detection_scores(flagged, poisoned, n: int) -> dict[str, float | int | None]:
    """TPR, FPR, precision and F1 of the ``flagged`` samples against the ``poisoned`` ones.

    Both are index tensors (or boolean masks) into a dataset of ``n`` samples. TPR is
    None when nothing was poisoned (there is nothing to catch), FPR None when everything was.
    """
    check_int("n", n)
    flagged_mask, poisoned_mask = check_indices("flagged", flagged, n), check_indices("poisoned", poisoned, n)
    tn, fp, fn, tp = confusion_matrix(poisoned_mask.numpy(), flagged_mask.numpy(), labels=[False, True]).ravel()
    return {
        "flagged": int(tp + fp),
        "tpr": float(tp / (tp + fn)) if tp + fn else None,
        "fpr": float(fp / (fp + tn)) if fp + tn else None,
        "precision": float(tp / (tp + fp)) if tp + fp else None,
        "f1": float(f1_score(poisoned_mask.numpy(), flagged_mask.numpy(), zero_division=0.0)),
    }


def mitigation_scores(*, ca_before: float, ca_after: float, asr_before: float, asr_after: float,
                      min_drop: float = 0.01) -> dict[str, float]:
    """CA drop, ASR reduction and the lecture's mitigation score, all from fractions in [0, 1].

    ``mitigation_score = asr_reduction / max(ca_drop, min_drop)``: how many points of ASR
    a defense removes per point of clean accuracy it costs. The floor ``min_drop`` keeps
    the ratio finite and correctly ordered when CA does not drop or even rises (see the
    module docstring); set it to the noise level of your CA measurement.
    """
    for name, value in (("ca_before", ca_before), ("ca_after", ca_after),
                        ("asr_before", asr_before), ("asr_after", asr_after)):
        check_float(name, value, 0.0, 1.0)
    check_float("min_drop", min_drop, 0.0, 1.0, low_open=True)
    ca_drop, asr_reduction = ca_before - ca_after, asr_before - asr_after
    return {"ca_drop": ca_drop, "asr_reduction": asr_reduction,
            "mitigation_score": asr_reduction / max(ca_drop, min_drop)}


def format_cell(value, digits: int = 2) -> str:
    """One cell of a report table (``bench defenses``, the detection matrix): "-" for a value
    not measured, a float to ``digits`` places, a list of labels as "none" or "0, 1, 6"."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{0.0 if round(value, digits) == 0 else value:.{digits}f}"  # never "-0.00"
    if isinstance(value, list):
        return "none" if not value else ", ".join(map(str, value))
    return str(value)
