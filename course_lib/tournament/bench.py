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
import dataclasses
import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import nbformat
import numpy as np

from ..checkpoints import save_checkpoint
from ..models import model_for
from . import scoring

MATRIX = Path(__file__).resolve().parents[2] / "docs" / "detection_matrix.jsonl"
TRIGGER_NAMES = {"patch": "trigger_patch", "faint": "trigger_blend", "too_weak": "trigger_custom",
                 "reference": "trigger_patch", "kit_sig": "trigger_custom", "kit_corners": "trigger_custom"}
SOLUTIONS = Path(__file__).resolve().parents[2] / "solutions" / "week4"


def _solution_source(notebook: str, names: tuple[str, ...]) -> str:
    """The code cells of the reference solution (``solutions/week4/<notebook>``) that define ``names``,
    with the imports they need."""
    nb = nbformat.read(SOLUTIONS / f"{notebook}.ipynb", as_version=4)
    cells = [c.source for c in nb.cells if c.cell_type == "code" and any(f"def {n}(" in c.source for n in names)]
    imports = ("import numpy as np\nimport torch\nfrom sklearn.cluster import KMeans\n"
               "from sklearn.decomposition import PCA\n")
    return imports + "\n\n".join(cells) + "\n"


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
    if kind == "reference":      # the reference solution's three triggers; its model records trigger_patch
        return _solution_source("part1_attack", ("trigger_patch", "trigger_blend", "trigger_custom"))
    if kind == "kit_sig":        # a student who calls the kit's own family, stronger than the detection matrix's
        return ("from course_lib.triggers import SIGTrigger\n_SIG = SIGTrigger(delta=0.12)\n"
                "def trigger_custom(images):\n    return _SIG(images).clamp(0, 1)\n")
    if kind == "kit_corners":
        return ("from course_lib.triggers import DistributedTrigger\n_T = DistributedTrigger()\n"
                "def trigger_custom(images):\n    return _T(images)\n")
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
    "reference": None,      # the reference solution's activation_clustering (solutions/week4/part2_detection)
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
TEMPLATES = [("reference", True, "reference", True), ("patch", True, "honest", True),
             ("kit_sig", True, "reference", True), ("faint", True, "honest", True), ("patch", True, "always", True),
             ("kit_corners", True, "crash", True),
             (None, False, "hang", True), ("faint", True, "reader", True), ("too_weak", True, "random", True),
             ("patch", True, "wrong_shape", True)]


def detector_source(kind: str, cache: Path) -> str:
    """A student's detector cell of ``kind`` (:data:`DETECTORS`); ``cache`` is what the file reader hunts."""
    if kind == "reference":
        return _solution_source("part2_detection", ("split_class", "activation_clustering", "gap_ratio"))
    return DETECTORS[kind].replace("{cache}", str(cache))


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
            _notebook(folder / "part2_detection.ipynb", detector_source(detector, cache))
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


@dataclass
class Costs:
    """What one tournament's jobs cost, in seconds of one worker (one core), measured by the bench."""

    student_arena: float     # a student's arena: its trigger's sandbox, then the grader's training
    house_arena: float       # a house family's arena (the clean-label one trains a surrogate too)
    clean: float             # the recipe without poison (once per poisoning rate)
    startup: float           # a sandbox's start-up: kernel, the notebook's cells, the warm-up call
    per_call: float          # a student detector on one more arena, inside its sandbox
    house_cell: float        # a house detector or control on one arena
    model: float             # the three model-level defenses on one arena (0 when not run)
    house_arenas: int
    house_detectors: int = 4
    rates: int = 1


def measured_costs(results: dict) -> Costs:
    """Per-job costs from a tournament's results: medians over its arenas and cells."""
    summaries, cells = results["arena_summaries"], results["cells"]
    student_arenas = [a for a in summaries if not a["name"].startswith("house:")]
    house_arenas = [a for a in summaries if a["name"].startswith("house:")]
    startup = _median([a["sandbox_seconds"] for a in student_arenas if "sandbox_seconds" in a])
    sandboxes = {}
    for c in cells:
        if "sandbox_seconds" in c and c["calls"]:
            sandboxes.setdefault(c["detector"], []).append(c)
    # the cost of a working detector (no error, a mean Detection Score of at least 0.5), as most of a class's are
    working = [g for g in sandboxes.values() if not any(c["error"] for c in g)
               and np.mean([c["score"] for c in g]) >= 0.5] or [g for g in sandboxes.values()
                                                               if not any(c["error"] for c in g)]
    per_call = _median([max(0.0, g[0]["sandbox_seconds"] - startup) / g[0]["calls"] for g in working])
    house_cells = [c["seconds"] for c in cells if c["detector"].startswith(("house:", "control:"))]
    model = _median([m["seconds"] for m in results["model_defenses"]]) if results["model_defenses"] else 0.0
    return Costs(student_arena=_median([a["seconds"] for a in student_arenas]),
                 house_arena=_median([a["seconds"] for a in house_arenas]),
                 clean=_median([a["seconds"] for a in house_arenas if a["name"] != "house:clean_label"]),
                 startup=startup, per_call=per_call, house_cell=_median(house_cells), model=model,
                 house_arenas=len(house_arenas), rates=len({a.get("rate") for a in summaries}))


