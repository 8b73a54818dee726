"""The trusted grader: every autograded test's verdict, decided from data in its own process.

Inputs: what the student's functions returned in the sandbox (``out/<call id>.safetensors``,
read as plain tensors: no code in them runs), the handed-in model file (safetensors + JSON),
and the instructor's grading files. The rules are :mod:`course_lib.grading`'s ``verify_*``
functions, the very ones the visible test cells apply in the student's kernel. A test whose
inputs the sandbox failed to produce (the function raised, hung, or killed its kernel)
fails with that reason, and only that test. A passing test may carry a message too: the
witness test shows the grader's own measurement (:mod:`course_lib.homework.witness`).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import hmac
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors

from .. import grading
from ..homework import witness
from ..data import ImageDataset, load_dataset
from ..grading import GradingFailure
from .harvest import RECORD, signature
from .plan import CONTRACT_IMAGES, POISON_CASES, TARGET, poison_case_data, witness_pool

MAX_OUTPUT_BYTES = 512 * 2**20


@dataclass(frozen=True)
class Verdict:
    """One test's outcome: passed, or failed with the message the student sees."""

    passed: bool
    message: str = ""


def read_regular_file(path: Path, max_bytes: int = MAX_OUTPUT_BYTES) -> bytes | None:
    """The bytes of ``path`` if it is a regular file (never a symlink) of at most ``max_bytes``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_size > max_bytes:
            return None
        return handle.read(max_bytes + 1)[:max_bytes]


class Outputs:
    """What the sandbox wrote: one result (or error) per call. A result counts only with the
    harvest's signature for that call (``key``: the run's signing key, see :mod:`.harvest`)."""

    def __init__(self, folder: Path, key: bytes):
        self.folder, self.key = Path(folder), key
        record = read_regular_file(self.folder / RECORD, 2**20)
        try:
            self.record = json.loads(record) if record else {}
        except (ValueError, RecursionError):
            self.record = {}
        if not isinstance(self.record, dict):
            self.record = {}

    def signed(self, call_id: str, data: bytes) -> bool:
        """Whether ``data`` is what the harvest took from the call ``call_id`` when it returned."""
        expected = signature(self.key, call_id, hashlib.sha256(data).digest())
        return hmac.compare_digest(str(self.record.get(call_id, "")), expected)

    def tensors(self, call_id: str) -> dict:
        data = read_regular_file(self.folder / f"{call_id}.safetensors")
        error = read_regular_file(self.folder / f"{call_id}.error.txt", 10_000)
        if data is not None and not self.signed(call_id, data):
            if error is not None:           # the call itself failed: say how, and ignore the file
                raise GradingFailure(f"{_call_text(call_id)} failed in your notebook: "
                                     f"{error.decode(errors='replace')[:1000]}")
            raise GradingFailure(f"{_call_text(call_id)} has no result of its own: the file the grader found was "
                                 f"not what the call returned when it finished (written before or after the call, "
                                 f"or for a call that failed), so it was ignored")
        if data is not None:
            try:
                return load_safetensors(data)
            except Exception as err:  # a corrupt file is the student's loss, never the grader's crash
                raise GradingFailure(f"what {_call_text(call_id)} returned could not be read back as tensors "
                                     f"(the file was changed after it was written: {err})") from None
        if error is not None:
            raise GradingFailure(f"{_call_text(call_id)} failed in your notebook: "
                                 f"{error.decode(errors='replace')[:1000]}")
        raise GradingFailure(f"{_call_text(call_id)} produced no result: the notebook's kernel died or "
                             f"ran out of time before it")

    def result(self, call_id: str, k: int = 0):
        """The value returned by the ``k``-th call, rebuilt from its tensors."""
        return unflatten(self.tensors(call_id), f"call{k}")


def _call_text(call_id: str) -> str:
    function = call_id.split(".")[0]
    return {"zoo": "activation_clustering on a zoo model", "planted": "activation_clustering on the planted example",
            "activations": "extract_activations", "p1-test-poison": "poison_dataset",
            "p1-test-poison-hidden": "poison_dataset"}.get(function, f"{function}(images)")


class _Returned:
    """A returned object with ``images`` and ``labels`` (checked as an ImageDataset later)."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels


def unflatten(tensors: dict, prefix: str):
    """Undo :func:`.calls.as_tensors`: a tensor, a tuple, or an object with images and labels."""
    if prefix in tensors:
        return tensors[prefix]
    if f"{prefix}.length" in tensors:
        return tuple(unflatten(tensors, f"{prefix}.{i}") for i in range(int(tensors[f"{prefix}.length"])))
    if f"{prefix}.images" in tensors:
        return _Returned(tensors[f"{prefix}.images"], tensors.get(f"{prefix}.labels"))
    raise GradingFailure("the function returned nothing the autograder could read")


