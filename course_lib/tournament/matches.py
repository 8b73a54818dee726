"""The tournament's work, cut into jobs that run anywhere and are cached by their inputs.

Two kinds of job, each a plain function of plain arguments (so that worker processes or a
Dask cluster can run them, :func:`course_lib.autograde.classroom.make_executor`):

- :func:`build_arena`: one attack's arena (a student's trigger applied in the sandbox first);
- :func:`play_house` and :func:`play_student`: detectors on arenas. The house detectors and
  the controls run here; a student's detector runs in one sandbox per student, one call per
  arena, each with its own time limit.

Every result is written as soon as it exists, under a key that hashes everything it depends
on (the tournament seed, the recipe, the student's code, the kit's code): an interrupted
tournament resumes from the cells already done, and a changed input is always recomputed.
The ground truth is read here, in the grader's process, and never written where a sandbox
can see it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..homework import witness
from ..homework.rules import GradingFailure
from . import arenas, detectors, student_code
from .entrants import ATTACK_NOTEBOOK, DETECTOR_NOTEBOOK
from .scoring import score_flags

#: The arenas poison 5% of their training set (the grader's witness run poisons 20%, to certify
#: a trigger with a margin): at 20% the poisoned images are two thirds of the target class, and
#: Activation Clustering's premise, a poisoned minority in its class (Chen et al. 2018), fails by
#: construction. 5% is the detection matrix's middle rate, so the house detectors' scores compare.
TOURNAMENT_RATE = 0.05

KIT = Path(__file__).resolve().parents[1]
CODE_FILES = ("tournament/arenas.py", "tournament/detectors.py", "tournament/matches.py",
              "tournament/model_defenses.py", "tournament/scoring.py", "tournament/student_code.py",
              "homework/*.py", "attacks.py", "train.py", "models.py", "data.py", "triggers/*.py",
              "defenses/activation_clustering.py", "defenses/spectral_signatures.py", "defenses/neural_cleanse.py",
              "defenses/strip.py", "defenses/fine_pruning.py",
              *(f"autograde/{name}.py"
                for name in ("sandbox", "resources", "pipeline", "harvest", "calls", "verdicts")))


def code_version() -> str:
    """A hash of the code a cell's result depends on: change it and every cell is computed again."""
    digest = hashlib.sha256()
    for pattern in CODE_FILES:
        for path in sorted(KIT.glob(pattern)):
            digest.update(path.read_bytes())
    return digest.hexdigest()


def key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def set_threads(threads: int) -> None:
    """This worker's share of the cores, for torch and every OpenMP/BLAS pool."""
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[name] = str(threads)
    torch.set_num_threads(threads)
    from threadpoolctl import threadpool_limits
    threadpool_limits(threads)


@dataclass(frozen=True)
class Setting:
    """What every job of one tournament shares."""

    cache: str              # the grader's private folder: arenas (with their ground truth) and cells
    dataset: str
    seed: int
    target: int
    call_timeout: float
    threads: int = 1
    rate: float = TOURNAMENT_RATE   # share of the arena's training set poisoned

    @property
    def recipe(self) -> witness.Recipe:
        """The grader's recipe for the dataset, at the tournament's poisoning rate."""
        return self.recipe_at(None)

    def recipe_at(self, rate: float | None) -> witness.Recipe:
        """The grader's recipe at poisoning ``rate`` (None: the tournament's rate; a house family may state its own)."""
        return dataclasses.replace(witness.recipe_for(self.dataset), rate=self.rate if rate is None else rate)

    def pool(self, rate: float | None = None) -> witness.Pool:
        """The tournament's pool (drawn with its seed) sized for the recipe at ``rate``."""
        return witness.draw_pool(witness.mixed_splits(self.dataset), target=self.target, seed=self.seed,
                                 recipe=self.recipe_at(rate))

    def arena_folder(self, arena_key: str) -> Path:
        return Path(self.cache) / "arenas" / arena_key

    def cell_file(self, arena_key: str, detector_key: str) -> Path:
        return Path(self.cache) / "cells" / f"{key(arena_key, detector_key)}.json"


def write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value))
    tmp.replace(path)


# ---------------------------------------------------------------- arenas

