"""The detection matrix: every detector on many backdoored and clean models.

``python -m course_lib bench matrix [--fast] --json``. One defense tested on one trigger
teaches more than it knows (the kit's thresholds were once set on its own checkerboard).
The matrix trains one model per (trigger family, poisoning rate) and several clean models
(different seeds), and runs every detector and its mitigation on each through the same
runners as ``bench defenses`` and notebook 6 (:func:`.compare.run_defense`).

The models are trained on a **subset** of Fashion-MNIST (20,000 training images, 3 epochs;
``--fast``: 10,000 images, three families at 5% and two clean models) so that the whole
matrix fits in 30 minutes on 2 cores. Not less: on 10,000 images and 2 epochs the 1%
backdoors did not take (checkerboard ASR 0.04) and the 5% blend model's poison did not
form a cluster of its own, so the matrix measured the training, not the defenses. The
defender trusts 4,000 test images (``--fast``: 2,000, enough for its quick Neural Cleanse
and half the fine-tuning time) and CA/ASR are measured on 3,000 others. For the same
time limit every defense runs with the quick budgets of a live notebook (``Case.quick``:
Fine-Pruning and unlearning with 2 fine-tuning epochs), except Neural Cleanse, which
keeps its full search (700 images x 400 steps, 1,500 more to judge the kept triggers,
1,000 others to report their success; ``--fast``: 500 x 200, judged on 600). Spectral
Signatures' paper variant (removal from every class, then retraining) is retrained on the
5% models only. Models run in parallel worker processes, each limited to one thread (more
threads than cores on a 2-core machine slows everything down).

Trigger families (the dirty-label ones relabel images of other classes to ``target``):
``checkerboard`` (3x3 patch), ``square`` (solid 3x3 patch), ``blend`` (noise blended at
alpha 0.1), ``sig`` (sine stripes), ``wanet`` (smooth warp), ``corners`` (3x3 squares in
the four corners), and ``clean_label`` (Turner et al.'s label-consistent attack with a
5x5 checkerboard: target-class images made hard by PGD on a surrogate model; ``rate`` is
still the share of the *training set*, so 10% poisons the whole target class).
DP-SGD and the lecture's training-time recipes are not in the matrix (they do not
detect), nor is the IsolationForest on pixel statistics (it caught no poison in ``bench
defenses``); Fine-Pruning is, as the mitigation that needs no detector.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

from ..checks import check_int
from .scoring import format_cell

FAMILIES = ("checkerboard", "square", "blend", "sig", "wanet", "corners", "clean_label")
DETECTORS = ("activation_clustering", "spectral_signatures", "isolation_forest_features", "neural_cleanse",
             "strip", "fine_pruning")
FIELDS = ("trigger", "rate", "target", "seed", "defense", "tpr", "fpr", "f1", "flagged", "anomaly_index", "far",
          "frr", "asr_before", "asr_after", "seconds")
TARGETS = {"checkerboard": 0, "square": 2, "blend": 4, "sig": 6, "wanet": 8, "corners": 3, "clean_label": 7}
PLANS = {
    "full": {"families": FAMILIES, "rates": (0.01, 0.05, 0.10), "clean_seeds": (0, 1, 2, 3, 4),
             "train_images": 20_000, "defender_images": 4000, "nc_budget": "full"},
    "fast": {"families": ("checkerboard", "blend", "wanet"), "rates": (0.05,), "clean_seeds": (0, 1),
             "train_images": 10_000, "defender_images": 2000, "nc_budget": "quick"},
}
EVAL_IMAGES, EPOCHS = 3000, 3


def family_trigger(family: str):
    """The trigger of a dirty-label family (``clean_label`` uses a 5x5 checkerboard)."""
    from ..triggers import BlendTrigger, DistributedTrigger, PatchTrigger, SIGTrigger, WaNetTrigger

    return {"checkerboard": lambda: PatchTrigger(size=3, pattern="checkerboard"),
            "square": lambda: PatchTrigger(size=3, pattern="solid"),
            "blend": lambda: BlendTrigger(alpha=0.1),
            "sig": lambda: SIGTrigger(),
            "wanet": lambda: WaNetTrigger(),
            "corners": lambda: DistributedTrigger(),
            "clean_label": lambda: PatchTrigger(size=5, pattern="checkerboard")}[family]()


def plan(fast: bool = False) -> list[dict]:
    """The models of the matrix: one spec per backdoored (family, rate) and per clean seed, in the
    order they run: every family at 5%, the clean models, then the other rates."""
    p = PLANS["fast" if fast else "full"]
    middle, *edges = sorted(p["rates"], key=lambda r: abs(r - 0.05))  # 5% first: a run cut short still covers
    specs = [{"trigger": f, "rate": middle, "target": TARGETS[f], "seed": 0} for f in p["families"]]  # every family
    specs += [{"trigger": "clean", "rate": 0.0, "target": None, "seed": s} for s in p["clean_seeds"]]
    specs += [{"trigger": f, "rate": r, "target": TARGETS[f], "seed": 0} for r in sorted(edges) for f in p["families"]]
    return [{**s, **{k: p[k] for k in ("train_images", "defender_images", "nc_budget")}} for s in specs]


def run_model(spec: dict) -> list[dict]:
    """Train the model of ``spec`` and run every detector on it; one row per detector."""
    import torch

    torch.set_num_threads(1)
    from ..attacks import badnets, label_consistent
    from ..data import load_splits
    from ..experiments import run_clean
    from ..models import model_for
    from ..train import train
    from .compare import Case, run_defense

    full_train, test = load_splits("fashion-mnist")
    train_data, spare = full_train.split(spec["train_images"], seed=0)
    defender, rest = test.split(spec["defender_images"], seed=0)
    evaluation = rest.subset(range(EVAL_IMAGES))
    seed, family = spec["seed"], spec["trigger"]
    start = time.perf_counter()
    if family == "clean":
        case_data, poisoned, trigger, target = train_data, torch.empty(0, dtype=torch.long), None, None
    else:
        trigger, target = family_trigger(family), spec["target"]
        if family == "clean_label":
            surrogate = run_clean(spare.subset(range(spec["train_images"])), evaluation, seed=seed,
                                  progress=False).model
            share = min(1.0, spec["rate"] * len(train_data) / int((train_data.labels == target).sum()))
            poison = label_consistent(train_data, trigger=trigger, target=target, rate=share, surrogate=surrogate,
                                      eps=32 / 255, seed=seed, progress=False)
        else:
            poison = badnets(train_data, trigger=trigger, target=target, rate=spec["rate"], seed=seed)
        case_data, poisoned = poison.dataset, poison.indices
    model = model_for(case_data, seed=seed)
    train(model, case_data, epochs=EPOCHS, seed=seed, progress=False)
    case = Case(model, case_data, defender, evaluation, poisoned=poisoned, trigger=trigger, target=target,
                epochs=EPOCHS, seed=seed, quick=True, nc_budget=spec["nc_budget"], compare_analyses=True)
    train_seconds = round(time.perf_counter() - start, 1)
    rows = []
    for name in DETECTORS:
        if name == "fine_pruning" and not case.backdoored:
            continue  # a mitigation only: nothing to measure on a clean model
        row, _ = run_defense(name, case)
        if name == "spectral_signatures" and case.backdoored and spec["rate"] == 0.05:
            row.update(_every_class_after(case))
        rows.append({**{k: row.get(k) for k in FIELDS}, **{k: spec[k] for k in ("trigger", "rate", "target", "seed")},
                     "ca_before": row["ca_before"], "ca_after": row["ca_after"], "train_seconds": train_seconds,
                     **{k: row[k] for k in ("f1_by_analysis", "flagged_by_analysis", "f1_by_score",
                                            "heldout_success_min", "heldout_success", "pruned_fraction",
                                            "splits", "tail", "flagged_linear", "anomaly_index_linear",
                                            "mask_norms", "ca_after_every_class", "asr_after_every_class")
                        if k in row}})
    return rows


def _every_class_after(case) -> dict:
    """CA and ASR after the paper's Spectral Signatures: remove from every class, retrain."""
    from .retraining import retrain_without
    from .spectral_signatures import spectral_signatures

    found = spectral_signatures(case.model, case.train_data, features=case.features, progress=False)
    ca, asr = case.measure(retrain_without(case.train_data, found.flagged, epochs=case.epochs, arch=case.arch,
                                           seed=case.seed, device=case.device, progress=False).model)
    return {"ca_after_every_class": ca, "asr_after_every_class": asr}