def as_dataset(returned, like: ImageDataset):
    """A returned images/labels pair as an ImageDataset (a failure if it is not one)."""
    if not isinstance(returned, _Returned):
        return returned
    try:
        return ImageDataset(returned.images, returned.labels, like.classes, like.name)
    except (ValueError, TypeError) as err:
        raise GradingFailure(f"the poisoned dataset is not a valid ImageDataset: {err}") from None


@functools.lru_cache(maxsize=2)
def _train_split(dataset: str) -> ImageDataset:
    """The training split the poisoning cases are cut from, loaded once per grading process."""
    return load_dataset(dataset, "train")


class Context:
    """Everything one submission's verdicts are decided from, loaded once and on demand."""

    def __init__(self, outputs: Outputs, submission: Path, files: grading.GradingFiles, inputs: Path | None = None):
        self.outputs, self.submission, self.files, self.inputs = outputs, Path(submission), files, inputs

    @functools.cached_property
    def test(self) -> ImageDataset:
        return grading.evaluation_data(self.files.dataset)

    @property
    def train(self) -> ImageDataset:
        return _train_split(self.files.dataset)

    @functools.cached_property
    def model(self):
        return grading.load_student_model(self.submission / grading.MODEL_FILE, dataset=self.files.dataset,
                                          files=self.files)

    def triggered(self, name: str, problems: grading.Problems | None = None) -> torch.Tensor:
        """The trigger ``name`` applied to the whole test split, once its contract holds (with
        ``problems``, a broken contract is recorded there and the images are still returned, so
        that the test also reports what else is wrong with them)."""
        contract = self.test.images[:CONTRACT_IMAGES]
        outputs = self.outputs
        batch = outputs.result(f"{name}.eval")
        with problems.independently() if problems is not None else contextlib.nullcontext():
            first, again = outputs.result(f"{name}.contract", 0), outputs.result(f"{name}.contract", 1)
            grading.verify_trigger_contract(contract, first, again, outputs.result(f"{name}.alone"), batch, name)
        return grading.verify_triggered(self.test.images, batch, name)

    @functools.cached_property
    def _witness(self) -> tuple[str | None, GradingFailure | None]:
        try:
            return self._poisoning_run(), None
        except GradingFailure as failure:
            return None, failure

    @functools.cached_property
    def pool(self) -> witness.Pool:
        """The grader's poisoning pool of this grading run (its stamped images are in ``<trigger>.witness``)."""
        return witness_pool(self.inputs, self.files.dataset)

    def _poisoning_run(self) -> str:
        _, meta = self.model
        name = grading.recorded_trigger(meta)
        self.triggered(name)             # the trigger contract holds
        return witness.verify_trigger_poisons(self.pool, self.outputs.result(f"{name}.witness"),
                                              self.files.reference_model, target=TARGET, seed=witness.draw_seed(),
                                              name=name)

    def witness(self) -> str:
        """The grader's own poisoning run with the recorded trigger, on a split of its pool drawn
        now (after the trigger ran), done once per submission: its measurement, or the failure."""
        message, failure = self._witness
        if failure is not None:
            raise failure
        return message


# ------------------------------------------------------------------ Part 1

def trigger_contract(name: str):
    return lambda ctx: ctx.triggered(name)


def poisoning(grade_id: str):
    def decide(ctx: Context) -> None:
        case, data = POISON_CASES[grade_id], poison_case_data(ctx.train, grade_id)
        call = f"poison_dataset(data, trigger, target={case['target']}, rate={case['rate']}, seed={case['seed']})"
        first, again = ctx.outputs.result(grade_id, 0), ctx.outputs.result(grade_id, 1)
        if isinstance(first, tuple) and len(first) == 2:
            first = (as_dataset(first[0], data), first[1])
        again = again[1] if isinstance(again, tuple) and len(again) == 2 else None
        grading.verify_poisoning(data, first, again, target=case["target"], rate=case["rate"], call=call)
    return decide


def model_loads(ctx: Context) -> None:
    _ = ctx.model  # loading is the check: a model that does not load raises here


def clean_accuracy(ctx: Context) -> None:
    model, _ = ctx.model
    grading.verify_clean_accuracy(model, ctx.test)


