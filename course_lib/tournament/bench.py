"""``python -m course_lib tournament bench``: what a tournament costs, and checks that its scores are honest.

It writes a synthetic class into a fresh course folder, as autograding leaves one (cached
verdicts and the handed-in model's metadata; the notebooks are real and run sandboxed):
honest triggers at different places and blended noise patterns, honest Activation Clustering
detectors, and the broken and hostile entrants the tournament must survive (a detector that
flags everything, one that crashes, one that hangs, one that hunts the grader's files for the
ground truth, one that answers in the wrong shape, one that flags at random, a trigger too
faint to plant a backdoor). It runs the real tournament on it and prints:

- the cost of each kind of cell (an arena, a house detector on an arena, a student's detector
  on an arena, the model-level defenses on an arena) and the whole run;
- the projected time of a class of 300 on 16 cores (every detector on every arena), and, if
  that is over 30 minutes, the schedule that fits: every detector on every house arena and a
  stated number of student arenas drawn at random, with the rank uncertainty it costs;
- the honesty checks: the house Activation Clustering's F1 on each house arena beside the
  detection matrix's recorded F1 for the same family at the same poisoning rate
  (docs/detection_matrix.jsonl), the always-flag control's Detection Score (exactly 0) and the
  random control's (about 0).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import nbformat
import numpy as np

from ..checkpoints import save_checkpoint
from ..models import model_for
from . import scoring

MATRIX = Path(__file__).resolve().parents[2] / "docs" / "detection_matrix.jsonl"
TRIGGER_NAMES = {"patch": "trigger_patch", "faint": "trigger_blend", "too_weak": "trigger_custom"}


def trigger_source(kind: str, variant: int = 0) -> str:
    """A student's trigger cell: a white 4x4 square at a place chosen by ``variant``, a noise pattern
    (drawn with seed ``variant``) blended at alpha 0.2, or a one-level change of one pixel (too faint
    to plant a backdoor)."""
    if kind == "patch":
        row, col = 1 + 4 * (variant % 6), 1 + 4 * ((variant // 6) % 6)
        return (f"def trigger_patch(images):\n    out = images.clone()\n"
                f"    out[..., {row}:{row + 4}, {col}:{col + 4}] = 1.0\n    return out\n")
    if kind == "faint":
        return ("import torch\n"
                f"_P = torch.rand(1, 28, 28, generator=torch.Generator().manual_seed({variant}))\n"
                "def trigger_blend(images):\n    return (0.8 * images + 0.2 * _P).clamp(0, 1)\n")
    if kind == "too_weak":
        return ("def trigger_custom(images):\n    out = images.clone()\n"
                "    out[..., 14, 14] = (out[..., 14, 14] + 1 / 255).clamp(0, 1)\n    return out\n")
    raise ValueError(f"kind must be one of {tuple(TRIGGER_NAMES)}, got {kind!r}")


DETECTORS = {
    # the lecture's Activation Clustering: 2-means per class on 10 PCA components, the smaller
    # cluster flagged when it holds at most 35% of the class and the split is clear (silhouette)
    "honest": ("import numpy as np\nfrom sklearn.cluster import KMeans\nfrom sklearn.decomposition import PCA\n"
               "from sklearn.metrics import silhouette_score\n"
               "def activation_clustering(activations, labels):\n"
               "    flags = np.zeros(len(labels), dtype=bool)\n"
               "    for c in np.unique(labels):\n"
               "        idx = np.flatnonzero(labels == c)\n"
               "        x = PCA(10, random_state=0).fit_transform(activations[idx])\n"
               "        k = KMeans(2, n_init=3, random_state=0).fit(x).labels_\n"
               "        small = np.bincount(k, minlength=2).argmin()\n"
               "        if (k == small).mean() <= 0.35 and silhouette_score(x, k, sample_size=1000,\n"
               "                                                          random_state=0) > 0.4:\n"
               "            flags[idx[k == small]] = True\n"
               "    return flags\n"),
    "wrong_shape": ("import numpy as np\ndef activation_clustering(activations, labels):\n"
                    "    return np.zeros(len(labels) - 1, dtype=bool)\n"),
    "always": ("import numpy as np\ndef activation_clustering(activations, labels):\n"
               "    return np.ones(len(labels), dtype=bool)\n"),
    "random": ("import numpy as np\ndef activation_clustering(activations, labels):\n"
               "    return np.random.default_rng(len(labels)).random(len(labels)) < 0.5\n"),
    "crash": "def activation_clustering(activations, labels):\n    raise RuntimeError('my detector is broken')\n",
    "hang": "def activation_clustering(activations, labels):\n    while True:\n        pass\n",
    # {cache} is the grader's private folder: if an arena's file were visible, this would return its truth
    "reader": ("import glob, numpy as np\n"
               "def activation_clustering(activations, labels):\n"
               "    for path in glob.glob('{cache}/**/arena.safetensors', recursive=True):\n"
               "        from safetensors.numpy import load_file\n"
               "        truth = load_file(path)['truth']\n"
               "        if truth.shape == labels.shape:\n"
               "            return truth.astype(bool)\n"
               "    return np.zeros(len(labels), dtype=bool)\n"),
}
# cycled over the synthetic class: (trigger kind or None, witness passed, detector or None, planted passed)
TEMPLATES = [("patch", True, "honest", True), ("faint", True, "honest", True), ("patch", True, "always", True),
             ("patch", True, "crash", True), (None, False, "hang", True), ("faint", True, "reader", True),
             ("too_weak", True, "random", True), ("patch", True, "wrong_shape", True)]


def _notebook(path: Path, source: str) -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("homework"), nbformat.v4.new_code_cell(source)]
    test = nbformat.v4.new_code_cell("raise AssertionError('a test cell never runs in the sandbox')")
    test.metadata["nbgrader"] = {"grade": True, "solution": False, "grade_id": "t", "points": 1}
    nb.cells.append(test)
    nbformat.write(nb, path)


def _verdict(path: Path, test: str, passed: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"key": "synthetic", "cells": {}, "seconds": 0, "sandbox_seconds": 0, "usage": {},
                                "note": "", "verdicts": {test: {"passed": passed,
                                                                "message": "" if passed else "synthetic failure"}}}))


def write_class(course: Path, students: dict, assignment: str = "week4") -> Path:
    """Write ``students`` ({id: (trigger kind or None, witness passed, detector or None, planted passed,
    variant)}) into ``course`` as autograding leaves them; returns ``course``."""
    course = Path(course)
    cache = course / ".autograde" / assignment / "tournament"
    for student, (trigger, attack_ok, detector, detector_ok, variant) in students.items():
        folder = course / "submitted" / student / assignment
        folder.mkdir(parents=True, exist_ok=True)
        results = course / ".autograde" / assignment / "results" / student
        results.mkdir(parents=True, exist_ok=True)
        if trigger:
            _notebook(folder / "part1_attack.ipynb", trigger_source(trigger, variant))
            save_checkpoint(model_for("fashion-mnist", seed=0), folder / "backdoor_model.safetensors",
                            dataset="fashion-mnist", classes=[str(i) for i in range(10)],
                            extra={"trigger": TRIGGER_NAMES[trigger]})
            _verdict(results / "part1_attack.json", "p1-test-trigger-poisons", attack_ok)
        if detector:
            _notebook(folder / "part2_detection.ipynb", DETECTORS[detector].replace("{cache}", str(cache)))
            _verdict(results / "part2_detection.json", "p2-test-planted", detector_ok)
    return course


def synthetic_class(count: int) -> dict:
    """``count`` students cycling through :data:`TEMPLATES`."""
    return {f"s{i:03d}": (*TEMPLATES[i % len(TEMPLATES)], i) for i in range(count)}


def recorded_f1(family: str, rate: float) -> list[float]:
    """The detection matrix's F1 of the kit's Activation Clustering on ``family`` at ``rate``."""
    rows = [json.loads(line) for line in MATRIX.read_text().splitlines() if line.strip()]
    return [r["f1"] for r in rows if r.get("defense") == "activation_clustering" and r.get("trigger") == family
            and r.get("rate") == rate and r.get("f1") is not None]


def _median(values) -> float:
    return statistics.median(values) if values else float("nan")


def report(results: dict, timings: dict, workers: int, students: int = 300, cores: int = 16,
           budget_minutes: float = 30.0) -> list[str]:
    """The bench's lines: costs, the projection, the honesty checks."""
    from .matches import TOURNAMENT_RATE
    cells, arenas = results["cells"], results["arenas"]
    house = [c for c in cells if c["detector"].startswith(("house:", "control:"))]
    student = [c for c in cells if not c["detector"].startswith(("house:", "control:"))]
    arena_s = _median([a["seconds"] for a in results["arena_summaries"]])
    house_s = _median([c["seconds"] for c in house])
    student_s = _median([c["seconds"] for c in student if not c["error"]])
    model_s = _median([m["seconds"] for m in results["model_defenses"]]) if results["model_defenses"] else 0.0
    n_house = sum(a["name"].startswith("house:") for a in arenas)
    lines = [f"class: {len(results['paragraphs'])} students; {len(arenas)} arenas ({n_house} house) x "
             f"{len(results['detectors'])} detectors = {len(cells)} cells; {workers} workers",
             f"whole run: {timings['total']:.0f} s (arenas {timings['arenas']:.0f} s, cells {timings['cells']:.0f} s, "
             f"model-level {timings['model_defenses']:.0f} s)",
             f"per cell (median, seconds of one worker): arena {arena_s:.1f}; house detector on an arena "
             f"{house_s:.2f}; student detector on an arena {student_s:.2f} (its sandbox's time shared over its "
             f"arenas); model-level defenses on an arena {model_s:.1f}"]
    # class of `students`: each attack enters (an arena), each detector enters (a sandbox over all arenas)
    n_arenas, n_detectors = students + n_house, students
    full = (n_arenas * (arena_s + model_s + 4 * house_s) + n_detectors * n_arenas * student_s) / cores / 60
    lines.append(f"projected class of {students} on {cores} cores, full matrix ({n_arenas} arenas x "
                 f"{n_detectors + 4} detectors): {full:.1f} min (target <= {budget_minutes:g})")
    if full > budget_minutes:
        fixed = n_arenas * (arena_s + model_s + 4 * house_s) / cores / 60
        per_arena = n_detectors * student_s / cores / 60
        drawn = int((budget_minutes - fixed) / per_arena) - n_house
        if drawn < 0:
            lines.append(f"no schedule fits: the {n_arenas} arenas and their model-level defenses alone take "
                         f"{fixed:.1f} min")
        else:
            lines.append(f"schedule that fits: every detector on the {n_house} house arenas and {drawn} student "
                         f"arenas drawn at random: {fixed + per_arena * (n_house + drawn):.1f} min")
    matrix = scoring.score_matrix(cells, [a["name"] for a in arenas], results["detectors"])
    widths = [r["rank_high"] - r["rank_low"] for r in results["detector_board"]]
    lines.append(f"rank uncertainty here ({len(arenas)} arenas): mean 90% interval width {np.mean(widths):.1f} "
                 f"ranks over {len(widths)} detectors")
    lines.append(f"honesty: house Activation Clustering F1 on the house arenas vs the detection matrix "
                 f"(same family, rate {TOURNAMENT_RATE}):")
    for c in cells:
        if c["detector"] == "house:activation_clustering" and c["arena"].startswith("house:") and c["f1"] is not None:
            family = c["arena"].split(":", 1)[1]
            recorded = recorded_f1(family, TOURNAMENT_RATE)
            lines.append(f"  {family}: tournament {c['f1']:.3f}, matrix {', '.join(f'{v:.3f}' for v in recorded)}")
    j = results["detectors"].index("control:always_flag")
    lines.append(f"honesty: always-flag control Detection Score on every arena: "
                 f"{', '.join(f'{v:g}' for v in sorted(set(matrix[:, j].tolist())))}")
    k = results["detectors"].index("control:random")
    lines.append(f"honesty: random-flag control Detection Score: mean {np.nanmean(matrix[:, k]):+.3f}, range "
                 f"{np.nanmin(matrix[:, k]):+.3f} to {np.nanmax(matrix[:, k]):+.3f}")
    return lines