def _init_worker():
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


def run_matrix(*, fast: bool = False, workers: int = 2, on_row=None) -> list[dict]:
    """Run the matrix on ``workers`` processes (one thread each); rows in plan order."""
    check_int("workers", workers)
    specs = plan(fast)
    rows = []
    with ProcessPoolExecutor(workers, initializer=_init_worker) as pool:
        for model_rows in pool.map(run_model, specs):
            for row in model_rows:
                rows.append(row)
                if on_row:
                    on_row(row)
    return rows


def load_rows(path) -> list[dict]:
    """The rows of a saved ``bench matrix --json`` run (one JSON object per line; the total is dropped)."""
    with open(path) as lines:
        rows = [json.loads(line) for line in lines if line.strip()]
    return [r for r in rows if r.get("defense") != "total"]


def model_name(row: dict) -> str:
    if row["trigger"] == "clean":
        return f"clean (seed {row['seed']})"
    return f"{row['trigger']} {row['rate']:.0%}"


def detection_value(row: dict) -> float | None:
    """One number per cell of the detection heat map: F1 for sample detectors, 1 - FAR for
    STRIP, 1 if Neural Cleanse flagged the true target (0 if not); None for clean models."""
    if row["trigger"] == "clean" or row["defense"] == "fine_pruning":
        return None
    if row["defense"] == "strip":
        return None if row["far"] is None else 1 - row["far"]
    if row["defense"] == "neural_cleanse":
        return float(row["target"] in row["flagged"])
    return row["f1"]


