"""The trusted autograder inside nbgrader: a preprocessor that replaces nbgrader's ``Execute``.

nbgrader's ``autograde`` sanitizes each submitted notebook (restoring the instructor's test
cells from the gradebook), then runs its ``autograde_preprocessors``: by default ``Execute``
(every cell, test cells included, in one kernel next to the student's code), then
``SaveAutoGrades`` (a test cell without an error output earns its points). The course's
``nbgrader_config.py`` puts :class:`TrustedExecute` in place of ``Execute``: it runs the
student's cells in a sandbox, decides every test in the grader's own process
(:mod:`.pipeline`), and writes each verdict into its test cell as an output, before
``SaveAutoGrades`` records it. nbgrader's gradebook, formgrader, feedback and export work
unchanged. ``python -m course_lib autograde`` (:mod:`.classroom`) computes the same results for
many students in parallel, and this preprocessor then finds them in the cache.

:class:`MarkPending` is a feedback preprocessor: nbgrader shows an answer that still needs
manual grading as "Score: 0.0", like a final zero; it marks such answers as pending.
"""
from __future__ import annotations

import os
from pathlib import Path

import nbformat
from nbgrader.api import Gradebook
from nbgrader.preprocessors import NbGraderPreprocessor
from traitlets import Bool, Float, Integer, Unicode

from . import sandbox
from .pipeline import Settings, apply, grade_notebook
from .resources import require_controls
from .workspace import Workspace


class UnsafeRefusal(RuntimeError):
    """No sandbox can be made here, and the instructor did not accept grading without one."""


def require_sandbox(unsafe: bool, log=print) -> None:
    """Refuse to grade without a sandbox, unless ``unsafe``; then say what is lost."""
    ok, why = sandbox.available()
    if ok:
        return
    if not unsafe:
        raise UnsafeRefusal(f"no sandbox can be made here ({why}); autograding refuses to run student code "
                            f"unsandboxed. Install bubblewrap, or pass --unsafe-no-sandbox "
                            f"(nbgrader: --TrustedExecute.unsafe_no_sandbox=True) to accept that "
                            + "; ".join(sandbox.UNSAFE_LOSSES))
    log("WARNING: grading WITHOUT a sandbox: " + "; ".join(sandbox.UNSAFE_LOSSES))


def autograde_preprocessors() -> list:
    """nbgrader's autograde pipeline with :class:`TrustedExecute` in place of ``Execute``."""
    from nbconvert.preprocessors import ClearMetadataPreprocessor
    from nbgrader.preprocessors import (AssignLatePenalties, CheckCellMetadata, IgnorePattern, LimitOutput,
                                        SaveAutoGrades)
    return [TrustedExecute, IgnorePattern, ClearMetadataPreprocessor, LimitOutput, SaveAutoGrades,
            AssignLatePenalties, CheckCellMetadata]


class TrustedExecute(NbGraderPreprocessor):
    """nbgrader preprocessor: sandboxed execution and trusted verdicts (see the module docstring)."""

    timeout = Integer(120, help="seconds each cell (and each graded call) may run").tag(config=True)
    notebook_timeout = Integer(600, help="wall-clock seconds one notebook's sandbox may run").tag(config=True)
    threads = Integer(0, help="torch/OpenMP/BLAS threads inside the sandbox (0: one per core, as nbgrader "
                      "grades one student at a time)").tag(config=True)
    memory_gb = Float(12.0, help="address-space limit of each process in the sandbox, in GiB").tag(config=True)
    sandbox_memory_gb = Float(4.0, help="memory of all the sandbox's processes together, in GiB").tag(config=True)
    disk_gb = Float(2.0, help="disk of the sandbox (submission copy, HOME, temporary files, results), in GiB"
                    ).tag(config=True)
    processes = Integer(256, help="processes and threads of the sandbox together").tag(config=True)
    unsafe_no_limits = Bool(False, help="grade where a per-sandbox cap cannot be made (unsafe)").tag(config=True)
    unsafe_no_sandbox = Bool(False, help="grade without a sandbox where none can be made (unsafe)").tag(config=True)
    grading_dir = Unicode("", help="the instructor's grading folder (default <course>/grading/<assignment>)"
                          ).tag(config=True)

    def settings(self) -> Settings:
        limits = sandbox.Limits(wall_seconds=float(self.notebook_timeout), threads=self.threads or os.cpu_count() or 1,
                                memory_bytes=int(self.memory_gb * 2**30),
                                sandbox_memory_bytes=int(self.sandbox_memory_gb * 2**30),
                                disk_bytes=int(self.disk_gb * 2**30), processes=self.processes)
        return Settings(cell_timeout=float(self.timeout), limits=limits, unsafe_no_sandbox=self.unsafe_no_sandbox)

    def preprocess(self, nb, resources):
        info = resources["nbgrader"]
        submission = Path(resources["metadata"]["path"]).resolve()
        course = submission.parents[2]
        require_sandbox(self.unsafe_no_sandbox, self.log.warning)
        if not self.unsafe_no_sandbox:
            require_controls(self.unsafe_no_limits, sandbox.lost_controls(), self.log.warning)
        workspace = Workspace(course, info["assignment"], self.grading_dir or None)
        settings = self.settings()
        result = grade_notebook(nb, submission, info["notebook"], workspace.files, workspace.inputs(), settings,
                                zoo=workspace.zoo, cache=workspace.cache(info["student"]))
        for grade_id, verdict in result.verdicts.items():
            if not verdict.passed:
                self.log.info("%s %s: %s", info["student"], grade_id, verdict.message)
        return apply(nb, result), resources


class MarkPending(NbGraderPreprocessor):
    """Feedback preprocessor: say which answers still await manual grading, and that they count
    as 0 until then (put it after nbgrader's ``GetGrades`` in ``GenerateFeedback.preprocessors``).

    Adds a note at the top of a notebook with pending answers and one above each pending
    answer; a notebook without pending answers is left unchanged.
    """

    def preprocess(self, nb, resources):
        info = resources["nbgrader"]
        with Gradebook(info["db_url"]) as gb:
            notebook = gb.find_submission_notebook(info["notebook"], info["assignment"], info["student"])
            pending = {g.name: g.max_score for g in notebook.grades if g.needs_manual_grade}
        if not pending:
            return nb, resources
        points = sum(pending.values())
        top = nbformat.v4.new_markdown_cell(
            f"**Grading pending: {points:g} point(s) of this notebook are not graded yet** "
            f"({len(pending)} answer(s), marked *pending* below). Until your instructor grades them they count "
            f"as 0, so the score above is not final.")
        cells = [top]
        for cell in nb.cells:
            grade_id = cell.metadata.get("nbgrader", {}).get("grade_id")
            if grade_id in pending:
                cells.append(nbformat.v4.new_markdown_cell(
                    f"**Pending:** the answer below ({pending[grade_id]:g} points) is not graded yet; "
                    f"its score of 0 is not final."))
            cells.append(cell)
        for index, cell in enumerate(cells):
            cell.setdefault("id", f"pending-note-{index}")
        nb.cells = cells
        return nb, resources
