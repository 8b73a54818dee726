"""Scores of the tournament: each cell, each detector, each attack, and how sure each rank is.

A **cell** is one detector on one arena. Its flags are judged against the arena's ground
truth by the lecture's measures (tutorial, Appendix A.2): TPR (share of poisoned samples
flagged), FPR (share of clean samples flagged) and the **Detection Score** TPR - FPR, which is
0 for a detector that flags everything or flags at random, and 1 for a perfect one. A cell
whose detector gave no valid answer (it raised, hung, or answered in the wrong form) is an
error; in a mean it counts as Detection Score 0 (it caught nothing).

**Leaderboards.** A detector is ranked by its mean Detection Score over the arenas; an attack
by the mean Detection Score of the detectors against it (lower: stealthier), and by how many
detectors it *evaded* (Detection Score below :data:`EVADE_BAR`). A mean over a few dozen
arenas is not exact: each rank comes with a 90% interval from the bootstrap (Efron 1979),
the arenas (or detectors) resampled with replacement and the ranks recomputed. Equal scores
share a rank.

**A schedule** (a big class: :func:`course_lib.tournament.matches.schedule`) plays only some
cells: every detector meets every house arena and a stated number of student arenas drawn at
random. A cell that was not played counts in no mean (an error still counts as 0); each mean
is then over fewer arenas, and the bootstrap's intervals widen accordingly: that is the rank
uncertainty the schedule costs, and the bench prints it.
"""
from __future__ import annotations

import numpy as np

from ..homework.part2 import verify_flags

EVADE_BAR = 0.5          # an attack evades a detector whose Detection Score on its arena is below this
BOOTSTRAP_ROUNDS = 1000


def score_flags(flags, labels: np.ndarray, truth: np.ndarray) -> dict:
    """TPR, FPR, Detection Score (and F1, to compare with the detection matrix) of ``flags`` (one bool
    per sample, checked) against ``truth``."""
    flags = verify_flags(flags, labels, "an arena")
    truth = np.asarray(truth, dtype=bool)
    if truth.shape != flags.shape:
        raise ValueError(f"truth must have the shape of the flags {flags.shape}, got {truth.shape}")
    tpr = float(flags[truth].mean()) if truth.any() else 0.0
    fpr = float(flags[~truth].mean()) if (~truth).any() else 0.0
    caught = int((flags & truth).sum())
    f1 = 2 * caught / (int(flags.sum()) + int(truth.sum())) if flags.any() or truth.any() else 0.0
    return {"tpr": tpr, "fpr": fpr, "score": tpr - fpr, "f1": f1, "flagged": int(flags.sum())}


def ranks(values: np.ndarray, higher_is_better: bool = True, digits: int = 3) -> np.ndarray:
    """Competition ranks (1 = best; equal values, rounded to ``digits``, share a rank)."""
    v = np.round(np.asarray(values, dtype=float), digits) * (1 if higher_is_better else -1)
    ordered = np.sort(v)
    return 1 + len(v) - np.searchsorted(ordered, v, side="right")     # 1 + how many are strictly better


