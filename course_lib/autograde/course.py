"""The nbgrader course folder as the class command sees it: one student at a time, never all.

Everything here runs with the instructor's rights on what a student handed in, so each step
works on one student and turns whatever that hand-in does to it into a :class:`HandIn`'s
problem lines, never into an exception that stops the class:

- :meth:`Course.prepare` stages the submission (the student's own files only, see
  :mod:`.files`, with the instructor's files copied over them as nbgrader does) and runs
  nbgrader's sanitizing steps on each notebook. A notebook those steps refuse (saved half-way,
  a test cell pasted twice, nbgrader metadata of another version) is *unreadable*: it is not
  run, every test in it scores 0, and the student's feedback says why;
- :meth:`Course.record` lets nbgrader's own ``autograde`` record the results (found in the
  cache) from a *recording copy* of the submission: the student's own files, with each
  unreadable notebook replaced by the released one under a note that says why it scores 0.
  nbgrader never reads a file the kit did not check.
"""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

from ..checks import check_float
from . import sandbox
from .files import copy_own_files
from .pipeline import NotebookResult, cache_key, test_cells
from .preprocessor import autograde_preprocessors
from .verdicts import Verdict

UNREADABLE_NOTE = ("**This is not the notebook you handed in.** Your `{name}.ipynb` could not be graded: "
                   "{reason}. Every test of it scores 0. The file you handed in is kept unchanged; fix it (open "
                   "it in JupyterLab, save it, run *Validate*) and hand it in again before the deadline.")


def one_line(err: BaseException, limit: int = 300) -> str:
    """An exception as one short line for the instructor and the student (never a traceback)."""
    text = " ".join(str(err).split()) or "no details"
    return f"{type(err).__name__}: {text}"[:limit]


@dataclass
class HandIn:
    """One student's submission, prepared for grading."""

    student: str
    staged: Path | None = None
    notebooks: dict = field(default_factory=dict)     # name -> sanitized notebook (readable ones)
    unreadable: dict = field(default_factory=dict)    # name -> why it could not be graded
    substitutes: dict = field(default_factory=dict)   # name -> the stand-in notebook recorded in its place
    problems: list = field(default_factory=list)      # lines for the instructor