def attack_success(ctx: Context, target: int = TARGET) -> None:
    """The handed-in model sends the triggered test images to the target (with a legitimate
    trigger) and the grader's triggered images from both splits too
    (:func:`course_lib.homework.witness.verify_model_follows`), and the grader's own poisoned model
    learned that trigger: the ASR a model shows for a trigger that plants no backdoor (an
    evasion attack) earns nothing."""
    model, meta = ctx.model
    name = grading.recorded_trigger(meta)
    with grading.all_problems() as problems:
        with problems.independently():
            grading.verify_attack_success(model, ctx.test, ctx.triggered(name, problems), ctx.files.reference_model,
                                          target=target, name=name)
        witness.verify_model_follows(model, ctx.pool, ctx.outputs.result(f"{name}.witness"), target=target,
                                     name=name)
    try:
        ctx.witness()
    except GradingFailure as failure:
        raise GradingFailure(*(f"the ASR of {grading.MODEL_FILE} is credited only for a trigger that plants a "
                               f"backdoor in the grader's own poisoned model, and: {problem}"
                               for problem in failure.problems)) from None


def trigger_poisons(ctx: Context) -> str:
    """The witness test: the grader poisons and trains a model itself with the recorded trigger."""
    return ctx.witness()


def distinct_triggers(ctx: Context, target: int = 0) -> None:
    test, keep = ctx.test, ctx.test.labels != target
    triggered = {}
    with grading.all_problems() as problems:
        for name in grading.TRIGGER_FUNCTIONS:
            with problems.independently():
                images = ctx.triggered(name, problems)
                grading.verify_backdoor_trigger(test.images[keep][:grading.LEGITIMACY_IMAGES],
                                                images[keep][:grading.LEGITIMACY_IMAGES], ctx.files.reference_model,
                                                name=name, target=target)
                triggered[name] = images
        if len(triggered) == len(grading.TRIGGER_FUNCTIONS):
            n = grading.DISTINCT_IMAGES
            grading.verify_distinct(test.images[:n], {name: images[:n] for name, images in triggered.items()})


# ------------------------------------------------------------------ Part 2

def activations(ctx: Context) -> None:
    grading.verify_activations(ctx.outputs.result("activations"))


def planted(ctx: Context) -> None:
    grading.verify_planted(ctx.outputs.result("planted"))


def zoo_report(ctx: Context) -> dict:
    flags = {}
    for name in ctx.files.answer_key["models"]:
        try:
            _, labels = ctx.files.activations(name)
            result = ctx.outputs.result(f"zoo.{name}")
            flags[name] = grading.verify_flags(result.numpy() if isinstance(result, torch.Tensor) else result,
                                               labels, name)
        except GradingFailure as failure:
            flags[name] = failure
    return grading.zoo_report(flags, ctx.files.answer_key)


VERDICTS = {
    "p1-test-trigger-patch": trigger_contract("trigger_patch"),
    "p1-test-trigger-blend": trigger_contract("trigger_blend"),
    "p1-test-trigger-custom": trigger_contract("trigger_custom"),
    "p1-test-poison": poisoning("p1-test-poison"),
    "p1-test-poison-hidden": poisoning("p1-test-poison-hidden"),
    "p1-test-model-loads": model_loads,
    "p1-test-clean-accuracy": clean_accuracy,
    "p1-test-attack-success": attack_success,
    "p1-test-trigger-poisons": trigger_poisons,
    "p1-test-distinct-triggers": distinct_triggers,
    "p2-test-activations": activations,
    "p2-test-planted": planted,
    "p2-test-verdicts": lambda ctx: grading.verify_zoo_verdicts(zoo_report(ctx)),
    "p2-test-tpr": lambda ctx: grading.verify_zoo_tpr(zoo_report(ctx)),
    "p2-test-fpr": lambda ctx: grading.verify_zoo_fpr(zoo_report(ctx)),
}


def decide(grade_ids, ctx: Context) -> dict:
    """{grade id: Verdict} for every test cell; an unknown test or any error fails that test only."""
    verdicts = {}
    for grade_id in grade_ids:
        rule = VERDICTS.get(grade_id)
        try:
            if rule is None:
                raise GradingFailure(f"the trusted autograder has no rule for test {grade_id!r}")
            shown = rule(ctx)
            verdicts[grade_id] = Verdict(True, shown if isinstance(shown, str) else "")
        except GradingFailure as failure:
            verdicts[grade_id] = Verdict(False, str(failure))
        except Exception as err:
            verdicts[grade_id] = Verdict(False, f"{grade_id} could not be decided: {type(err).__name__}: {err}")
    return verdicts