def _phase(jobs: list[float], cores: int) -> float:
    """Seconds to run ``jobs`` on ``cores`` workers, longest first: at least the total over the cores, and
    at least the longest job."""
    return max(sum(jobs) / cores, max(jobs, default=0.0))


def projected_minutes(costs: Costs, students: int, cores: int, student_arenas: int | None = None,
                      overhead: float = 0.0) -> float:
    """Minutes for a class of ``students`` (every one entering an attack and a detector) on ``cores`` workers:
    the arenas, then the cells and model-level defenses; ``student_arenas`` None is the full matrix, a number
    the schedule. ``overhead``: seconds a distributed scheduler adds to each job."""
    arenas = students + costs.house_arenas
    met = costs.house_arenas + (students if student_arenas is None else min(student_arenas, students))
    first = [costs.student_arena + overhead] * students + [costs.house_arena + overhead] * costs.house_arenas \
        + [costs.clean + overhead] * costs.rates
    second = [costs.startup + met * costs.per_call + overhead] * students + [costs.model + overhead] * arenas \
        + [costs.house_detectors * costs.house_cell + overhead] * arenas
    return (_phase(first, cores) + _phase(second, cores)) / 60


def fitting_schedule(costs: Costs, students: int, cores: int, budget: float) -> int | None:
    """The most student arenas per detector that keep the class within ``budget`` minutes (None: not even 0)."""
    if projected_minutes(costs, students, cores, 0) > budget:
        return None
    low, high = 0, students
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if projected_minutes(costs, students, cores, middle) <= budget else (low, middle - 1)
    return low


def schedule_uncertainty(results: dict, share: float, draws: int = 5) -> tuple[float, float, int]:
    """The rank uncertainty a schedule costs, measured on this tournament's cells: the mean width of the
    detectors' 90% rank intervals with every cell played, and with only a schedule's ``share`` of the
    student arenas played (averaged over ``draws`` draws); also how many student arenas that is here."""
    from .detectors import CONTROLS, HOUSE_DETECTORS
    from .matches import schedule
    arenas = [a["name"] for a in results["arenas"]]
    detectors = results["detectors"]
    matrix = scoring.score_matrix(results["cells"], arenas, detectors)
    played = scoring.played_matrix(results["cells"], arenas, detectors)
    width = lambda p: float(np.mean([r["rank_high"] - r["rank_low"] for r in  # noqa: E731
                                     scoring.detector_board(matrix, arenas, detectors, played=p, seed=0)]))
    full = width(played)
    students = [a for a in arenas if not a.startswith("house:")]
    k = max(1, round(share * len(students))) if students else 0
    widths = []
    for draw in range(draws):
        chosen = schedule(students, [d for d in detectors if d not in HOUSE_DETECTORS + CONTROLS], k, draw)
        mask = played.copy()
        for j, d in enumerate(detectors):
            if d in chosen:
                mask[:, j] &= np.array([a.startswith("house:") or a in set(chosen[d]) for a in arenas])
        widths.append(width(mask))
    return full, float(np.mean(widths)), k