class Course:
    """An nbgrader course folder, read through nbgrader's own configuration and gradebook."""

    def __init__(self, root: Path, assignment: str):
        from nbgrader.apps import NbGraderAPI
        from nbgrader.coursedir import CourseDirectory
        from traitlets.config.loader import PyFileConfigLoader
        self.root, self.assignment = Path(root).resolve(), assignment
        config = PyFileConfigLoader("nbgrader_config.py", path=str(self.root)).load_config()
        config.CourseDirectory.root = str(self.root)
        # Whatever the config file says, this command records results only through TrustedExecute.
        config.Autograde.autograde_preprocessors = autograde_preprocessors()
        self.config = config
        self.coursedir = CourseDirectory(config=config)
        self.api = NbGraderAPI(coursedir=self.coursedir, config=config)

    def limits(self, threads: int, memory_gb: float | None, disk_gb: float | None,
               processes: int | None) -> sandbox.Limits:
        """A sandbox's limits: the arguments given, else the course config's, else the defaults."""
        config, default = self.config.TrustedExecute, sandbox.Limits()
        memory_gb = memory_gb if memory_gb is not None else config.get("sandbox_memory_gb")
        disk_gb = disk_gb if disk_gb is not None else config.get("disk_gb")
        processes = processes if processes is not None else config.get("processes", default.processes)
        for name, value in (("memory_gb", memory_gb), ("disk_gb", disk_gb)):
            if value is not None:
                check_float(name, value, 0, math.inf, low_open=True)
        return sandbox.Limits(threads=threads, processes=processes,
                              sandbox_memory_bytes=int(memory_gb * 2**30) if memory_gb else default.sandbox_memory_bytes,
                              disk_bytes=int(disk_gb * 2**30) if disk_gb else default.disk_bytes)

    def students(self) -> list[str]:
        submitted = self.root / self.coursedir.submitted_directory
        return sorted(p.parent.name for p in submitted.glob(f"*/{self.assignment}")
                      if p.is_dir() and not p.is_symlink() and not p.parent.is_symlink())

    def notebook_names(self) -> list[str]:
        from nbgrader.api import Gradebook
        with Gradebook(self.coursedir.db_url, self.coursedir.course_id) as gb:
            return [nb.name for nb in gb.find_assignment(self.assignment).notebooks]

    def submitted(self, student: str) -> Path:
        return self.root / self.coursedir.submitted_directory / student / self.assignment

    def prepare(self, student: str, staging: Path, names: list[str]) -> HandIn:
        """Stage ``student``'s submission and sanitize each notebook; problems become lines."""
        hand_in = HandIn(student)
        try:
            hand_in.staged = self.stage(student, staging, hand_in.problems)
        except Exception as err:
            hand_in.problems.append(f"could not be staged: {one_line(err)}; every test scores 0")
            hand_in.unreadable = {name: "the submission folder could not be read" for name in names}
            return hand_in
        for name in names:
            path = hand_in.staged / f"{name}.ipynb"
            if not path.is_file():
                continue                          # not handed in: nbgrader scores it 0 itself
            try:
                hand_in.notebooks[name] = self.sanitized(path, student, name)
            except Exception as err:
                hand_in.unreadable[name] = f"nbgrader cannot read it ({one_line(err, 200)})"
                hand_in.problems.append(f"{name}.ipynb is unreadable, scored 0: {one_line(err)}")
        return hand_in

    def stage(self, student: str, staging: Path, problems: list) -> Path:
        """The files autograding will see: the student's own files (no links, no special files),
        with the instructor's non-notebook files copied over them (except
        ``Autograde.exclude_overwriting``), as nbgrader does."""
        source = self.root / self.coursedir.source_directory / self.assignment
        keep = set(self.config.Autograde.get("exclude_overwriting", {}).get(self.assignment, []))
        if staging.exists():
            shutil.rmtree(staging)
        staging.parent.mkdir(parents=True, exist_ok=True)
        problems += [f"{line} (not graded)" for line in copy_own_files(self.submitted(student), staging,
                                                                     skip=self._ignored)]
        for path in source.rglob("*"):
            relative = path.relative_to(source)
            if path.is_file() and path.suffix != ".ipynb" and str(relative) not in keep and relative.parts[0] != "zoo":
                (staging / relative).parent.mkdir(parents=True, exist_ok=True)
                target = staging / relative
                if target.is_symlink() or target.is_dir():
                    shutil.rmtree(target) if target.is_dir() else target.unlink()
                shutil.copyfile(path, target)
        return staging

    def _ignored(self, relative: str) -> bool:
        import fnmatch
        return any(fnmatch.fnmatch(Path(relative).name, pattern) for pattern in self.coursedir.ignore)

    def sanitized(self, path: Path, student: str, name: str):
        """The notebook at ``path`` after nbgrader's sanitizing steps (instructor's test cells and
        locked cells restored from the gradebook); raises whatever nbgrader raises."""
        from nbgrader.preprocessors import (CheckCellMetadata, ClearOutput, DeduplicateIds, OverwriteCells,
                                            OverwriteKernelspec)
        nb = nbformat.read(path, as_version=nbformat.NO_CONVERT)
        resources = {"nbgrader": {"student": student, "assignment": self.assignment, "notebook": name,
                                  "db_url": self.coursedir.db_url}, "metadata": {"path": str(path.parent)}}
        for step in (ClearOutput, DeduplicateIds, OverwriteKernelspec, OverwriteCells, CheckCellMetadata):
            nb, resources = step(config=self.config).preprocess(nb, resources)
        return nbformat.reads(nbformat.writes(nb), as_version=4)

    def substitute(self, hand_in: HandIn, name: str, reason: str, inputs: Path, cache: Path) -> Path | None:
        """The released ``name`` notebook under a note saying why the student's scores 0, with its
        all-failing result in the cache (so nbgrader records zeros and the feedback explains
        them). None where the course has no generated release to stand in."""
        released = self.root / "release" / self.assignment / f"{name}.ipynb"
        if not released.is_file() or hand_in.staged is None:
            return None
        nb = nbformat.read(released, as_version=4)
        note = nbformat.v4.new_markdown_cell(UNREADABLE_NOTE.format(name=name, reason=reason))
        note["id"] = "kit-unreadable-note"
        nb.cells.insert(0, note)
        path = cache.parent / "substitutes" / hand_in.student / f"{name}.ipynb"
        path.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, path)
        clean = self.sanitized(path, hand_in.student, name)
        message = f"your {name}.ipynb could not be graded: {reason}"
        result = NotebookResult(cache_key(clean, hand_in.staged, inputs),
                                verdicts={g: Verdict(False, message) for g in test_cells(clean)},
                                note=f"{name}.ipynb unreadable: {reason}")
        cache.mkdir(parents=True, exist_ok=True)
        (cache / f"{name}.json").write_text(result.to_json())
        return path

    def record(self, hand_in: HandIn, copies: Path, substitutes: dict) -> None:
        """nbgrader's autograde of one student (results come from the cache), from a recording
        copy: the student's own files with ``substitutes`` ({name: path}) in place of the
        unreadable notebooks (an unreadable one without a substitute is left out: nbgrader
        scores a missing notebook 0)."""
        from nbgrader.utils import temp_attrs
        folder = copies / hand_in.student / self.assignment
        if folder.parent.exists():
            shutil.rmtree(folder.parent)
        folder.parent.mkdir(parents=True)
        copy_own_files(self.submitted(hand_in.student), folder,       # nbgrader lays the instructor's zoo
                       skip=lambda relative: self._ignored(relative) or relative.split("/")[0] == "zoo")
        for name in hand_in.unreadable:
            (folder / f"{name}.ipynb").unlink(missing_ok=True)
            if name in substitutes:
                shutil.copyfile(substitutes[name], folder / f"{name}.ipynb")
        self._add_submission(hand_in.student)
        relative = str(copies.relative_to(self.root))
        try:
            with temp_attrs(self.coursedir, submitted_directory=relative):
                result = self.api.autograde(self.assignment, hand_in.student, force=True, create=True)
        finally:
            shutil.rmtree(folder.parent, ignore_errors=True)       # recorded: the copy has done its job
        if not result["success"]:
            lines = [line for line in (result.get("error") or result.get("log") or "").splitlines() if line.strip()]
            raise RuntimeError(f"nbgrader could not record it ({lines[-1][:300] if lines else 'no log'})")

    def _add_submission(self, student: str) -> None:
        """Create a first submission's gradebook entry before nbgrader's autograde does.

        nbgrader's ``Gradebook.add_submission`` builds the submission, its notebooks and grades
        while the session autoflushes: every lazy load in between flushes a submission that
        is not in the session yet, and SQLAlchemy 2 warns each time ("SAWarning: Object of type
        <SubmittedAssignment> not in session"). The same call with autoflush off builds it
        without a flush; nbgrader then finds the submission and updates it.
        """
        from nbgrader.api import Gradebook, MissingEntry
        with Gradebook(self.coursedir.db_url, self.coursedir.course_id) as gb:
            try:
                gb.find_submission(self.assignment, student)
                return
            except MissingEntry:
                pass
            gb.update_or_create_student(student)
            with gb.db.no_autoflush:
                gb.add_submission(self.assignment, student)

    def scores(self, student: str) -> tuple[dict, list]:
        """({notebook: (score, max score)}, [notebooks with answers that need manual grading])."""
        from nbgrader.api import Gradebook
        with Gradebook(self.coursedir.db_url, self.coursedir.course_id) as gb:
            submission = gb.find_submission(self.assignment, student)
            return ({nb.name: (nb.score, nb.max_score) for nb in submission.notebooks},
                    [nb.name for nb in submission.notebooks if nb.needs_manual_grade])



def cached_key(cache: Path, name: str) -> str | None:
    """The key of a cached result, or None."""
    path = cache / f"{name}.json"
    try:
        return json.loads(path.read_text())["key"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
