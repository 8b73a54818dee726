"""``python -m course_lib tournament ASSIGNMENT --course DIR``: the class tournament, after autograding.

Every entering attack (:mod:`.entrants`) gets an arena built by the grader (:mod:`.arenas`),
beside the house attacks; every entering detector meets every arena in its own sandbox,
beside the house detectors and two controls (:mod:`.matches`); the cells are scored
(:mod:`.scoring`) and published as a page with a CSV and a JSON of every cell (:mod:`.page`).
Jobs run in worker processes or on a Dask cluster; each result is cached in the grader's
private folder, ``<course>/.autograde/<assignment>/tournament/``, so a second run (or an
interrupted one) computes only what is missing. The tournament reads the gradebook's
autograding results and never writes them: it changes no grade.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import csv
import json
import os
import time
from pathlib import Path

from ..autograde import sandbox
from ..autograde.classroom import make_executor
from ..autograde.plan import TARGET
from ..checks import check_float, check_int
from ..homework.files import GradingFiles
from ..homework.rules import GradingFailure
from . import entrants as entry
from . import matches, page, pseudonyms, scoring
from .arenas import HOUSE_FAMILIES, load
from .detectors import CONTROLS, HOUSE_DETECTORS
from .student_code import fingerprint

CALL_TIMEOUT = 60.0


def _dataset(grading_folder: Path) -> str:
    try:
        return GradingFiles(grading_folder).dataset
    except GradingFailure:
        return "fashion-mnist"


def _run(executor, jobs: list) -> list:
    """Run ``(function, *args)`` jobs on ``executor``; results in the jobs' order."""
    futures = [executor.submit(*job) for job in jobs]
    cf.wait(futures)
    return [f.result() for f in futures]


def _paragraph(student: str, shown, board_d: dict, board_a: dict, not_entered: dict) -> str:
    parts = []
    attack = board_a.get(f"student:{student}")
    if attack:
        caught = ", ".join(shown(d) for d in attack["caught_by"]) or "none of them"
        parts.append(f"Your trigger evaded {attack['evaded']} of the {attack['answered']} detectors that answered on "
                     f"its arena (Detection Score below {scoring.EVADE_BAR}); caught by: {caught}. Among "
                     f"the attacks it ranks {attack['rank']} for stealth (90% interval {attack['rank_low']}-"
                     f"{attack['rank_high']}).")
    elif (student, "attack") in not_entered:
        parts.append(f"Your attack did not enter: {not_entered[(student, 'attack')]}")
    detector = board_d.get(f"student:{student}")
    if detector:
        parts.append(f"Your detector's mean Detection Score is {detector['mean_score']:.2f} over the arenas, rank "
                     f"{detector['rank']} (90% interval {detector['rank_low']}-{detector['rank_high']}); best on "
                     f"{shown(detector['best'])}, worst on {shown(detector['worst'])}"
                     + (f"; {detector['errors']} arenas gave no valid answer (errors count as 0)."
                        if detector["errors"] else "."))
    elif (student, "detector") in not_entered:
        parts.append(f"Your detector did not enter: {not_entered[(student, 'detector')]}")
    return " ".join(parts)