def _means(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Row means of ``values`` over the cells whose weight is not 0 (a row with none: 0)."""
    total = weights.sum(1)
    return np.divide((values * weights).sum(1), total, out=np.zeros(len(values)), where=total > 0)


def bootstrap_ranks(matrix: np.ndarray, *, axis: int, higher_is_better: bool, rounds: int = BOOTSTRAP_ROUNDS,
                    seed: int = 0, played: np.ndarray | None = None) -> np.ndarray:
    """The 5th and 95th percentile of each row's rank (rows: entrants; ``axis`` 1 resampled); only the
    ``played`` cells count in a mean (default: all)."""
    matrix = np.asarray(matrix, dtype=float)
    weights = np.ones_like(matrix) if played is None else np.asarray(played, dtype=float)
    if axis == 0:
        matrix, weights = matrix.T, weights.T
    if matrix.shape[1] == 0:
        return np.ones((len(matrix), 2), dtype=int)
    rng = np.random.default_rng(seed)
    drawn = np.empty((rounds, len(matrix)))
    for r in range(rounds):
        columns = rng.integers(0, matrix.shape[1], matrix.shape[1])
        drawn[r] = ranks(_means(matrix[:, columns], weights[:, columns]), higher_is_better)
    return np.stack([np.percentile(drawn, 5, axis=0, method="lower"),
                     np.percentile(drawn, 95, axis=0, method="higher")], 1).astype(int)


def played_matrix(cells: list[dict], arenas: list[str], detectors: list[str]) -> np.ndarray:
    """(arenas x detectors) True where the cell was played (scored or an error), False where the
    schedule left it out."""
    index = {(c["arena"], c["detector"]) for c in cells}
    return np.array([[(a, d) in index for d in detectors] for a in arenas], dtype=bool).reshape(len(arenas),
                                                                                                 len(detectors))


def score_matrix(cells: list[dict], arenas: list[str], detectors: list[str]) -> np.ndarray:
    """(arenas x detectors) Detection Scores, NaN where the cell is an error or was not played."""
    index = {(c["arena"], c["detector"]): c for c in cells}
    matrix = np.full((len(arenas), len(detectors)), np.nan)
    for i, a in enumerate(arenas):
        for j, d in enumerate(detectors):
            cell = index.get((a, d))
            if cell is not None and cell.get("score") is not None:
                matrix[i, j] = cell["score"]
    return matrix


def detector_board(matrix: np.ndarray, arenas: list[str], detectors: list[str], seed: int = 0,
                   played: np.ndarray | None = None) -> list[dict]:
    """One row per detector: mean Detection Score over the arenas it met (errors as 0), worst and best
    arena, rank and its interval."""
    matrix = np.asarray(matrix, dtype=float)
    played = np.ones(matrix.shape, dtype=bool) if played is None else np.asarray(played, dtype=bool)
    filled = np.nan_to_num(matrix, nan=0.0)
    means = _means(filled.T, played.T)
    rank = ranks(means)
    interval = bootstrap_ranks(filled, axis=0, higher_is_better=True, seed=seed, played=played)
    rows = []
    for j, name in enumerate(detectors):
        met = np.flatnonzero(played[:, j])
        column = filled[met, j]
        rows.append({"detector": name, "mean_score": float(means[j]), "rank": int(rank[j]),
                     "rank_low": int(interval[j, 0]), "rank_high": int(interval[j, 1]), "arenas": len(met),
                     "errors": int(np.isnan(matrix[met, j]).sum()),
                     "worst": arenas[int(met[column.argmin()])] if len(met) else None,
                     "best": arenas[int(met[column.argmax()])] if len(met) else None})
    return sorted(rows, key=lambda r: (r["rank"], r["detector"]))


def attack_board(matrix: np.ndarray, arenas: list[str], detectors: list[str], seed: int = 0,
                 controls=(), played: np.ndarray | None = None) -> list[dict]:
    """One row per arena: detectors evaded and caught (errors are neither), mean Detection Score against
    it (lower: stealthier), rank (1 = stealthiest) and its interval (detectors resampled). The
    ``controls`` (detectors that only calibrate the scale) are left out."""
    keep = [j for j, name in enumerate(detectors) if name not in controls]
    matrix = np.asarray(matrix, dtype=float)
    played = np.ones(matrix.shape, dtype=bool) if played is None else np.asarray(played, dtype=bool)
    matrix, played, detectors = matrix[:, keep], played[:, keep], [detectors[j] for j in keep]
    filled = np.nan_to_num(matrix, nan=0.0)
    means = _means(filled, played)
    rank = ranks(means, higher_is_better=False)
    interval = bootstrap_ranks(filled, axis=1, higher_is_better=False, seed=seed, played=played)
    rows = []
    for i, name in enumerate(arenas):
        answered = ~np.isnan(matrix[i]) & played[i]
        caught = [detectors[j] for j in np.flatnonzero(answered & (filled[i] >= EVADE_BAR))]
        rows.append({"arena": name, "mean_score_against": float(means[i]), "rank": int(rank[i]),
                     "rank_low": int(interval[i, 0]), "rank_high": int(interval[i, 1]),
                     "evaded": int((answered & (filled[i] < EVADE_BAR)).sum()), "answered": int(answered.sum()),
                     "met": int(played[i].sum()), "caught_by": caught})
    return sorted(rows, key=lambda r: (r["rank"], r["arena"]))
