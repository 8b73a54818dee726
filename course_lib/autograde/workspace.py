"""Where the autograder keeps its files in an nbgrader course folder.

``<course>/grading/<assignment>/`` the instructor's grading files (``zoo build --out``);
``<course>/source/<assignment>/zoo/`` the public zoo, bound read-only into every sandbox;
``<course>/.autograde/<assignment>/inputs-<hash>/`` the inputs every sandbox reads, written
once per set of grading files; ``<course>/.autograde/<assignment>/results/<student>/`` each
student's cached results (see :func:`.pipeline.grade_notebook`).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from .. import grading
from .plan import write_inputs


class Workspace:
    """The autograder's folders for one assignment of one course."""

    def __init__(self, course, assignment: str, grading_dir=None):
        self.course, self.assignment = Path(course).resolve(), assignment
        folder = grading_dir or os.environ.get(grading.GRADING_DIR_ENV) or self.course / "grading" / assignment
        self.files = grading.GradingFiles(folder)
        self.root = self.course / ".autograde" / assignment

    @property
    def zoo(self) -> Path:
        return self.course / "source" / self.assignment / "zoo"

    def inputs(self) -> Path:
        """The inputs folder for the current grading files, written on first use (atomically,
        so parallel graders never see half of it)."""
        digest = hashlib.sha256((self.files.folder / "answer_key.json").read_bytes()).hexdigest()[:16]
        folder = self.root / f"inputs-{digest}"
        if not (folder / "plans.json").is_file():
            self.root.mkdir(parents=True, exist_ok=True)
            self.root.parent.chmod(0o700)     # cached verdicts and the grader's inputs: never a student's
            tmp = Path(tempfile.mkdtemp(prefix="inputs-", dir=self.root))
            write_inputs(tmp, self.files)
            try:
                tmp.rename(folder)
            except OSError:          # another grader finished first
                shutil.rmtree(tmp, ignore_errors=True)
        return folder

    def cache(self, student: str) -> Path:
        return self.root / "results" / student