def main(argv=None) -> None:
    from .command import run_tournament
    parser = argparse.ArgumentParser(prog="python -m course_lib tournament bench", description=__doc__.split("\n")[0])
    parser.add_argument("--students", type=int, default=30, help="size of the synthetic class (default 30)")
    parser.add_argument("--workers", type=int, default=2, help="jobs at once (default 2)")
    parser.add_argument("--call-timeout", type=float, default=10.0, help="seconds per student call (default 10)")
    parser.add_argument("--house", default=None, help="house families, comma-separated (default: all)")
    parser.add_argument("--no-model-defenses", action="store_true", help="skip the model-level defenses")
    parser.add_argument("--course", type=Path, default=None, help="keep the synthetic course here (default: a "
                                                                  "temporary folder)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tournament-bench-") as tmp:
        course = write_class(args.course or Path(tmp) / "course", synthetic_class(args.students))
        timings, extra = {}, {}
        if args.house:
            extra["house"] = tuple(args.house.split(","))
        start = time.perf_counter()
        results = run_tournament(course, "week4", workers=args.workers, call_timeout=args.call_timeout, names=True,
                                 model_defenses=not args.no_model_defenses, timings=timings, **extra)
        timings["total"] = time.perf_counter() - start
        for line in report(results, timings, args.workers):
            print(line)