def clean_accuracy(setting: Setting, rate: float | None = None) -> float:
    """The recipe's CA on the tournament's pool without poison (:attr:`course_lib.homework.witness.Pool.clean_ca`),
    trained once per tournament seed and cached: an arena's CA must stay within
    :data:`course_lib.homework.witness.MAX_CA_DROP` of it, as in the grader's run."""
    set_threads(setting.threads)
    recipe = setting.recipe_at(rate)
    path = Path(setting.cache) / f"clean_ca-{key(setting.dataset, setting.seed, asdict(recipe))}.json"
    if not path.is_file():
        write_json(path, setting.pool(rate).clean_ca)
    return json.loads(path.read_text())


def house_rate(name: str) -> float | None:
    """The poisoning rate an arena is built at: a house family's own (if it states one), else None (the
    tournament's)."""
    family = name.split(":", 1)[1] if name.startswith("house:") else None
    return arenas.HOUSE_ATTACKS[family].rate if family in arenas.HOUSE_ATTACKS else None


def arena_key(setting: Setting, name: str, fingerprint: str, version: str) -> str:
    house = arenas.HOUSE_ATTACKS.get(name.split(":", 1)[1]) if name.startswith("house:") else None
    return key("arena", name, fingerprint, setting.dataset, setting.seed, setting.target,
               asdict(setting.recipe_at(house_rate(name))), house.words if house else "", version)


def arena_seed(setting: Setting, name: str, fingerprint: str) -> int:
    """The arena's training seed: from the tournament seed and the attack alone (not the kit's code)."""
    return int(key("seed", setting.seed, name, fingerprint)[:8], 16) % 2**31


def build_arena(setting: Setting, name: str, akey: str, seed: int, folder: str | None = None,
                trigger: str | None = None) -> dict:
    """Build (or find) the arena ``name`` under key ``akey``; returns its summary: {"name", "key",
    "built": bool, "reason", "ca", "asr", "stealth", "seed", "trigger", "seconds"}. Whether it enters
    is decided by :func:`enters`, against the recipe's clean CA."""
    set_threads(setting.threads)
    done = setting.arena_folder(akey) / "summary.json"
    if done.is_file():
        return json.loads(done.read_text())
    start = time.perf_counter()
    arena_seed = seed
    summary = {"name": name, "key": akey, "built": False, "reason": "", "seed": arena_seed, "trigger": trigger,
               "rate": house_rate(name)}
    pool = setting.pool(house_rate(name))
    try:
        if name.startswith("house:"):
            arena = arenas.house_arena(name.split(":", 1)[1], pool, target=setting.target, seed=arena_seed)
        else:
            results, ran = student_code.call_in_sandbox(Path(folder), ATTACK_NOTEBOOK, trigger,
                                                        {"stamped": [pool.stamped.images]},
                                                        call_timeout=setting.call_timeout, threads=setting.threads)
            summary["sandbox_seconds"] = round(ran.seconds, 2)
            triggered = results["stamped"]
            if isinstance(triggered, GradingFailure):
                raise triggered
            arena = arenas.dirty_label_arena(name, pool, triggered, target=setting.target, seed=arena_seed)
        arenas.save(arena, setting.arena_folder(akey))
        summary.update(built=True, ca=arena.ca, asr=arena.asr, stealth=arena.stealth)
    except GradingFailure as failure:
        summary["reason"] = f"its trigger failed in the tournament's arena: {failure}"[:1500]
    except Exception as err:        # a broken arena is that attack's loss, never the tournament's
        summary["reason"] = f"its arena could not be built: {type(err).__name__}: {err}"[:1500]
    summary["seconds"] = round(time.perf_counter() - start, 2)
    write_json(done, summary)
    return summary


def enters(summary: dict, recipe: witness.Recipe, clean_ca: float) -> dict:
    """The arena's summary with ``entered`` and its ``reason``: built, and its backdoor took by the
    grader's own bars (:func:`course_lib.homework.witness.verify_witness`: ASR and CA against ``clean_ca``)."""
    summary = dict(summary, entered=False)
    if summary["built"]:
        measured = witness.Witness(summary["asr"], summary["ca"], summary["seed"], summary["trigger"] or
                                   summary["name"], recipe, clean_ca)
        try:
            witness.verify_witness(measured)
            summary["entered"] = True
        except GradingFailure as failure:
            summary["reason"] = f"its trigger failed in the tournament's arena: {failure}"[:1500]
    return summary


# ---------------------------------------------------------------- cells

