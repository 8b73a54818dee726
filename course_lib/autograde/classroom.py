"""``python -m course_lib autograde ASSIGNMENT``: grade a whole class, in parallel, trusted.

nbgrader grades one submission after another (its issue #174 asks for parallel autograding
since 2015). This command splits the work in two:

1. **in parallel** (a ``concurrent.futures`` executor: worker processes here, or a Dask
   cluster with ``--dask-scheduler``), each student's notebooks are sanitized as nbgrader
   does, run in sandboxes and decided by the trusted grader (:func:`.pipeline.grade_notebook`);
   results land in the course's cache, keyed by everything they depend on;
2. **in one process**, nbgrader's own ``autograde`` records them: its pipeline uses
   :class:`.preprocessor.TrustedExecute`, which finds each result in the cache. The gradebook
   is written by this process only.

Each worker's torch/OpenMP/BLAS threads are set so that the workers together use the cores
once (oversubscribed threads on a small machine cost far more than their share). A
submission whose files and notebooks are unchanged since it was graded is skipped
(``--force`` regrades; its failed tests are still listed, from the cached result). A tqdm bar
shows progress and time left; a table sums up, and marks notebooks whose answers still need
manual grading (their 0 points are not final).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

from ..checks import check_int
from . import sandbox
from . import integrity
from .course import Course, HandIn, cached_key, one_line
from .files import valid_student_id
from .pipeline import NotebookResult, Settings, cache_key, check_sandbox, grade_notebook
from .preprocessor import UnsafeRefusal, require_sandbox
from .steps import course_folder
from .resources import LimitsRefusal, require_controls
from .workspace import Workspace


INTEGRITY = "integrity.json"
NEEDS_ATTENTION = 3   # the exit status when a hand-in needs the instructor's attention


class SelfCheckFailure(RuntimeError):
    """The grader's own sandbox failed its known answer: grading would be wrong for everyone."""


@dataclass
class Job:
    """One student's work: the staged submission folder and its sanitized notebooks."""

    student: str
    folder: str
    notebooks: dict                 # notebook name -> sanitized notebook (JSON text)
    course: str
    assignment: str
    grading_dir: str
    settings: Settings
    time_limit: float
    threads: int
    reuse: bool = True              # False with --force: grade again even if a result is cached


@dataclass
class Summary:
    """What happened to one student (the scores come from the gradebook afterwards)."""

    student: str
    seconds: float = 0.0
    failed: list = field(default_factory=list)     # grade ids that scored zero
    notes: list = field(default_factory=list)
    skipped: bool = False
    scores: dict = field(default_factory=dict)      # notebook -> (score, max score)
    pending: list = field(default_factory=list)     # notebooks with answers that need manual grading
    timed_out: bool = False                         # a cell, a call or a notebook hit its time limit
    attention: list = field(default_factory=list)   # what the instructor must look at, one line each


def _limit_threads(threads: int) -> None:
    """One worker's share of the cores, for every library that starts threads."""
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[name] = str(threads)
    import torch
    torch.set_num_threads(threads)
    from threadpoolctl import threadpool_limits
    threadpool_limits(threads)


def grade_student(job: Job) -> Summary:
    """Grade every notebook of one student within ``job.time_limit`` seconds (runs in a worker)."""
    _limit_threads(job.threads)
    start, summary = time.perf_counter(), Summary(job.student)
    workspace = Workspace(job.course, job.assignment, job.grading_dir)
    for name, text in job.notebooks.items():
        remaining = job.time_limit - (time.perf_counter() - start)
        limits = sandbox.Limits(**{**job.settings.limits.__dict__, "wall_seconds": max(1.0, remaining)})
        settings = Settings(job.settings.cell_timeout, limits, job.settings.unsafe_no_sandbox)
        result = grade_notebook(nbformat.reads(text, as_version=4), Path(job.folder), name, workspace.files,
                                workspace.inputs(), settings, zoo=workspace.zoo, cache=workspace.cache(job.student),
                                reuse=job.reuse)
        summary.failed += [g for g, v in result.verdicts.items() if not v.passed]
        summary.timed_out = summary.timed_out or hit_time_limit(result)
        if result.note:
            summary.notes.append(f"{name}: {result.note}")
    summary.seconds = time.perf_counter() - start
    return summary


