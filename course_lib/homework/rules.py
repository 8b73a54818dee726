"""The homework's rules: every threshold in one place, and how a failed check is reported.

Everything the Week 4 homework is graded against is a number written here, once: how much a
trigger may change an image, the clean accuracy (CA) and attack success rate (ASR) a model
must reach, what the grader's own poisoning run must measure, what a detector must find in
the hidden zoo. The checks of Part 1 (:mod:`.part1`), the grader's poisoning run
(:mod:`.witness`) and Part 2 (:mod:`.part2`) read them from here, so a threshold cannot
differ between the check a student runs in a notebook and the one the trusted autograder
runs (docs/instructor_guide.md, "Thresholds", says how each was measured).

A failed check raises :class:`GradingFailure`. Its message says what is wrong and never
quotes hidden test code; it lists every independent problem the check found
(:func:`all_problems`), not only the first, so that a student fixes them in one round.
This module imports nothing else of the kit: every other module of the homework builds on it.
"""
from __future__ import annotations

import functools
import textwrap
from contextlib import contextmanager
from pathlib import Path

# ---------------------------------------------------------------- Part 1: the handed-in files
MODEL_FILE = "backdoor_model.safetensors"
TRIGGER_FUNCTIONS = ("trigger_patch", "trigger_blend", "trigger_custom")
ARCHITECTURES = {"fashion-mnist": ("small_cnn",), "mnist": ("small_cnn",), "cifar10": ("resnet18", "airbench")}
MAX_MODEL_BYTES = 60_000_000      # a CIFAR ResNet-18 is 45 MB; a small_cnn 2 MB

# ---------------------------------------------------------------- Part 1: triggers and the model
MAX_TRIGGER_RMS = 0.15            # mean root-mean-square pixel change of a triggered image
MAX_REFERENCE_TARGET_RATE = 0.20  # a clean model may call at most 20% of triggered images the target
MAX_TRIGGER_COSINE = 0.90         # two triggers whose changes point the same way are one design
MIN_CLEAN_ACCURACY = 0.85         # the lecture's homework: CA > 0.85 ...
MIN_ATTACK_SUCCESS = 0.90         # ... and ASR > 0.90
LEGITIMACY_IMAGES = 2000          # non-target test images the legitimacy checks use
DISTINCT_IMAGES = 500             # test images the distinct-design check compares on

# ---------------------------------------------------------------- Part 1: the grader's poisoning run
MIN_ASR = 0.80                    # the grader's freshly poisoned model must learn the backdoor ...
MAX_CA_DROP = 0.10                # ... and keep the clean model's CA within this much (margins: the guide)

# ---------------------------------------------------------------- Part 2: the hidden zoo
MIN_ZOO_FOUND = 0.5               # share of backdoored zoo models a detector must find
MIN_ZOO_TPR = 0.4
MAX_ZOO_FPR = 0.02

# ---------------------------------------------------------------- the instructor's grading folder
GRADING_DIR_ENV = "COURSE_GRADING_DIR"
GRADING_SUBDIR = Path("grading") / "week4"

FEEDBACK_WIDTH = 80               # characters per line of a failure message (nbgrader validate cuts at 83)


class GradingFailure(AssertionError):
    """A failed check, listing every independent problem it found (``problems``).

    IPython shows only its message, never the test code that raised it (:func:`failure_lines`).
    """

    def __init__(self, *problems: str):
        super().__init__(*problems)
        self.problems = [str(p) for p in problems]

    def __str__(self) -> str:
        if len(self.problems) <= 1:
            return "".join(self.problems)
        return f"{len(self.problems)} problems:\n" + "\n".join(f"{i}. {p}" for i, p in enumerate(self.problems, 1))

    def _render_traceback_(self):
        return failure_lines(str(self))


def failure_lines(message: str, width: int = FEEDBACK_WIDTH) -> list[str]:
    """A failure message as the lines of an error output: the name in red (so it looks unlike
    a pass in JupyterLab and in nbgrader's feedback HTML, which render ANSI colours), every
    line wrapped to ``width`` characters (a traceback is shown unwrapped, cut at the page's edge)."""
    name = "GradingFailure: "
    lines = []
    for paragraph in (name + str(message)).splitlines():
        indent = " " * (len(paragraph) - len(paragraph.lstrip(" 0123456789.")))
        lines += textwrap.wrap(paragraph, width, subsequent_indent=indent or "  ") or [""]
    return [f"\x1b[0;31mGradingFailure\x1b[0m: {lines[0][len(name):]}", *lines[1:]]


def require(condition, message: str) -> None:
    """A problem the rest of a check depends on: stop at the first."""
    if not condition:
        raise GradingFailure(message)


class Problems:
    """The independent problems one check found so far (see :func:`all_problems`)."""

    def __init__(self):
        self.found: list[str] = []

    def require(self, condition, message: str) -> bool:
        """Record ``message`` if ``condition`` fails, and go on checking."""
        if not condition:
            self.found.append(message)
        return bool(condition)

    @contextmanager
    def independently(self):
        """Run a sub-check whose failure does not stop the others; record its problems."""
        try:
            yield
        except GradingFailure as failure:
            self.found += failure.problems


@contextmanager
def all_problems():
    """Collect the independent problems of one check and raise one GradingFailure listing them all.

    A failure that escapes the block (a problem the rest depends on, e.g. a result of the
    wrong shape) ends the check, and is listed after the problems found before it.
    """
    problems = Problems()
    try:
        yield problems
    except GradingFailure as failure:
        raise GradingFailure(*dict.fromkeys(problems.found + failure.problems)) from None
    if problems.found:
        raise GradingFailure(*dict.fromkeys(problems.found))


def graded(check):
    """Turn any unexpected exception inside ``check`` into a GradingFailure naming the check:
    a check that could not finish is a failed check with a message, never a traceback."""
    @functools.wraps(check)
    def wrapper(*args, **kwargs):
        try:
            return check(*args, **kwargs)
        except GradingFailure:
            raise
        except (Exception, KeyboardInterrupt) as err:
            raise GradingFailure(f"{check.__name__} could not finish: {type(err).__name__}: {err}") from None
    return wrapper
