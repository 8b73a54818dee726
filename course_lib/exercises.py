"""Self-checks for the exercises at the end of each lecture notebook.

A student writes an answer (a prediction, a number, or a repaired copy of one of the
lecture's code sketches) and runs a check cell. :func:`check` compares the answer with
what is right *for this run* and prints one line: a pass, or what is wrong (never the
answer itself). It returns nothing and never stops a "Run all".

How a notebook declares an exercise (the convention tests/test_notebooks.py relies on):

1. A markdown cell states the task (predict-then-run, or "fix the lecture's sketch").
2. The **answer cell**: a code cell with the tag ``exercise`` and the metadata
   ``{"exercise": "<id>"}``. Its stored source is what the student starts from:
   ``answer = ...`` for a prediction, or the lecture's broken sketch for a repair task.
   Ids are ``"<notebook number>-<short name>"``, e.g. ``"02-flip"``.
3. The **check cell**, the next code cell: ``exercises.check("<id>", answer, ...)``.
   Pass what the check needs as keywords: ``expected=`` (the right value, computed in
   the check cell from the run, so it is true of *this* run) for a value, or the small
   real data a repaired function is run on for a repair task (registered with
   :func:`exercise`, below).
4. An open question (no check): a markdown cell with the tag ``question`` and the
   metadata ``{"question": "<id>"}``.

The instructor's reference answers live in ``solutions/lecture/<notebook>.py``, never in
the notebook, as cells read by :func:`load_solutions`::

    # %% answer 02-flip
    <code that replaces the answer cell>
    # %% wrong 02-flip: keeps
    <a wrong answer; the check must fail and print a message containing "keeps">
    # %% written 02-damage
    # The written answer to the open question 02-damage, as comments.

The notebook test runs each notebook with every ``answer`` filled in and asserts each
check passes, then runs each ``wrong`` answer and asserts its check fails with that text.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

PASS, FAIL, TODO = "✔", "✘", "…"

#: A verifier gets the student's answer and the check cell's keywords; it returns None when the
#: answer is right, else a message saying what is wrong (without giving the answer away).
Verifier = Callable[..., "str | None"]


@dataclass(frozen=True)
class Exercise:
    """A registered exercise: its id, what it asks (one line) and the function that verifies it."""

    name: str
    task: str
    verify: Verifier


EXERCISES: dict[str, Exercise] = {}


def exercise(name: str, task: str) -> Callable[[Verifier], Verifier]:
    """Register ``verify`` as the check of exercise ``name`` (a decorator)."""
    if not isinstance(name, str) or not re.fullmatch(r"\d\d-[a-z0-9-]+", name):
        raise ValueError(f"name must look like '02-flip' (notebook number, dash, short name), got {name!r}")
    if not isinstance(task, str) or not task:
        raise ValueError(f"task must be a non-empty string, got {task!r}")

    def register(verify: Verifier) -> Verifier:
        if name in EXERCISES:
            raise ValueError(f"exercise {name!r} is registered twice")
        EXERCISES[name] = Exercise(name, task, verify)
        return verify
    return register


def check(name: str, answer, *, expected=None, tolerance: float = 0.0, **data) -> None:
    """Check the answer to exercise ``name``; print one line saying whether it is right.

    - A registered exercise (see :func:`exercise`) runs its verifier on ``answer`` and ``data``.
    - Any other id compares ``answer`` with ``expected`` (a number within ``tolerance``, or
      an exact value: a bool, a string, a set of labels...).

    An answer still ``...`` (Ellipsis) counts as not answered yet.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be an exercise id such as '02-flip', got {name!r}")
    if not isinstance(tolerance, (int, float)) or tolerance < 0:
        raise ValueError(f"tolerance must be a number >= 0, got {tolerance!r}")
    if name not in EXERCISES and expected is None:
        raise ValueError(f"exercise {name!r} is not registered, so pass the right value as expected=...")
    if answer is Ellipsis:
        print(f"{TODO} {name}: not answered yet: replace the ... in the cell above, run it, then this cell")
        return
    try:
        if name in EXERCISES:
            problem = EXERCISES[name].verify(answer, **data)
        else:
            problem = compare(answer, expected, tolerance)
    except Exception as err:  # the student's function failed: say how, not where in the checker
        problem = f"running your answer raised {type(err).__name__}: {err}"
    if problem:
        print(f"{FAIL} {name}: not yet. {problem}")
        return
    print(f"{PASS} {name}: right.")


