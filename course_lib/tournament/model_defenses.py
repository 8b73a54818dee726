"""Model-level defenses on every arena, run by the grader with quick budgets.

The detectors of the matrix look at training samples; these look at the trained model, as
the lecture's Part 2 does: **Neural Cleanse** (Wang et al. 2019: is the arena's target class
the one flagged?), **STRIP** (Gao et al. 2019: the share of triggered inputs it lets through,
its false acceptance rate, at a 1% false rejection rate on clean inputs) and **Fine-Pruning**
(Liu et al. 2018: the ASR left after pruning and fine-tuning, and the lecture's Mitigation
Score, ASR points removed per point of CA lost). The defender's clean images are half of the
arena's held-out clean images; the other half measures CA before and after.
"""
from __future__ import annotations

import json
import time

from ..defenses.fine_pruning import fine_prune
from ..defenses.neural_cleanse import neural_cleanse
from ..defenses.scoring import mitigation_scores
from ..defenses.strip import fit_strip, strip_rates
from ..train import predict
from . import arenas
from .matches import set_threads, write_json

# Neural Cleanse's budget on an arena: 60 steps of 24 images per label, against the detection matrix's quick
# 200 (course_lib.defenses.compare). On the 29 arenas of the tournament bench of 2026-12-07 (scripts/nc_budget.py,
# docs/benchmarks/nc-budget-c318136.jsonl) both flagged the target on 15 and agreed on 25, in 3.4-3.9 s against
# 11.2-13.0 s (one thread, beside a notebook run; 3.4-4.3 s in the idle tournament itself).
NC_QUICK = {"steps": 60}
FINE_TUNE_EPOCHS = 2               # the quick Fine-Pruning budget
FRR = 0.01


def defend(setting, arena: dict) -> dict:
    """The three defenses on one arena (cached beside it); one that fails is an error in its row only."""
    set_threads(setting.threads)
    path = setting.arena_folder(arena["key"]) / "model_defenses.json"
    if path.is_file():
        return json.loads(path.read_text())
    start, row = time.perf_counter(), {"arena": arena["name"]}
    loaded = arenas.load(setting.arena_folder(arena["key"]))
    holdout = setting.pool(arena.get("rate")).holdout
    half = len(holdout) // 2
    defender, evaluation = holdout.subset(range(half)), holdout.subset(range(half, len(holdout)))
    target, seed, errors = loaded.info["target"], loaded.info["seed"], []
    clock = time.perf_counter()
    try:
        found = neural_cleanse(loaded.model, defender, n_images=half // 3, n_heldout=half // 3,
                               seed=seed, progress=False, **NC_QUICK)
        row["nc_flagged"], row["nc_steps"] = [int(x) for x in found.flagged], NC_QUICK["steps"]
        row["nc_target_flagged"] = "yes" if target in row["nc_flagged"] else "no"
        row["nc_false_alarms"] = [label for label in row["nc_flagged"] if label != target]   # clean labels flagged
    except Exception as err:
        errors.append(f"Neural Cleanse: {type(err).__name__}: {err}")
    row["nc_seconds"], clock = round(time.perf_counter() - clock, 2), time.perf_counter()
    try:
        strip = fit_strip(loaded.model, defender, frr=FRR, n_calibration=half // 2, seed=seed)
        rates = strip_rates(strip, evaluation.images, loaded.measure)
        row.update(strip_frr=rates["frr"], strip_far=rates["far"])
    except Exception as err:
        errors.append(f"STRIP: {type(err).__name__}: {err}")
    row["strip_seconds"], clock = round(time.perf_counter() - clock, 2), time.perf_counter()
    try:
        result = fine_prune(loaded.model, defender, epochs=FINE_TUNE_EPOCHS, seed=seed, progress=False)
        accuracy = lambda m: (predict(m, evaluation.images) == evaluation.labels).float().mean().item()  # noqa: E731
        asr = lambda m: (predict(m, loaded.measure) == target).float().mean().item()  # noqa: E731
        scores = mitigation_scores(ca_before=accuracy(loaded.model), ca_after=accuracy(result.model),
                                   asr_before=asr(loaded.model), asr_after=asr(result.model))
        row.update(fp_asr_after=asr(result.model), fp_ca_after=accuracy(result.model),
                   mitigation_score=scores["mitigation_score"])
    except Exception as err:
        errors.append(f"Fine-Pruning: {type(err).__name__}: {err}")
    row["fp_seconds"] = round(time.perf_counter() - clock, 2)
    row["error"] = "; ".join(errors)
    row["seconds"] = round(time.perf_counter() - start, 2)
    write_json(path, row)
    return row
