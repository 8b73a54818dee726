"""The data the grader measures on, and the instructor's private grading folder.

Two things a student never supplies: the test split every check is measured on
(:func:`evaluation_data`, a fresh copy for each caller, so that no check can change what the
next one sees), and the instructor's **grading folder** written by ``zoo build``
(:class:`GradingFiles`): the answer key of the hidden zoo, the clean reference model (a model
that never saw any student's trigger) and the zoo's activations. Only the trusted autograder,
and the instructor's own copy of the source notebooks, ever read that folder; during
autograding a student's kernel is refused it (:func:`grading_dir`).
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import numpy as np
from safetensors.torch import load_file

from ..checkpoints import load_checkpoint
from ..data import ImageDataset, load_dataset
from .rules import GRADING_DIR_ENV, GRADING_SUBDIR, require


@functools.lru_cache(maxsize=4)
def _test_split(dataset: str) -> ImageDataset:
    return load_dataset(dataset, "test")


def evaluation_data(dataset: str) -> ImageDataset:
    """The test split of ``dataset`` (data the student does not supply), as a fresh copy.

    A copy every time: no caller can change the images another check will use.
    """
    data = _test_split(dataset)
    return data.replace(images=data.images.clone(), labels=data.labels.clone())


class GradingFiles:
    """The instructor's grading folder, written by ``zoo build``: answer key, reference model,
    the hidden zoo's activations and checkpoints. Only the trusted autograder (and the
    instructor's own copy of the source notebooks) ever reads it."""

    def __init__(self, folder):
        self.folder = Path(folder)
        require((self.folder / "answer_key.json").is_file(),
                f"the instructor's grading files were not found (answer_key.json in {self.folder}): build them "
                f"with `python -m course_lib zoo build --out <course>/{GRADING_SUBDIR.as_posix()} --public "
                f"<course>/source/week4/zoo` (docs/instructor_guide.md)")

    @functools.cached_property
    def answer_key(self) -> dict:
        return json.loads((self.folder / "answer_key.json").read_text())

    @property
    def dataset(self) -> str:
        """The dataset the homework is graded on: the one the zoo was built for."""
        return self.answer_key["dataset"]

    @functools.cached_property
    def reference_model(self):
        """The clean reference model built with the zoo: it has never seen any student's trigger."""
        model, _ = load_checkpoint(self.folder / "reference.safetensors", expected_dataset=self.dataset)
        return model

    def activations(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(activations, labels) of the graded zoo model ``name`` on its own training set."""
        tensors = load_file(str(self.folder / "activations" / f"{name}.safetensors"))
        return tensors["activations"].numpy(), tensors["labels"].numpy()

    def known_zoo_model(self, model) -> str | None:
        """The zoo model whose weights ``model`` carries (None for a model of the student's own)."""
        # imported here: the zoo module loads the attacks and defenses, which a Part 1 sandbox never needs
        from ..zoo import known_zoo_model
        return known_zoo_model(model, self.folder)


def grading_dir() -> Path:
    """The instructor's grading folder, for the source notebooks' hidden tests.

    ``$COURSE_GRADING_DIR`` when set; otherwise ``grading/week4`` in the nbgrader course
    folder, found by walking up from the working directory to ``nbgrader_config.py``.
    Refused during autograding: there the hidden tests are decided by the trusted
    autograder, never inside a student's kernel.
    """
    require(os.environ.get("NBGRADER_EXECUTION") != "autograde",
            "hidden tests are never run in a student's kernel: grade with the kit's trusted autograder, "
            "`python -m course_lib autograde week4` (docs/instructor_guide.md)")
    cwd = Path.cwd()
    if os.environ.get(GRADING_DIR_ENV):
        candidates = [Path(os.environ[GRADING_DIR_ENV])]
    else:
        candidates = [p / GRADING_SUBDIR for p in (cwd, *cwd.parents) if (p / "nbgrader_config.py").is_file()]
    for folder in candidates:
        if (folder / "answer_key.json").is_file():
            return folder
    return GradingFiles(candidates[0] if candidates else cwd / GRADING_SUBDIR).folder


@functools.lru_cache(maxsize=2)
def _grading_files(folder: str) -> GradingFiles:
    return GradingFiles(folder)


def grading_files() -> GradingFiles:
    """The :class:`GradingFiles` of :func:`grading_dir`, read once per folder."""
    return _grading_files(str(grading_dir()))
