"""The checks a homework notebook's test cells call, run in the student's own kernel.

While a student works, each test cell calls a ``check_*`` function here: it calls the
student's function (in the same kernel, so the student sees the error their own code raised)
and applies the rule of :mod:`.part1`, :mod:`.part2` or :mod:`.witness` to what it returned.
A failure is a :class:`~.rules.GradingFailure` whose message says what is wrong, never a
traceback into hidden test code.

These checks are for feedback, not for grades. Code in a submission can patch anything in its
own kernel, this module included; so the trusted autograder never runs them there. It calls
the student's functions in a sandbox on inputs it chooses and applies the very same rules in
its own process (:mod:`course_lib.autograde`).
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from ..data import ImageDataset
from . import witness
from .files import evaluation_data, grading_files
from .part1 import (grader_trigger, legitimacy_images, load_student_model, recorded_trigger, verify_attack_success,
                    verify_backdoor_trigger, verify_clean_accuracy, verify_distinct, verify_poisoning,
                    verify_trigger_contract, verify_triggered)
from .part2 import (activation_probe, planted_activations, verify_activations, verify_flags, verify_planted,
                    verify_zoo_fpr, verify_zoo_tpr, verify_zoo_verdicts, zoo_report)
from .rules import (DISTINCT_IMAGES, MAX_ZOO_FPR, MIN_ATTACK_SUCCESS, MIN_CLEAN_ACCURACY, MIN_ZOO_FOUND, MIN_ZOO_TPR,
                    MODEL_FILE, TRIGGER_FUNCTIONS, GradingFailure, all_problems, graded, require)


@contextmanager
def student_code(call: str):
    """Run a student's function; an error or an interruption (time limit) becomes a GradingFailure."""
    try:
        yield
    except KeyboardInterrupt:
        raise GradingFailure(f"{call} was interrupted: it did not finish within the time limit") from None
    except Exception as err:
        raise GradingFailure(f"{call} raised {type(err).__name__}: {err}") from None


# ---------------------------------------------------------------- Part 1

def student_function(namespace: dict, name: str):
    """The function ``name`` defined by the notebook (``namespace`` is its ``globals()``)."""
    function = namespace.get(name)
    require(function is not None, f"the notebook defines no {name}: run the cell that defines it "
                                  f"and check that it runs without an error")
    require(callable(function), f"{name} must be a function, got {type(function).__name__}")
    return function


def call_trigger(trigger, images: torch.Tensor, name: str):
    with student_code(f"{name}(images)"):
        return trigger(images)


@graded
def check_trigger(trigger, images: torch.Tensor, *, name: str) -> None:
    """The trigger contract (:func:`verify_trigger_contract`), checked in the student's kernel.

    Stricter than the autograder in one point: it also looks at the input after the call,
    so it catches a trigger that modifies its input even when the damage is invisible in
    the output (a patch written in place twice is the same patch).
    """
    require(callable(trigger), f"{name} must be a function, got {type(trigger).__name__}")
    probe = images.clone()
    first = call_trigger(trigger, probe, name)
    require(torch.equal(probe, images), f"{name} must not modify its input: work on a copy "
                                        f"(images.clone())")
    again = call_trigger(trigger, probe, name)
    alone = call_trigger(trigger, images[5:6].clone(), name)
    batch = call_trigger(trigger, torch.cat([images, images.flip(0)]), name)
    verify_trigger_contract(images, first, again, alone, batch, name)


@graded
def check_distinct_triggers(namespace: dict, *, target: int, names=TRIGGER_FUNCTIONS) -> None:
    """Three trigger designs: each a valid backdoor trigger, pairwise different (instructor's run)."""
    files = grading_files()
    data = evaluation_data(files.dataset)
    images, legit = data.images[:DISTINCT_IMAGES], legitimacy_images(data, target)
    triggered = {}
    with all_problems() as problems:
        for name in names:
            with problems.independently():
                trigger = student_function(namespace, name)
                with problems.independently():
                    check_trigger(trigger, data.images[:64], name=name)
                verify_backdoor_trigger(legit, verify_triggered(legit, call_trigger(trigger, legit.clone(), name),
                                                                name), files.reference_model, name=name, target=target)
                triggered[name] = verify_triggered(images, call_trigger(trigger, images.clone(), name), name)
        if len(triggered) == len(names):
            verify_distinct(images, triggered)


@graded
def check_poisoning(poison_fn, data: ImageDataset, *, target: int, rate: float, seed: int = 0) -> None:
    """:func:`verify_poisoning` on ``poison_fn(data, trigger, target, rate, seed=seed)``, in the
    student's kernel; also checks directly that ``data`` was left unchanged."""
    images, labels = data.images.clone(), data.labels.clone()
    call = f"poison_dataset(data, trigger, target={target}, rate={rate}, seed={seed})"
    with student_code(call):
        result = poison_fn(data, grader_trigger, target, rate, seed=seed)
    require(torch.equal(data.images, images) and torch.equal(data.labels, labels),
            f"{call} modified its input data: build new tensors (clone) instead")
    with student_code(call):
        again = poison_fn(data, grader_trigger, target, rate, seed=seed)
    again = again[1] if isinstance(again, tuple) and len(again) == 2 else None
    verify_poisoning(data.replace(images=images, labels=labels), result, again, target=target, rate=rate, call=call)