def report(results: dict, timings: dict, workers: int, students: int = 300, cores: int = 16,
           budget_minutes: float = 30.0, dask_cores=(64, 128), dask_overhead: float = 0.05) -> list[str]:
    """The bench's lines: costs, the projections (full matrix and schedule), the honesty checks."""
    from .matches import TOURNAMENT_RATE
    cells, arenas = results["cells"], results["arenas"]
    costs = measured_costs(results)
    n_house = sum(a["name"].startswith("house:") for a in arenas)
    lines = [f"class: {len(results['paragraphs'])} students; {len(arenas)} arenas entered ({n_house} house) "
             f"x {len(results['detectors'])} detectors = {len(cells)} cells; {workers} workers",
             f"whole run: {timings['total']:.0f} s = {timings['total'] / 60:.1f} min (arenas "
             f"{timings['arenas']:.0f} s; "
             f"cells and model-level defenses {timings['cells']:.0f} s)",
             f"per job (median, seconds of one worker): student arena {costs.student_arena:.1f} (its trigger's "
             f"sandbox {costs.startup:.1f}); house arena {costs.house_arena:.1f}; a detector's sandbox start-up "
             f"{costs.startup:.1f} + {costs.per_call:.2f} per arena; house detector or control on an arena "
             f"{costs.house_cell:.2f}; model-level defenses on an arena {costs.model:.1f}"]
    sandboxes = {c["detector"]: c["sandbox_seconds"] for c in cells if "sandbox_seconds" in c}
    if sandboxes:
        costliest = max(sandboxes, key=sandboxes.get)
        lines.append(f"detector sandboxes: median {_median(list(sandboxes.values())):.0f} s, the costliest "
                     f"{sandboxes[costliest]:.0f} s ({costliest}; a detector that hangs costs two call time limits, "
                     f"then is not called again), together {sum(sandboxes.values()):.0f} s of {timings['total'] * workers:.0f} "
                     f"worker-seconds")
    full = projected_minutes(costs, students, cores)
    lines.append(f"projected class of {students} on {cores} cores, full matrix ({students + costs.house_arenas} "
                 f"arenas x {students + 4} detectors): {full:.1f} min (target <= {budget_minutes:g}: "
                 f"{'met' if full <= budget_minutes else 'missed'})")
    fits = fitting_schedule(costs, students, cores, budget_minutes)
    if costs.model:
        bare = dataclasses.replace(costs, model=0.0)
        lines.append(f"  without the model-level defenses: full matrix {projected_minutes(bare, students, cores):.1f} "
                     f"min; " + (f"schedule {fitting_schedule(bare, students, cores, budget_minutes)} student arenas "
                                 f"per "
                        f"detector fits {budget_minutes:g} min"
                        if fitting_schedule(bare, students, cores, budget_minutes) is not None else "no schedule fits"))
        if fits is None and fitting_schedule(bare, students, cores, budget_minutes) is not None:
            k = fitting_schedule(bare, students, cores, budget_minutes)
            base, scheduled, here = schedule_uncertainty(results, k / students)
            lines.append(f"  rank uncertainty that schedule costs, measured on this class ({here} of its student "
                         f"arenas per detector instead of all): mean 90% interval width of the detectors' ranks "
                         f"{base:.1f} -> "
                         f"{scheduled:.1f} ranks (of {len(results['detectors'])})")
    if fits is None:
        floor = projected_minutes(costs, students, cores, 0)
        lines.append(f"no schedule fits {budget_minutes:g} min on {cores} cores: the arenas, the house cells and the "
                     f"model-level defenses alone take {floor:.1f} min")
    else:
        k = min(fits, students)
        lines.append(f"schedule: every detector on the {costs.house_arenas} house arenas and {k} student arenas drawn "
                     f"at random (python -m course_lib tournament ... --student-arenas {k}): "
                     f"{projected_minutes(costs, students, cores, k):.1f} min on {cores} cores")
        base, scheduled, here = schedule_uncertainty(results, k / students)
        lines.append(f"rank uncertainty the schedule costs, measured on this class ({here} of its student arenas "
                     f"per detector instead of all): mean 90% interval width of the detectors' ranks {base:.1f} -> "
                     f"{scheduled:.1f} ranks (of {len(results['detectors'])})")
    for n in dask_cores:
        line = f"projected on a Dask cluster of {n} cores ({dask_overhead:g} s per job added): full matrix " \
               f"{projected_minutes(costs, students, n, overhead=dask_overhead):.1f} min"
        if fits is not None:
            line += f", the schedule {projected_minutes(costs, students, n, fits, overhead=dask_overhead):.1f} min"
        longest = costs.startup + (students + costs.house_arenas) * costs.per_call
        lines.append(line + f" (the longest job, one detector's sandbox over every arena, {longest / 60:.1f} min)")
    matrix = scoring.score_matrix(cells, [a["name"] for a in arenas], results["detectors"])
    widths = [r["rank_high"] - r["rank_low"] for r in results["detector_board"]]
    lines.append(f"rank uncertainty here ({len(arenas)} arenas): mean 90% interval width {np.mean(widths):.1f} "
                 f"ranks over {len(widths)} detectors")
    lines.append("house attacks (recipe: CA, the same recipe without poison, ASR; entered or why not):")
    for a in results["arena_summaries"]:
        if a["name"].startswith("house:"):
            shown = next((x for x in arenas if x["name"] == a["name"]), None)
            state = "entered" if a.get("entered") else f"not entered: {a.get('reason', '')[:160]}"
            clean = f", clean {shown['clean_ca']:.3f}" if shown else ""
            lines.append(f"  {a['name']}: rate {a.get('rate') or TOURNAMENT_RATE:g}, CA {a.get('ca', float('nan')):.3f}"
                         f"{clean}, ASR {a.get('asr', float('nan')):.3f}; {state}")
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
    parser.add_argument("--student-arenas", type=int, default=None, metavar="K",
                        help="play the schedule (K student arenas per detector) instead of the full matrix")
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
                                 model_defenses=not args.no_model_defenses, student_arenas=args.student_arenas,
                                 timings=timings, **extra)
        timings["total"] = time.perf_counter() - start
        for line in report(results, timings, args.workers):
            print(line)