def run_tournament(course, assignment: str, *, out=None, workers: int = 1, dask_scheduler: str | None = None,
                   seed: int = 0, names: bool = False, call_timeout: float = CALL_TIMEOUT,
                   house: tuple = HOUSE_FAMILIES, model_defenses: bool = True, rate: float = matches.TOURNAMENT_RATE,
                   student_arenas: int | None = None, timings: dict | None = None) -> dict:
    """Run the tournament of ``assignment`` in the nbgrader ``course`` folder; returns the results
    (also written to ``out``: index.html, results.json, cells.csv). See the module docstring.

    ``student_arenas``: None plays the full matrix; a number plays the schedule for a big class, every
    detector on every house arena and that many student arenas drawn at random with the seed
    (:func:`.matches.schedule`)."""
    course = Path(course).resolve()
    check_int("workers", workers, 1)
    check_int("seed", seed, 0)
    check_float("call_timeout", call_timeout, 0, 3600, low_open=True)
    check_float("rate", rate, 0, 0.5, low_open=True)
    if student_arenas is not None:
        check_int("student_arenas", student_arenas, 0)
    if not set(house) <= set(HOUSE_FAMILIES):
        raise ValueError(f"house must name families among {HOUSE_FAMILIES}, got {house!r}")
    timings = {} if timings is None else timings
    start = time.perf_counter()
    grading_folder = course / "grading" / assignment
    out = Path(out) if out is not None else course / "tournament" / assignment
    version = matches.code_version()
    threads = max(1, (os.cpu_count() or 1) // workers)
    setting = matches.Setting(str(course / ".autograde" / assignment / "tournament"), _dataset(grading_folder),
                              seed, TARGET, float(call_timeout), threads, rate)
    people = entry.class_entrants(course, assignment)
    if any(not p.attack or not p.detector for p in people):     # a house-only tournament runs no student code
        ok, why = sandbox.available()
        if not ok:
            raise RuntimeError(f"the tournament runs student code only in a sandbox, and none can be made here: {why}")
    secret = pseudonyms.course_secret(grading_folder)

    def shown(name: str) -> str:
        if name.startswith("student:"):
            student = name.split(":", 1)[1]
            return student if names else pseudonyms.pseudonym(secret, student)   # ids: no colon (nbgrader)
        return name

    executor, client = make_executor(workers, dask_scheduler)
    try:
        arena_jobs = [(matches.build_arena, setting, name, matches.arena_key(setting, name, "", version),
                       matches.arena_seed(setting, name, "")) for name in (f"house:{f}" for f in house)]
        for p in people:
            if not p.attack:
                name, fp = f"student:{p.student}", fingerprint(p.folder, entry.ATTACK_NOTEBOOK) + p.trigger
                arena_jobs.append((matches.build_arena, setting, name, matches.arena_key(setting, name, fp, version),
                                   matches.arena_seed(setting, name, fp), str(p.folder), p.trigger))
        rates = sorted({matches.house_rate(f"house:{f}") for f in house} | {None}, key=lambda r: (r is not None, r))
        done = _run(executor, [(matches.clean_accuracy, setting, r) for r in rates] + arena_jobs)
        clean_ca, built = dict(zip(rates, done[:len(rates)])), done[len(rates):]
        built = [matches.enters(a, setting.recipe_at(a.get("rate")), clean_ca[a.get("rate")]) for a in built]
        timings["arenas"] = time.perf_counter() - start
        entered = [a for a in built if a["entered"]]
        house_names = list(HOUSE_DETECTORS + CONTROLS)
        dkeys = {n: matches.key("detector", n, version) for n in house_names}
        students = [p for p in people if not p.detector]
        house_arenas = [a for a in entered if a["name"].startswith("house:")]
        student_names = [a["name"] for a in entered if not a["name"].startswith("house:")]
        drawn = matches.schedule(student_names, [p.student for p in students],
                                 len(student_names) if student_arenas is None else student_arenas, seed)
        # the long jobs first (a student's sandbox over every arena, the model-level defenses), the house cells
        # last, all at once: no worker waits for a phase to end
        jobs = []
        for p in students:
            dkey = matches.key("detector", p.student, fingerprint(p.folder, entry.DETECTOR_NOTEBOOK), version)
            met = house_arenas + [a for a in entered if a["name"] in set(drawn[p.student])]
            jobs.append((matches.play_student, setting, f"student:{p.student}", dkey, str(p.folder), met))
        if model_defenses:
            from .model_defenses import defend
            jobs += [(defend, setting, a) for a in entered]
        jobs += [(matches.play_house, setting, a, house_names, dkeys) for a in entered]
        played = _run(executor, jobs)
        cells = [c for group in played[:len(students)] for c in group]
        defended = played[len(students):len(students) + (len(entered) if model_defenses else 0)]
        cells += [c for group in played[len(students) + len(defended):] for c in group]
        timings["cells"] = time.perf_counter() - start - timings["arenas"]
        timings["model_defenses"] = 0.0      # played beside the cells: each row's own seconds say its cost
    finally:
        executor.shutdown(wait=True)
        if client is not None:
            client.close()

    arena_names = [a["name"] for a in entered]
    detector_names = house_names + [f"student:{p.student}" for p in students]
    matrix = scoring.score_matrix(cells, arena_names, detector_names)
    met = scoring.played_matrix(cells, arena_names, detector_names)
    board_d = scoring.detector_board(matrix, arena_names, detector_names, seed=seed, played=met)
    board_a = scoring.attack_board(matrix, arena_names, detector_names, seed=seed, controls=CONTROLS, played=met)
    not_entered = [{"name": a["name"], "side": "attack", "reason": a["reason"]} for a in built if not a["entered"]]
    not_entered += [{"name": f"student:{p.student}", "side": "attack", "reason": p.attack} for p in people if p.attack]
    not_entered += [{"name": f"student:{p.student}", "side": "detector", "reason": p.detector}
                    for p in people if p.detector]
    reasons = {(n["name"].split(":", 1)[1], n["side"]): n["reason"] for n in not_entered}
    by_d, by_a = {r["detector"]: r for r in board_d}, {r["arena"]: r for r in board_a}

    out.mkdir(parents=True, exist_ok=True)
    (out / "examples").mkdir(exist_ok=True)
    listed = []
    for n, a in enumerate(entered):
        arena = load(setting.arena_folder(a["key"]))
        file = f"attack{n}.png"
        page.example(arena.example, out / "examples" / file)
        listed.append({k: a[k] for k in ("name", "ca", "asr", "stealth")} | {"file": file, "info": arena.info,
                                                                           "clean_ca": clean_ca[a.get("rate")]})
    page.heatmap(matrix, [shown(a) for a in arena_names], [shown(d) for d in detector_names], out / "heatmap.png",
                 played=met)
    results = {"assignment": assignment, "seed": seed, "target": TARGET, "code": version, "dataset": setting.dataset,
               "recipe": {k: getattr(setting.recipe, k) for k in ("train_images", "rate", "epochs", "batch_size")},
               "evade_bar": scoring.EVADE_BAR, "arenas": listed,
               "schedule": (None if student_arenas is None
                            else {"student_arenas": student_arenas, "house_arenas": len(house_arenas)}),
               "detectors": detector_names,
               "cells": cells, "detector_board": board_d, "attack_board": board_a, "not_entered": not_entered,
               "model_defenses": defended, "arena_summaries": built,
               "paragraphs": [{"name": f"student:{p.student}",
                               "text": _paragraph(p.student, shown, by_d, by_a, reasons)} for p in people]}
    public = _public(results, shown)
    (out / "results.json").write_text(json.dumps(public, indent=1))
    with open(out / "cells.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["arena", "detector", "tpr", "fpr", "score", "f1", "flagged",
                                                    "error", "seconds", "sandbox_seconds", "calls"])
        writer.writeheader()
        writer.writerows(public["cells"])
    page.render(results, shown, out)
    timings["total"] = time.perf_counter() - start
    return results