@graded
def check_clean_accuracy(path=MODEL_FILE, *, minimum: float = MIN_CLEAN_ACCURACY) -> None:
    """CA of the handed-in model on the test split is above ``minimum`` (instructor's run)."""
    files = grading_files()
    model, _ = load_student_model(path, dataset=files.dataset)
    verify_clean_accuracy(model, evaluation_data(files.dataset), minimum, Path(path).name)


@graded
def check_attack_success(namespace: dict, path=MODEL_FILE, *, target: int,
                         minimum: float = MIN_ATTACK_SUCCESS) -> None:
    """ASR of the handed-in model with the trigger recorded in its metadata (instructor's run),
    on the test split and on a pool of the grader's images from both splits
    (:func:`.witness.verify_model_follows`)."""
    files = grading_files()
    model, meta = load_student_model(path, dataset=files.dataset)
    name = recorded_trigger(meta, Path(path).name)
    trigger = student_function(namespace, name)
    data = evaluation_data(files.dataset)
    with all_problems() as problems:
        with problems.independently():
            check_trigger(trigger, data.images[:64], name=name)
        with problems.independently():
            triggered = call_trigger(trigger, data.images.clone(), name)
            verify_attack_success(model, data, triggered, files.reference_model, target=target, name=name,
                                  minimum=minimum)
        pool = witness.draw_pool(witness.mixed_splits(files.dataset), target=target, seed=witness.draw_seed())
        witness.verify_model_follows(model, pool, call_trigger(trigger, pool.stamped.images.clone(), name),
                                     target=target, name=name, minimum=minimum)


@graded
def check_trigger_poisons(namespace: dict, path=MODEL_FILE, *, dataset: str, target: int,
                          seed: int | None = None) -> str:
    """The grader's poisoning run (:mod:`.witness`) in the student's kernel, with the trigger recorded in
    the model file: the grader's rule and recipe on a pool drawn with a fresh seed (``seed`` to repeat a
    run). Prints and returns the measurement. (The trusted grader also checks the trigger's legitimacy
    against its clean reference model, which students do not have.)"""
    _, meta = load_student_model(path, dataset=dataset)
    name = recorded_trigger(meta)
    trigger = student_function(namespace, name)
    seed = witness.draw_seed() if seed is None else seed
    pool = witness.draw_pool(witness.mixed_splits(dataset), target=target, seed=seed)
    triggered = verify_triggered(pool.stamped.images, call_trigger(trigger, pool.stamped.images.clone(), name), name)
    message = witness.verify_witness(witness.poison_and_train(pool, triggered, target=target, seed=seed, name=name))
    print(message)
    return message


# ---------------------------------------------------------------- Part 2

@graded
def check_activations(extract_fn) -> None:
    """:func:`verify_activations` on ``extract_fn(model, images)``, in the student's kernel."""
    model, images = activation_probe()
    with student_code("extract_activations(model, images)"):
        result = extract_fn(model, images)
    verify_activations(result)


def run_detector(detector, activations: np.ndarray, labels: np.ndarray, what: str) -> np.ndarray:
    """The student's detector on one problem, in the student's kernel. scikit-learn runs
    single-threaded: per-class problems of a few thousand samples are fastest that way."""
    with student_code(f"activation_clustering on {what}"), threadpool_limits(limits=1):
        flags = detector(activations.copy(), labels.copy())
    return verify_flags(flags, labels, what)


@graded
def check_detector_on_planted(detector) -> None:
    """:func:`verify_planted` on the student's detector, in the student's kernel."""
    activations, labels, _ = planted_activations()
    verify_planted(run_detector(detector, activations, labels, "the planted example"))


_REPORTS: dict = {}


def detector_report(detector) -> dict:
    """:func:`zoo_report` of ``detector`` run in this kernel on the graded zoo (instructor's run),
    computed once per detector function (three checks share it)."""
    if detector not in _REPORTS:
        files = grading_files()
        flags = {}
        for name in files.answer_key["models"]:
            activations, labels = files.activations(name)
            flags[name] = run_detector(detector, activations, labels, name)
        _REPORTS[detector] = zoo_report(flags, files.answer_key)
    return _REPORTS[detector]


@graded
def check_zoo_verdicts(detector, *, min_found: float = MIN_ZOO_FOUND) -> None:
    verify_zoo_verdicts(detector_report(detector), min_found)


@graded
def check_zoo_tpr(detector, *, minimum: float = MIN_ZOO_TPR) -> None:
    verify_zoo_tpr(detector_report(detector), minimum)


@graded
def check_zoo_fpr(detector, *, maximum: float = MAX_ZOO_FPR) -> None:
    verify_zoo_fpr(detector_report(detector), maximum)