def false_alarm_rates(rows: list[dict]) -> dict[str, float]:
    """Per detector with a class verdict: the share of clean models on which it flagged anything
    (Spectral Signatures' verdict is its class test on trusted images)."""
    rates = {}
    for name in ("activation_clustering", "spectral_signatures", "neural_cleanse"):
        clean = [r for r in rows if r["trigger"] == "clean" and r["defense"] == name]
        if clean:
            rates[name] = sum(bool(r["flagged"]) for r in clean) / len(clean)
    return rates


def to_markdown(rows: list[dict]) -> str:
    """The matrix as a markdown table: one line per model, the headline number of each defense."""
    header = ("| model | CA | ASR | AC F1 (flagged) | SS F1 / ASR after | IF-features F1 | NC flagged (target) | "
              "STRIP FAR / FRR | Fine-Pruning ASR after | AC / SS / IF / unlearn ASR after |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    by_model: dict[str, dict[str, dict]] = {}
    for row in rows:
        by_model.setdefault(model_name(row), {})[row["defense"]] = row
    for name, cells in by_model.items():
        lines.append(_markdown_line(name, cells))
    rates = false_alarm_rates(rows)
    lines.append("")
    lines.append("False alarms over the clean models (share of clean models with any class or label flagged): "
                 + ", ".join(f"{k} {v:.0%}" for k, v in rates.items()) + ".")
    return "\n".join(lines)


def _markdown_line(name: str, cells: dict[str, dict]) -> str:
    """One model's line of :func:`to_markdown`; ``cells`` maps a defense to its row."""
    def cell(defense, key, digits=2):
        return format_cell(cells.get(defense, {}).get(key), digits)

    any_row = next(iter(cells.values()))
    target = "" if any_row["target"] is None else f" ({any_row['target']})"
    after = " / ".join(cell(d, "asr_after") for d in ("activation_clustering", "spectral_signatures",
                                                       "isolation_forest_features", "neural_cleanse"))
    return (f"| {name} | {format_cell(any_row['ca_before'], 3)} | {format_cell(any_row['asr_before'], 3)} | "
            f"{cell('activation_clustering', 'f1')} ({cell('activation_clustering', 'flagged')}) | "
            f"{cell('spectral_signatures', 'f1')} / {cell('spectral_signatures', 'asr_after')} | "
            f"{cell('isolation_forest_features', 'f1')} | {cell('neural_cleanse', 'flagged')}{target} | "
            f"{cell('strip', 'far')} / {cell('strip', 'frr')} | {cell('fine_pruning', 'asr_after')} | {after} |")


def family_order(row: dict) -> tuple:
    """Sort key: trigger family (in :data:`FAMILIES` order), then poisoning rate, then seed."""
    family = FAMILIES.index(row["trigger"]) if row["trigger"] in FAMILIES else len(FAMILIES)
    return family, row["rate"], row["seed"]


def cells(rows: list[dict], models: list[str], columns: dict, percent=()) -> list[dict]:
    """A short table of chosen cells: one dict per model in ``models`` (names as :func:`model_name`
    gives them), one column per ``columns`` entry, ``{title: (defense, key)}``, formatted with
    :func:`.scoring.format_cell`, or as a percentage with one decimal for the titles in
    ``percent`` (rates). For the few cells a text discusses, instead of the whole matrix."""
    by_cell = {(model_name(r), r["defense"]): r for r in rows}
    missing = [m for m in models if not any(name == m for name, _ in by_cell)]
    if missing:
        raise ValueError(f"models must be models of the matrix, not found: {missing}")
    unknown = [title for title in percent if title not in columns]
    if unknown:
        raise ValueError(f"percent must name titles of columns, not found: {unknown}")

    def shown(title, value):
        return f"{100 * value:.1f}%" if title in percent and isinstance(value, float) else format_cell(value)
    return [{"model": m, **{title: shown(title, by_cell.get((m, defense), {}).get(key))
                            for title, (defense, key) in columns.items()}} for m in models]


def verdicts(rows: list[dict], family: str, rate: float) -> dict[str, list[str]]:
    """What each defense did on one backdoored model of the matrix: ``caught`` (sample detector
    F1 >= 0.5, Neural Cleanse flagged the true target, STRIP let at most 10% of triggered
    inputs through) and ``repaired`` (ASR <= 10% after the mitigation). A Neural Cleanse repair
    that followed flags of *other* labels only is listed as ``repaired_by_chance``: the
    unlearning fine-tune removed the backdoor, the detection did not find it."""
    model = [r for r in rows if r["trigger"] == family and r["rate"] == rate]
    if not model:
        raise ValueError(f"family and rate must name a model of the matrix, got {family!r} at {rate!r}")
    out = {"caught": [], "repaired": [], "repaired_by_chance": []}
    for r in sorted(model, key=lambda r: DETECTORS.index(r["defense"])):
        found_target = r["defense"] == "neural_cleanse" and r["target"] in r["flagged"]
        if (r["f1"] or 0) >= 0.5 or found_target or (r["far"] is not None and r["far"] <= 0.1):
            out["caught"].append(r["defense"])
        if r["asr_after"] is not None and r["asr_after"] <= 0.1:
            lucky = r["defense"] == "neural_cleanse" and not found_target
            out["repaired_by_chance" if lucky else "repaired"].append(r["defense"])
    return out


def plot(rows: list[dict]):
    """Two heat maps: detection (F1 / 1 - FAR / target flagged) and the ASR before any defense,
    then after each mitigation (three places: the verdicts' threshold is ASR <= 0.10). Rows run
    by trigger family, then poisoning rate; clean models have no cell to show."""
    from .plots import plot_matrix

    backdoored = sorted((r for r in rows if r["trigger"] != "clean"), key=family_order)
    detection = {(model_name(r), r["defense"]): detection_value(r) for r in backdoored
                 if r["defense"] != "fine_pruning"}
    before = {(model_name(r), "ASR before (no defense)"): r["asr_before"] for r in backdoored if r["defense"] == "strip"}
    asr_after = {**before, **{(model_name(r), r["defense"]): r["asr_after"] for r in backdoored}}
    return (plot_matrix(detection, title="Detection: F1 (sample detectors), 1 - FAR at FRR 1% (STRIP), "
                                         "true target flagged (Neural Cleanse)", value_label="detection (1 = perfect)"),
            plot_matrix(asr_after, title="Attack success rate after each mitigation (retraining, unlearning, "
                                         "Fine-Pruning; STRIP: behind the filter)",
                        value_label="ASR after (0 = backdoor gone)", digits=3))


def main(argv=None) -> int:
    """``bench matrix [--fast] [--json] [--workers N]``."""
    parser = argparse.ArgumentParser(prog="python -m course_lib bench matrix",
                                     description="Every detector on many backdoored and clean models.")
    parser.add_argument("--fast", action="store_true", help="3 trigger families at 5%%, 2 clean models")
    parser.add_argument("--json", action="store_true", help="one JSON object per (model, defense) per line")
    parser.add_argument("--workers", type=int, default=2, help="processes, one thread each (default 2)")
    args = parser.parse_args(argv)
    from .compare import print_end, row_printer

    start = time.perf_counter()
    rows = run_matrix(fast=args.fast, workers=args.workers, on_row=row_printer(args.json))
    total = {"defense": "total", "models": len(plan(args.fast)), "rows": len(rows),
             "seconds": round(time.perf_counter() - start, 1), "workers": args.workers}
    print_end(rows, total, as_json=args.json, markdown=to_markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