def _cell(arena_name: str, detector: str, scored: dict | None = None, error: str = "", seconds: float = 0.0) -> dict:
    cell = {"arena": arena_name, "detector": detector, "tpr": None, "fpr": None, "score": None, "f1": None,
            "flagged": None,
            "error": error[:500], "seconds": round(seconds, 3)}
    cell.update(scored or {})
    return cell


def play_house(setting: Setting, arena: dict, names: list, dkeys: dict) -> list[dict]:
    """The house detectors and controls ``names`` on one arena (cells already cached are read back)."""
    set_threads(setting.threads)
    cells, loaded = [], None
    for name in names:
        path = setting.cell_file(arena["key"], dkeys[name])
        if path.is_file():
            cells.append(json.loads(path.read_text()))
            continue
        loaded = loaded or arenas.load(setting.arena_folder(arena["key"]))
        start = time.perf_counter()
        try:
            flags = detectors.house_flags(name, loaded, setting.pool(arena.get("rate")).holdout)
            cell = _cell(arena["name"], name, score_flags(flags, loaded.data.labels.numpy(), loaded.truth.numpy()),
                         seconds=time.perf_counter() - start)
        except Exception as err:
            cell = _cell(arena["name"], name, error=f"{type(err).__name__}: {err}", seconds=time.perf_counter() - start)
        write_json(path, cell)
        cells.append(cell)
    return cells


def play_student(setting: Setting, detector: str, dkey: str, folder: str, arena_list: list) -> list[dict]:
    """A student's ``activation_clustering`` on every arena of ``arena_list`` it has not met yet, in one
    sandbox, one call per arena: it is handed that arena's activations and labels, nothing else."""
    set_threads(setting.threads)
    cells, todo = [], []
    for arena in arena_list:
        path = setting.cell_file(arena["key"], dkey)
        if path.is_file():
            cells.append(json.loads(path.read_text()))
        else:
            todo.append(arena)
    if not todo:
        return cells
    loaded = {f"arena{i}": arenas.load_features(setting.arena_folder(a["key"])) for i, a in enumerate(todo)}
    inputs = {call: [features.numpy(), labels.numpy()] for call, (features, labels, _) in loaded.items()}
    sandbox_seconds = 0.0
    try:
        results, ran = student_code.call_in_sandbox(Path(folder), DETECTOR_NOTEBOOK, "activation_clustering", inputs,
                                                    call_timeout=setting.call_timeout, threads=setting.threads)
        sandbox_seconds = ran.seconds
    except Exception as err:
        results = {call: GradingFailure(f"the sandbox could not run: {err}") for call in inputs}
    share = sandbox_seconds / len(todo)
    for (call, (_, labels, truth)), arena in zip(loaded.items(), todo):
        value = results[call]
        try:
            if isinstance(value, GradingFailure):
                raise value
            flags = value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
            cell = _cell(arena["name"], detector, score_flags(flags, labels.numpy(), truth.numpy()), seconds=share)
        except GradingFailure as failure:
            cell = _cell(arena["name"], detector, error=str(failure), seconds=share)
        # the whole sandbox's time and its number of calls: the bench splits it into start-up and per-call cost
        cell.update(sandbox_seconds=round(sandbox_seconds, 2), calls=len(todo))
        write_json(setting.cell_file(arena["key"], dkey), cell)
        cells.append(cell)
    return cells


# ---------------------------------------------------------------- a schedule for a big class

def schedule(student_arenas: list[str], detectors: list[str], per_detector: int, seed: int) -> dict[str, list[str]]:
    """Which student arenas each student detector meets when not all of them: ``per_detector`` of them, drawn
    at random with the tournament ``seed`` so that every arena is met by about as many detectors (the arenas
    in a seeded random order, each detector, in a seeded random order, taking the next ``per_detector`` of
    them round the circle). Every detector also meets every house arena (the caller adds those)."""
    if not isinstance(per_detector, int) or per_detector < 0:
        raise ValueError(f"per_detector must be a non-negative integer, got {per_detector!r}")
    if per_detector >= len(student_arenas):
        return {d: list(student_arenas) for d in detectors}
    rng = np.random.default_rng([seed, 23])
    ring = [student_arenas[i] for i in rng.permutation(len(student_arenas))]
    order = [detectors[i] for i in rng.permutation(len(detectors))]
    return {d: [ring[(n * per_detector + j) % len(ring)] for j in range(per_detector)] for n, d in enumerate(order)}