def _public(results: dict, shown) -> dict:
    """The results with every student name as shown on the page (pseudonyms unless --names)."""
    def walk(value):
        if isinstance(value, str):
            return shown(value)
        if isinstance(value, list):
            return [walk(v) for v in value]
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        return value
    return walk(results)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m course_lib tournament", description=__doc__.split("\n\n")[0])
    parser.add_argument("assignment", help="the nbgrader assignment, e.g. week4")
    parser.add_argument("--course", type=Path, default=Path("."), help="the nbgrader course folder (default: .)")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                        help="jobs at once (default: half the cores)")
    parser.add_argument("--dask-scheduler", default=None, metavar="ADDRESS", help="run the jobs on a Dask cluster")
    parser.add_argument("--out", type=Path, default=None, help="where the page goes (default: COURSE/tournament/"
                                                               "ASSIGNMENT)")
    parser.add_argument("--names", action="store_true", help="show student ids instead of pseudonyms")
    parser.add_argument("--seed", type=int, default=0, help="the tournament seed (default 0)")
    parser.add_argument("--call-timeout", type=float, default=CALL_TIMEOUT,
                        help="seconds for one student call (a trigger on the pool, a detector on one arena)")
    parser.add_argument("--house", default=",".join(HOUSE_FAMILIES), help="house attack families, comma-separated")
    parser.add_argument("--no-model-defenses", action="store_true", help="skip Neural Cleanse, STRIP, Fine-Pruning")
    parser.add_argument("--student-arenas", type=int, default=None, metavar="K",
                        help="a big class's schedule: each detector meets every house arena and K student arenas drawn "
                             "at random with the seed (default: every arena, the full matrix)")
    args = parser.parse_args(argv)
    timings = {}
    try:
        results = run_tournament(args.course, args.assignment, out=args.out, workers=args.workers,
                                 dask_scheduler=args.dask_scheduler, seed=args.seed, names=args.names,
                                 call_timeout=args.call_timeout, house=tuple(filter(None, args.house.split(","))),
                                 model_defenses=not args.no_model_defenses, student_arenas=args.student_arenas,
                                 timings=timings)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as err:
        parser.error(str(err))
    out = args.out or Path(args.course) / "tournament" / args.assignment
    print(f"{len(results['arenas'])} arenas x {len(results['detectors'])} detectors, "
          f"{sum(c['error'] != '' for c in results['cells'])} error cells, {len(results['not_entered'])} not entered; "
          f"{timings['total']:.1f} s (arenas {timings['arenas']:.1f}, cells and model-level defenses "
          f"{timings['cells']:.1f}); page: {out / 'index.html'}")
