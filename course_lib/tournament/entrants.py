"""Who enters the tournament: read from what autograding recorded, never from the student.

An **attack** enters when the grader's own poisoning run passed (test
``p1-test-trigger-poisons``: the trigger planted a backdoor in a fresh model, on data the
student did not choose); the trigger that enters is the one recorded in the handed-in model's
metadata (read as JSON, no code runs). A **detector** enters when its planted-example test
passed (``p2-test-planted``). A student may enter one, both or neither; every entrant that
does not enter carries the reason, shown on the page. The results are those the trusted
autograder cached (``<course>/.autograde/<assignment>/results/<student>/<notebook>.json``),
so the tournament runs after ``python -m course_lib autograde``; it never changes them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..checkpoints import CheckpointError, read_metadata
from ..homework.part1 import recorded_trigger
from ..homework.rules import MODEL_FILE, GradingFailure

ATTACK_NOTEBOOK, DETECTOR_NOTEBOOK = "part1_attack", "part2_detection"
ATTACK_TEST, DETECTOR_TEST = "p1-test-trigger-poisons", "p2-test-planted"


@dataclass(frozen=True)
class Entrant:
    """One student: the submission's folder, the trigger that enters (if any), and for each side
    "" when it enters or the reason it does not."""

    student: str
    folder: Path
    trigger: str | None
    attack: str          # "" = the attack enters; else why not
    detector: str        # "" = the detector enters; else why not


def _verdict(results: Path, notebook: str, test: str) -> tuple[bool, str]:
    """(passed, message) of ``test`` in the cached result of ``notebook``; a missing one fails."""
    path = results / f"{notebook}.json"
    if not path.is_file():
        return False, f"autograding recorded no result for {notebook} (run python -m course_lib autograde first)"
    try:
        verdict = json.loads(path.read_text())["verdicts"][test]
        return bool(verdict["passed"]), str(verdict.get("message", ""))
    except (ValueError, KeyError, TypeError):
        return False, f"autograding recorded no verdict for {test}"


def submission_folder(course: Path, assignment: str, student: str) -> Path:
    """The files autograding saw (its staged copy), else the collected submission."""
    staged = course / ".autograde" / assignment / "staging" / student
    return staged if staged.is_dir() else course / "submitted" / student / assignment


def entrant(course: Path, assignment: str, student: str) -> Entrant:
    """What autograding recorded for ``student``, as an :class:`Entrant`."""
    results = course / ".autograde" / assignment / "results" / student
    folder = submission_folder(course, assignment, student)
    passed, message = _verdict(results, ATTACK_NOTEBOOK, ATTACK_TEST)
    trigger, attack = None, ""
    if not passed:
        attack = f"the grader's poisoning run did not pass: {message[:300]}"
    else:
        try:
            trigger = recorded_trigger(read_metadata(folder / MODEL_FILE))
        except (CheckpointError, GradingFailure) as err:
            attack = f"no trigger recorded in the handed-in model: {err}"
    passed, message = _verdict(results, DETECTOR_NOTEBOOK, DETECTOR_TEST)
    detector = "" if passed else f"the planted-example test did not pass: {message[:300]}"
    return Entrant(student, folder, trigger, attack, detector)


def class_entrants(course, assignment: str) -> list[Entrant]:
    """Every student autograding recorded a result for, sorted by id."""
    course = Path(course)
    if not isinstance(assignment, str) or not assignment:
        raise ValueError(f"assignment must be a non-empty name, got {assignment!r}")
    results = course / ".autograde" / assignment / "results"
    if not results.is_dir():
        raise FileNotFoundError(f"course {course} has no autograding results for {assignment} ({results}): run "
                                f"python -m course_lib autograde {assignment} --course {course} first")
    return [entrant(course, assignment, p.name) for p in sorted(results.iterdir()) if p.is_dir()]