def hit_time_limit(result) -> bool:
    """Whether a notebook's result shows a time limit: the notebook's own, or a cell's or a call's
    (the harvest records those as ``CellTimeoutError``)."""
    cells = (o.get("ename") for outputs in result.cells.values() for o in outputs)
    return "time limit" in result.note or "CellTimeoutError" in cells or any(
        "CellTimeoutError" in v.message for v in result.verdicts.values() if not v.passed)


def make_executor(workers: int, dask_scheduler: str | None):
    """A ``concurrent.futures`` executor: local worker processes, or a Dask cluster's."""
    if dask_scheduler:
        from distributed import Client
        client = Client(dask_scheduler)
        return client.get_executor(pure=False), client
    import multiprocessing
    return cf.ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")), None


def autograde_class(course_dir, assignment: str, *, workers: int = 1, dask_scheduler: str | None = None,
                    force: bool = False, time_limit: float = 900.0, threads: int | None = None,
                    cell_timeout: float = 120.0, unsafe_no_sandbox: bool = False, progress: bool = True,
                    students: list | None = None, timings: dict | None = None, memory_gb: float | None = None,
                    disk_gb: float | None = None, processes: int | None = None,
                    unsafe_no_limits: bool = False) -> list[Summary]:
    """Grade every collected submission of ``assignment``; returns one Summary per student.

    Each sandbox's caps (``memory_gb`` for all its processes, ``disk_gb``, ``processes``) default
    to the course's ``nbgrader_config.py`` (``TrustedExecute.sandbox_memory_gb``, ``disk_gb``,
    ``processes``), else to :class:`.sandbox.Limits`'. A student with a test that failed on a
    time limit while other sandboxes ran is graded again, alone, before anything is recorded.

    ``timings``, when given, receives the seconds of each phase: ``setup`` (once per run: the
    sandbox's checks and self-check, the grader's inputs), ``prepare`` (staging and sanitizing
    each student, here), ``grade`` (the workers), ``record`` (nbgrader, here) and ``integrity``
    (the class's integrity report).
    """
    check_int("workers", workers, 1)
    if threads is not None:
        check_int("threads", threads, 1)
    timings = {} if timings is None else timings
    start = time.perf_counter()
    require_sandbox(unsafe_no_sandbox, lambda text: print(text, file=sys.stderr))
    if not unsafe_no_sandbox:
        require_controls(unsafe_no_limits, sandbox.lost_controls(), lambda text: print(text, file=sys.stderr))
    course = Course(course_folder(course_dir, "course_dir"), assignment)
    workspace = Workspace(course.root, assignment)
    inputs = workspace.inputs()
    threads = threads or max(1, (os.cpu_count() or 1) // workers)
    limits = course.limits(threads, memory_gb, disk_gb, processes)
    settings = Settings(cell_timeout, limits, unsafe_no_sandbox)
    if not unsafe_no_sandbox:
        self_check(workspace, settings)
    names = course.notebook_names()
    timings["setup"] = time.perf_counter() - start
    jobs, summaries, hand_ins = [], {}, {}
    for student in students or course.students():
        hand_in = hand_ins[student] = _prepare(course, workspace, student, names, inputs)
        if not force and _unchanged(course, workspace, hand_in, inputs):
            summaries[student] = Summary(student, skipped=True, failed=_cached_failures(workspace, hand_in),
                                         attention=list(hand_in.problems))
            continue
        summaries[student] = Summary(student, attention=list(hand_in.problems))
        if hand_in.notebooks:
            jobs.append(Job(student, str(hand_in.staged),
                            {n: nbformat.writes(nb) for n, nb in hand_in.notebooks.items()}, str(course.root),
                            assignment, str(workspace.files.folder), settings, time_limit, threads,
                            reuse=not force))
    timings["prepare"] = time.perf_counter() - start - timings["setup"]
    _run_jobs(jobs, summaries, workers, dask_scheduler, progress)
    if workers > 1 and len(jobs) > 1:
        _regrade_alone(jobs, summaries)
    timings["grade"] = time.perf_counter() - start - timings["setup"] - timings["prepare"]
    for student, summary in summaries.items():
        summary.attention = [*hand_ins[student].problems, *(a for a in summary.attention
                                                            if a not in hand_ins[student].problems)]
        if not summary.skipped:
            _record(course, workspace, hand_ins[student], inputs, summary)
        try:
            summary.scores, summary.pending = course.scores(student)
        except Exception as err:
            summary.attention.append(f"no grades in the gradebook: {one_line(err)}")
    timings["record"] = time.perf_counter() - start - sum(timings[k] for k in ("setup", "prepare", "grade"))
    _integrity(course, workspace, hand_ins)
    timings["integrity"] = time.perf_counter() - start - sum(timings[k] for k in ("setup", "prepare", "grade",
                                                                                   "record"))
    return [summaries[s] for s in sorted(summaries)]


def _integrity(course: Course, workspace: Workspace, hand_ins: dict) -> None:
    """The class's integrity report (:mod:`.integrity`), kept beside the results: reported, never
    penalized (a report that fails is a line of its own, never a stopped class)."""
    try:
        released = course.root / "release" / course.assignment / "part1_attack.ipynb"
        lines = integrity.report(
            {s: h.staged / integrity.MODEL_FILE for s, h in hand_ins.items() if h.staged is not None},
            {s: h.notebooks.get("part1_attack") for s, h in hand_ins.items() if "part1_attack" in h.notebooks},
            nbformat.read(released, as_version=4) if released.is_file() else None)
    except Exception as err:
        lines = [f"the integrity report could not be made: {one_line(err)}"]
    (workspace.root / INTEGRITY).write_text(json.dumps(lines))


def integrity_lines(course_dir, assignment: str) -> list:
    """The last class run's integrity report."""
    path = Workspace(Path(course_dir).resolve(), assignment).root / INTEGRITY
    return json.loads(path.read_text()) if path.is_file() else []


def _prepare(course: Course, workspace: Workspace, student: str, names: list, inputs: Path) -> HandIn:
    """One student's hand-in, staged and sanitized, each unreadable notebook given its stand-in
    (a problem with one hand-in never reaches another's)."""
    if not valid_student_id(student):
        hand_in = HandIn(student, problems=["the student id is not a plain name (letters, digits, _ . @ -); "
                                            "not graded"])
        hand_in.unreadable = {name: "the student id is not a plain name" for name in names}
        return hand_in
    hand_in = course.prepare(student, workspace.root / "staging" / student, names)
    for name, reason in hand_in.unreadable.items():
        try:
            path = course.substitute(hand_in, name, reason, inputs, workspace.cache(student))
        except Exception as err:
            path = None
            hand_in.problems.append(f"{name}.ipynb: no stand-in notebook ({one_line(err)}); left out, scored 0")
        if path is not None:
            hand_in.substitutes[name] = path
    return hand_in


def _record(course: Course, workspace: Workspace, hand_in: HandIn, inputs: Path, summary: Summary) -> None:
    """nbgrader records one student; if it refuses, every notebook is recorded again as its
    stand-in (all tests 0, the feedback says why), so that the student still has a grade."""
    if not valid_student_id(hand_in.student):
        return
    copies = workspace.root / "recording"
    try:
        course.record(hand_in, copies, hand_in.substitutes)
        return
    except Exception as err:
        reason = one_line(err)
        summary.attention.append(f"{reason}; recorded with every notebook at 0")
    hand_in.unreadable = {name: f"nbgrader could not record it ({reason[:200]})" for name in course.notebook_names()}
    try:
        hand_in.substitutes = {}
        for name, why in hand_in.unreadable.items():
            path = course.substitute(hand_in, name, why, inputs, workspace.cache(hand_in.student))
            if path is not None:
                hand_in.substitutes[name] = path
        course.record(hand_in, copies, hand_in.substitutes)
    except Exception as err:
        summary.attention.append(f"not recorded at all: {one_line(err)}")


def self_check(workspace: Workspace, settings: Settings) -> None:
    """Before grading anyone: a sandbox must import the kit and run a known answer. A grader
    that cannot would score every call as "the kernel died" and cache it; this refuses instead
    (:class:`SelfCheckFailure`, with the sandbox's own words), grading and caching nothing."""
    problem = check_sandbox(settings)
    if problem:
        raise SelfCheckFailure(f"the grading sandbox does not work here, so nobody was graded and nothing was "
                               f"cached: {problem}")


def _unchanged(course: Course, workspace: Workspace, hand_in: HandIn, inputs: Path) -> bool:
    """Graded before, and every notebook's cached result still matches its inputs."""
    if hand_in.unreadable or hand_in.staged is None:
        return False
    if not (course.root / course.coursedir.autograded_directory / hand_in.student / course.assignment).is_dir():
        return False
    cache = workspace.cache(hand_in.student)
    return all(cached_key(cache, name) == cache_key(nb, hand_in.staged, inputs) for name, nb in hand_in.notebooks.items())


def _cached_failures(workspace: Workspace, hand_in: HandIn) -> list:
    """The grade ids that failed in a student's cached results (a skipped student's row lists them too)."""
    cache = workspace.cache(hand_in.student)
    return [grade_id for name in hand_in.notebooks
            for grade_id, verdict in NotebookResult.from_json((cache / f"{name}.json").read_text()).verdicts.items()
            if not verdict.passed]


def _run_jobs(jobs, summaries, workers, dask_scheduler, progress) -> None:
    from tqdm.auto import tqdm
    if not jobs:
        return
    executor, client = make_executor(workers, dask_scheduler)
    try:
        futures = {executor.submit(grade_student, job): job.student for job in jobs}
        with tqdm(total=len(futures), desc="autograde", unit="student", disable=not progress) as bar:
            for future in cf.as_completed(futures):
                student = futures[future]
                try:
                    summaries[student] = future.result()
                except Exception as err:   # a worker lost: the student is graded in the recording pass
                    summaries[student].notes.append(f"worker failed: {one_line(err)}")
                bar.set_postfix_str(student)
                bar.update()
    finally:
        executor.shutdown(wait=True)
        if client is not None:
            client.close()


def _regrade_alone(jobs, summaries) -> None:
    """Grade again, one at a time, every student who hit a time limit while other sandboxes
    ran: a neighbour must never cost a student points (its CPU is capped, but not every shared
    resource is)."""
    again = [dataclasses.replace(job, reuse=False) for job in jobs if summaries[job.student].timed_out]
    if not again:
        return
    executor, _ = make_executor(1, None)
    try:
        for job in again:
            try:
                summary = executor.submit(grade_student, job).result()
            except Exception as err:     # the first grading stands; the instructor is told
                summaries[job.student].attention.append(f"the regrade after a time limit failed: {one_line(err)}")
                continue
            summary.notes.append("graded again alone after a time limit")
            summary.attention = summaries[job.student].attention
            summaries[job.student] = summary
    finally:
        executor.shutdown(wait=True)


def table(summaries: list[Summary]) -> str:
    """A markdown table: student, score per notebook, total, seconds, failed tests."""
    names = sorted({n for s in summaries for n in s.scores})
    rows = ["| student | " + " | ".join(names) + " | total | seconds | failed tests |",
            "|---" * (len(names) + 4) + "|"]
    for s in summaries:
        parts = [(f"{s.scores[n][0]:g}/{s.scores[n][1]:g}" + (" (needs manual grading)" if n in s.pending else ""))
                 if n in s.scores else "-" for n in names]
        total = sum(v[0] for v in s.scores.values())
        seconds = "skipped (unchanged)" if s.skipped else f"{s.seconds:.1f}"
        failed = ", ".join(s.failed + s.notes) or "-"
        rows.append(f"| {s.student} | " + " | ".join(parts) + f" | {total:g} | {seconds} | {failed} |")
    return "\n".join(rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m course_lib autograde", description=__doc__.split("\n\n")[0])
    parser.add_argument("assignment", help="the nbgrader assignment, e.g. week4")
    parser.add_argument("--course", type=Path, default=Path("."), help="the nbgrader course folder (default: .)")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                        help="students graded at once (default: half the cores)")
    parser.add_argument("--dask-scheduler", default=None, metavar="ADDRESS",
                        help="grade on a dask.distributed cluster (e.g. tcp://host:8786) instead of local workers")
    parser.add_argument("--threads", type=int, default=None, help="threads per worker (default: cores / workers)")
    parser.add_argument("--time-limit", type=float, default=900.0, help="seconds per student (default 900)")
    parser.add_argument("--cell-timeout", type=float, default=120.0, help="seconds per cell or graded call")
    parser.add_argument("--student", action="append", default=None, help="grade only this student (repeatable)")
    parser.add_argument("--force", action="store_true", help="regrade submissions that did not change")
    parser.add_argument("--unsafe-no-sandbox", action="store_true",
                        help="grade without a sandbox where none can be made: " + "; ".join(sandbox.UNSAFE_LOSSES))
    parser.add_argument("--memory-gb", type=float, default=None,
                        help="memory of each sandbox's processes together, GiB (default: the course config's, else 4)")
    parser.add_argument("--disk-gb", type=float, default=None,
                        help="disk of each sandbox: submission, HOME, temporary files, results, GiB (default 2)")
    parser.add_argument("--processes", type=int, default=None,
                        help="processes and threads of each sandbox together (default 256)")
    parser.add_argument("--unsafe-no-limits", action="store_true",
                        help="grade where a per-sandbox cap cannot be made here; says what is lost")
    parser.add_argument("--json", action="store_true", help="one JSON object per student instead of a table")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        summaries = autograde_class(args.course, args.assignment, workers=args.workers,
                                    dask_scheduler=args.dask_scheduler, force=args.force,
                                    time_limit=args.time_limit, threads=args.threads, cell_timeout=args.cell_timeout,
                                    unsafe_no_sandbox=args.unsafe_no_sandbox, progress=not args.json,
                                    students=args.student, memory_gb=args.memory_gb, disk_gb=args.disk_gb,
                                    processes=args.processes, unsafe_no_limits=args.unsafe_no_limits)
    except (ValueError, TypeError, UnsafeRefusal, LimitsRefusal, SelfCheckFailure) as err:
        parser.error(str(err))
    if args.json:
        for s in summaries:
            print(json.dumps({"student": s.student, "scores": s.scores, "seconds": round(s.seconds, 2),
                              "failed": s.failed, "notes": s.notes, "skipped": s.skipped,
                              "needs_manual_grading": s.pending, "needs_attention": s.attention}))
    else:
        print(table(summaries))
        print(f"{len(summaries)} students in {time.perf_counter() - start:.1f} s")
    print(attention_report(summaries), file=sys.stderr if args.json else sys.stdout)
    report = integrity_lines(args.course, args.assignment)
    print("integrity report (to look at; nothing was penalized): " + ("nothing alike" if not report else
          f"{len(report)} finding(s)\n" + "\n".join(f"- {line}" for line in report)),
          file=sys.stderr if args.json else sys.stdout)
    if any(s.attention for s in summaries):
        sys.exit(NEEDS_ATTENTION)


def attention_report(summaries: list[Summary]) -> str:
    """One line per hand-in problem, and the count: the end of every class run."""
    flagged = [s for s in summaries if s.attention]
    if not flagged:
        return "every hand-in was graded and recorded; none needs attention"
    lines = [f"{s.student}: {line}" for s in flagged for line in s.attention]
    return "\n".join([f"NEEDS ATTENTION: {len(flagged)} of {len(summaries)} hand-ins "
                      f"({', '.join(s.student for s in flagged)})", *lines])