def compare(answer, expected, tolerance: float = 0.0) -> str | None:
    """None if ``answer`` matches ``expected``; else a hint (too high / too low / wrong kind)."""
    if isinstance(expected, bool) or not isinstance(expected, (int, float)):
        if isinstance(expected, (set, frozenset)):
            answer = set(answer) if isinstance(answer, (list, tuple, set, frozenset)) else answer
        if type(answer) is not type(expected):
            return f"expected a {type(expected).__name__}, got a {type(answer).__name__}"
        return None if answer == expected else "that is not what this run shows; look at the output again"
    if isinstance(answer, bool) or not isinstance(answer, (int, float, np.number)) or math.isnan(answer):
        return f"expected a number, got {answer!r}"
    if abs(answer - expected) <= tolerance:
        return None
    return "too high" if answer > expected else "too low"


def load_solutions(path) -> dict[str, dict[str, str]]:
    """The reference cells of a ``solutions/lecture/<notebook>.py`` file, by exercise id.

    Returns ``{id: {"answer": code, "wrong": code, "wrong_says": text, "written": text}}``
    (each key present only where the file has that cell).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path must be a solutions file, {path} does not exist")
    found: dict[str, dict[str, str]] = {}
    for header, body in re.findall(r"^# %% ([^\n]+)\n(.*?)(?=^# %% |\Z)", path.read_text(), flags=re.M | re.S):
        kind, _, rest = header.partition(" ")
        name, _, says = rest.partition(":")
        if kind not in ("answer", "wrong", "written"):
            raise ValueError(f"{path}: unknown cell kind {kind!r} in '# %% {header}'")
        entry = found.setdefault(name.strip(), {})
        entry[kind] = body.strip() + "\n"
        if kind == "wrong":
            entry["wrong_says"] = says.strip()
    return found


# The repair tasks ("fix the lecture's sketch"), one per erratum a notebook teaches.

@exercise("02-flip", "repair the lecture's random label flipping so that every chosen label changes")
def _flip(flip, labels: torch.Tensor, rate: float = 0.2, num_classes: int = 10):
    """Erratum 9: ``randint(0, 10)`` can draw the old label again."""
    labels = torch.as_tensor(labels)
    original = labels.clone()
    flipped = torch.as_tensor(np.asarray(flip(labels, rate, seed=0)))
    if not torch.equal(labels, original):
        return "your function changed the labels it was given; return a new array instead"
    if flipped.shape != labels.shape:
        return f"it should return one label per image ({tuple(labels.shape)}), got shape {tuple(flipped.shape)}"
    if flipped.min() < 0 or flipped.max() >= num_classes:
        return f"some new labels are outside 0..{num_classes - 1}"
    changed, wanted = int((flipped != labels).sum()), round(rate * len(labels))
    if changed < wanted:
        return f"it keeps some chosen labels: only {changed} of the {wanted} chosen labels changed"
    if changed > wanted:
        return f"it changed {changed} labels, more than the {wanted} that rate={rate} asks for"
    return None


@exercise("03-noops", "repair the lecture's choice of images to poison so that every chosen image is relabelled")
def _noops(choose, labels: torch.Tensor, rate: float = 0.05, target: int = 0):
    """Erratum 9: an image already in the target class keeps its label when "relabelled" as the target,
    so fewer images than the rate says are dirty-label poisons (it still gets the trigger)."""
    labels = torch.as_tensor(labels)
    chosen = torch.as_tensor(np.asarray(choose(labels, rate, target, seed=0))).long().flatten()
    if len(chosen) != round(rate * len(labels)):
        return f"it chose {len(chosen)} images, not the {round(rate * len(labels))} that rate={rate} asks for"
    if len(set(chosen.tolist())) != len(chosen):
        return "it chose some images twice"
    if chosen.min() < 0 or chosen.max() >= len(labels):
        return "some indices are outside the dataset"
    wasted = int((labels[chosen] == target).sum())
    if wasted:
        return f"{wasted} of the chosen images are already in the target class: relabelling them changes nothing"
    return None


@exercise("04-asr", "repair the lecture's attack success rate so that it counts only images the trigger must move")
def _asr(asr, model, data, trigger, target: int):
    """Erratum 1: counting target-class images as successes inflates the ASR."""
    from .metrics import attack_success_rate

    theirs, right = float(asr(model, data.images, data.labels, trigger, target)), \
        attack_success_rate(model, data, trigger, target)
    if abs(theirs - right) <= 1e-6:
        return None
    inflated = _lecture_counting(model, data, trigger, target)
    if abs(theirs - inflated) <= 1e-6:
        return "it still counts the test images whose true class is already the target"
    return "it does not give the share of non-target images that the trigger sends to the target"


def _lecture_counting(model, data, trigger, target: int) -> float:
    from .train import predict
    return (predict(model, trigger(data.images)) == target).float().mean().item()


@exercise("05-reseed", "repair the lecture's sample-specific trigger so that it leaves NumPy's global generator alone")
def _reseed(pattern, sample_ids=range(8), size: int = 5):
    """Erratum 9: ``np.random.seed`` inside a trigger changes every later random draw of the program."""
    state = np.random.get_state()
    np.random.seed(1234)
    expected_next = np.random.random()
    np.random.seed(1234)
    first = [np.asarray(pattern(i, size)) for i in sample_ids]
    if np.random.random() != expected_next:
        np.random.set_state(state)
        return "it still reseeds (or draws from) NumPy's global generator"
    np.random.set_state(state)
    again = [np.asarray(pattern(i, size)) for i in sample_ids]
    if any(p.shape != (size, size) for p in first):
        return f"each pattern should be a {size}x{size} array"
    if not all(np.array_equal(a, b) for a, b in zip(first, again)):
        return "the same sample id gives different patterns: the attacker could not regenerate them"
    if len({p.tobytes() for p in first}) < len(first):
        return "different sample ids give the same pattern"
    return None


# Computations whose right value the check cell should not spell out (the formula is the exercise).

@exercise("01-asr", "the attack success rate, computed by hand")
def _asr_by_hand(answer, run):
    return compare(answer, run.asr, 1e-4)


@exercise("07-score", "the detection score of appendix A.2 (TPR - FPR)")
def _detection_score(answer, flagged_poisoned: int, poisoned: int, flagged_clean: int, clean: int):
    return compare(answer, flagged_poisoned / poisoned - flagged_clean / clean, 1e-4)


# Choices a student must justify from the run's statistics (the idea, not a one-character repair).

@exercise("06-threshold", "choose Neural Cleanse's anomaly-index threshold for a false-alarm budget on clean models")
def _nc_threshold(answer, n_labels: int, budget: float = 0.05):
    """Right when ``answer`` is the smallest multiple of 0.25 whose chance false-alarm rate on a clean
    model with ``n_labels`` labels (Wang et al.'s MAD rule, simulated) is at most ``budget``."""
    from .defenses.neural_cleanse import chance_false_alarm_rate

    if isinstance(answer, bool) or not isinstance(answer, (int, float, np.number)) or not answer > 0:
        return f"expected a positive number, got {answer!r}"
    if abs(answer * 4 - round(answer * 4)) > 1e-9:
        return "give the threshold as a multiple of 0.25"
    if chance_false_alarm_rate(n_labels, float(answer)) > budget:
        return f"too low: with it, more than {budget:.0%} of clean models get a false alarm"
    if answer > 0.25 and chance_false_alarm_rate(n_labels, float(answer) - 0.25) <= budget:
        return "a smaller threshold also keeps the false alarms within the budget: you give up detections for nothing"
    return None


# Predictions from a formula (made before the notebook runs the computation) and choices a student
# must justify from the run's statistics (issue 24: the idea, not a one-character repair).

def _scalar(answer):
    """A one-element tensor or array as a plain number (``w.abs().max() / 254`` is a fine answer)."""
    if isinstance(answer, torch.Tensor) and answer.numel() == 1:
        return answer.item()
    if isinstance(answer, np.ndarray) and answer.size == 1:
        return answer.item()
    return answer


def _number(answer) -> str | None:
    if isinstance(answer, bool) or not isinstance(answer, (int, float, np.number)) or math.isnan(answer):
        return f"expected a number, got {answer!r}"
    return None


def _pair(answer, what: str):
    """``answer`` as a (first, second) pair, or a message saying it is not one."""
    if not isinstance(answer, (tuple, list)) or len(answer) != 2:
        return None, f"expected a pair ({what}), got {answer!r}"
    if any(part is Ellipsis for part in answer):
        return None, "replace every ... of the pair"
    return tuple(answer), None


@exercise("01-white", "the smallest [0, 1] pixel value that the lecture's brightness clamp turns white")
def _white(answer, factor: float = 1.3):
    """Erratum 12: on a [-1, 1] image, clamp(factor * x, 0, 1) is white (1) where x >= 1 / factor, i.e. where the
    [0, 1] pixel p = (x + 1) / 2 is at least (1 / factor + 1) / 2."""
    answer = _scalar(answer)
    return _number(answer) or compare(answer, (1 / factor + 1) / 2, 1e-3)


@exercise("02-alarm", "a per-class alarm threshold that stays silent on honest label noise, and what it catches")
def _alarm(answer, clean: list, honest: list, attacked: dict):
    """``answer`` = (threshold in whole points, {rate: does the alarm fire on the targeted model at that rate}).
    The alarm fires when some class's accuracy is more than ``threshold`` points below the clean model's."""
    answer, problem = _pair(answer, "a threshold in whole points, a dict rate -> True/False")
    if problem:
        return problem
    threshold, caught = answer
    if _number(threshold) or threshold < 0 or threshold != int(threshold):
        return f"the threshold should be a whole number of percentage points (0, 1, 2, ...), got {threshold!r}"
    drops = lambda accs: [100 * (c - a) for c, a in zip(clean, accs)]
    right = max(0, math.ceil(max(drops(honest)) - 1e-9))
    if threshold < right:
        return f"too low: with {threshold} points the alarm already fires on the honest-noise model"
    if threshold > right:
        return "a smaller whole number also stays silent on the honest-noise model: you give up detections for nothing"
    if not isinstance(caught, dict) or set(caught) != set(attacked) or \
            not all(isinstance(v, (bool, np.bool_)) for v in caught.values()):
        return f"the second part should be a dict with the rates {sorted(attacked)} as keys and True or False as values"
    wrong = [rate for rate, accs in attacked.items() if bool(caught[rate]) != (max(drops(accs)) > threshold)]
    if wrong:
        return f"with your threshold, what you say about rate {', '.join(map(str, sorted(wrong)))} is not what this run shows"
    return None


@exercise("03-bound", "the PSNR that an L-infinity budget guarantees, and whether the poisoned images keep it")
def _psnr_bound(answer, eps: float, clean: torch.Tensor, poisoned: torch.Tensor):
    """``answer`` = (the smallest PSNR any image changed by at most ``eps`` per pixel can have, whether the mean
    PSNR of ``poisoned`` against ``clean`` is at least that bound)."""
    from .metrics import stealth_summary

    answer, problem = _pair(answer, "a bound in dB, True or False")
    if problem:
        return problem
    bound, holds = _scalar(answer[0]), answer[1]
    problem = _number(bound) or compare(bound, 10 * math.log10(1 / eps ** 2), 0.01)
    if problem:
        return f"the bound: {problem}"
    if not isinstance(holds, (bool, np.bool_)):
        return f"the second part should be True or False, got {holds!r}"
    if bool(holds) != (stealth_summary(clean, poisoned)["psnr"] >= bound):
        return "the bound is right; what you say about the label-consistent images is not what this run shows"
    return None


@exercise("04-quant", "the largest change that 8-bit rounding can make to one layer's weights")
def _quantization(answer, weight: torch.Tensor):
    """Symmetric int8 (``persistence.quantized_8bit``): scale s = max|w| / 127, every weight rounded to the
    nearest multiple of s, so no weight moves by more than s / 2."""
    answer, step = _scalar(answer), weight.detach().abs().max().item() / 127
    return _number(answer) or compare(answer, step / 2, 1e-3 * step)


@exercise("05-design", "design a trigger within a stealth budget that still plants a backdoor")
def _design(trigger, lab, images: torch.Tensor, target: int, rate: float, psnr_min: float = 30.0, asr_min: float = 0.9):
    """Right when ``trigger`` (a function of a batch of [0, 1] images) keeps the mean PSNR on ``images`` at or above
    ``psnr_min`` and the model poisoned with it (BadNets at ``rate``, trained by ``lab``) reaches ``asr_min``."""
    from .attacks import badnets
    from .metrics import stealth_summary

    if not callable(trigger):
        return "expected a trigger: a function that takes a batch of images and returns the triggered batch"
    out = torch.as_tensor(trigger(images.clone()))
    if out.shape != images.shape:
        return f"it should return a batch of the same shape, {tuple(images.shape)}, got {tuple(out.shape)}"
    if out.min() < 0 or out.max() > 1:
        return "some pixels left the range [0, 1]"
    if torch.equal(out, images):
        return "it changes nothing"
    psnr = stealth_summary(images, out)["psnr"]
    if psnr < psnr_min:
        return f"its mean PSNR on these images is {psnr:.1f} dB, below the budget of {psnr_min:.0f} dB"
    run = lab.run_poisoned(badnets(lab.train, trigger=trigger, target=target, rate=rate, seed=lab.seed), progress=False)
    if run.asr < asr_min:
        return f"it is within the budget ({psnr:.1f} dB), but the model poisoned with it reaches an ASR of {run.asr:.1%}, below {asr_min:.0%}"
    return None


@exercise("07-floor", "the accuracy floor of the mitigation score for a test set of n images")
def _floor(answer, accuracy: float, n: int):
    """Right when ``answer`` (in percentage points) is the smallest multiple of 0.5 at or above two standard
    errors of a drop between two accuracies near ``accuracy``, each measured on its own ``n`` images:
    2 * sqrt(2 p (1 - p) / n) (a difference of two independent estimates adds their variances)."""
    answer = _scalar(answer)
    problem = _number(answer)
    if problem:
        return problem
    if abs(answer * 2 - round(answer * 2)) > 1e-9:
        return "give the floor in percentage points, as a multiple of 0.5 (e.g. 2.5, not 0.025)"
    need = 200 * math.sqrt(2 * accuracy * (1 - accuracy) / n)
    right = math.ceil(need * 2 - 1e-9) / 2
    if answer < right:
        return "too low: a drop that small is within the measurement noise of this many test images"
    if answer > right:
        return "too high: a smaller multiple of 0.5 is already above the noise"
    return None
