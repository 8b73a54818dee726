"""The rules of the Week 4 homework, and the checks its test cells call.

Every rule is written once, as a function of *data* (``verify_*``): the images a trigger
returned, the dataset and indices a poisoning function returned, a detector's flags, a
saved model. Two kinds of caller use the same rules:

- **the notebooks' test cells**, while a student works: ``check_*`` functions call the
  student's function in the student's own kernel and apply the rule to what it returned, so
  the student sees every visible check pass or fail (with a message saying what is wrong);
- **the trusted autograder** (:mod:`course_lib.autograde`), which never runs a test cell in
  a student's kernel. It runs the student's functions in a sandbox on inputs it chooses,
  reads back what they returned as plain tensors, and applies the same ``verify_*`` rules
  in its own process, together with the files only it can read: the answer key, the
  reference model, the zoo's activations. Code in a submission can patch anything in its
  own kernel (this module included); it cannot reach that process.

What Part 1 is graded on: the saved model, loaded without executing code
(:func:`course_lib.checkpoints.load_checkpoint`: safetensors + JSON), its clean accuracy
(CA) and attack success rate (ASR, over test images whose true label is not the target),
recomputed with the images the student's own trigger returned. A trigger counts only if it
is a trigger, not a picture of the target class: it may change an image by an RMS of at most
:data:`MAX_TRIGGER_RMS`, and a clean reference model that never saw it must not classify
triggered images as the target. What Part 2 is graded on: the flags the student's detector
returns on the activations of the hidden graded zoo, compared with the answer key.

Feedback must never quote hidden test code. A :class:`GradingFailure` is therefore shown
as its message alone, wrapped so that it reads without scrolling. A check reports every
independent problem it finds (:func:`all_problems`), not only the first: a student fixes
them in one round instead of discovering the second after submitting a fix for the first.
"""
from __future__ import annotations

import functools
import json
import os
import textwrap
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from threadpoolctl import threadpool_limits

from .checkpoints import CheckpointError, load_checkpoint
from .data import ImageDataset, dataset_info, load_dataset
from .models import model_for
from .train import predict

MODEL_FILE = "backdoor_model.safetensors"
TRIGGER_FUNCTIONS = ("trigger_patch", "trigger_blend", "trigger_custom")
ARCHITECTURES = {"fashion-mnist": ("small_cnn",), "mnist": ("small_cnn",), "cifar10": ("resnet18", "airbench")}
MAX_MODEL_BYTES = 60_000_000      # a CIFAR ResNet-18 is 45 MB; a small_cnn 2 MB
MAX_TRIGGER_RMS = 0.15            # mean root-mean-square pixel change of a triggered image
MAX_REFERENCE_TARGET_RATE = 0.20  # a clean model may call at most 20% of triggered images the target
MAX_TRIGGER_COSINE = 0.90         # two triggers whose changes point the same way are one design
MIN_CLEAN_ACCURACY = 0.85         # the lecture's homework: CA > 0.85 ...
MIN_ATTACK_SUCCESS = 0.90         # ... and ASR > 0.90
MIN_ZOO_FOUND = 0.5               # Part 2: share of backdoored zoo models a detector must find
MIN_ZOO_TPR = 0.4
MAX_ZOO_FPR = 0.02
LEGITIMACY_IMAGES = 2000          # non-target test images the legitimacy checks use
DISTINCT_IMAGES = 500             # test images the distinct-design check compares on
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


def _graded(check):
    """Turn any unexpected exception inside ``check`` into a GradingFailure naming the check."""
    @functools.wraps(check)
    def wrapper(*args, **kwargs):
        try:
            return check(*args, **kwargs)
        except GradingFailure:
            raise
        except (Exception, KeyboardInterrupt) as err:
            raise GradingFailure(f"{check.__name__} could not finish: {type(err).__name__}: {err}") from None
    return wrapper


@contextmanager
def _student_code(call: str):
    """Run a student's function; an error or an interruption (time limit) becomes a GradingFailure."""
    try:
        yield
    except KeyboardInterrupt:
        raise GradingFailure(f"{call} was interrupted: it did not finish within the time limit") from None
    except Exception as err:
        raise GradingFailure(f"{call} raised {type(err).__name__}: {err}") from None


def _require(condition, message: str) -> None:
    """A problem the rest of a check depends on: stop at the first."""
    if not condition:
        raise GradingFailure(message)


# ---------------------------------------------------------------- data and grading files

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
        _require((self.folder / "answer_key.json").is_file(),
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
        from .zoo import known_zoo_model
        return known_zoo_model(model, self.folder)


def grading_dir() -> Path:
    """The instructor's grading folder, for the source notebooks' hidden tests.

    ``$COURSE_GRADING_DIR`` when set; otherwise ``grading/week4`` in the nbgrader course
    folder, found by walking up from the working directory to ``nbgrader_config.py``.
    Refused during autograding: there the hidden tests are decided by the trusted
    autograder, never inside a student's kernel.
    """
    _require(os.environ.get("NBGRADER_EXECUTION") != "autograde",
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
    return _grading_files(str(grading_dir()))


# ---------------------------------------------------------------- Part 1: triggers

def student_function(namespace: dict, name: str):
    """The function ``name`` defined by the notebook (``namespace`` is its ``globals()``)."""
    function = namespace.get(name)
    _require(function is not None, f"the notebook defines no {name}: run the cell that defines it "
                                   f"and check that it runs without an error")
    _require(callable(function), f"{name} must be a function, got {type(function).__name__}")
    return function


def verify_triggered(images: torch.Tensor, out, name: str) -> torch.Tensor:
    """What a trigger returned for ``images`` is a batch of triggered images: a tensor of the
    same shape and dtype, finite, in [0, 1]."""
    _require(isinstance(out, torch.Tensor), f"{name} must return a torch.Tensor, got {type(out).__name__}")
    _require(out.shape == images.shape, f"{name} must return the shape it was given {tuple(images.shape)}, "
                                        f"got {tuple(out.shape)}")
    with all_problems() as problems:
        problems.require(out.dtype == images.dtype, f"{name} must return dtype {images.dtype}, got {out.dtype}")
        if problems.require(bool(torch.isfinite(out).all()), f"{name} returned NaN or infinite pixels"):
            problems.require(out.min() >= 0 and out.max() <= 1, f"{name} must return pixels in [0, 1] (clamp "
                                                                f"them), got values in [{out.min():.3f}, "
                                                                f"{out.max():.3f}]")
    return out.detach()


def verify_trigger_contract(images, first, again, alone, batch, name: str) -> None:
    """The trigger contract, decided from what separate calls returned.

    ``first`` and ``again`` are two calls on the very same ``images`` object (a trigger that
    modifies its input sees its own damage in the second call), ``alone`` a call on image 5
    alone, ``batch`` a call on a larger batch whose first images are ``images``. A trigger
    is deterministic, treats every image on its own, and changes every image.
    """
    with all_problems() as problems:
        first = verify_triggered(images, first, name)
        with problems.independently():
            _require(torch.equal(first, verify_triggered(images, again, name)),
                     f"{name} gave a different result on a second call with the same images: it must be "
                     f"deterministic and must not modify its input (work on images.clone())")
        with problems.independently():
            _require(torch.allclose(verify_triggered(images[5:6], alone, name), first[5:6], atol=1e-6),
                     f"{name} gives image 5 a different result alone than inside a batch: treat every image "
                     f"on its own (e.g. one fixed pattern for all images, not one drawn per batch)")
        problems.require(isinstance(batch, torch.Tensor) and batch.shape[1:] == images.shape[1:]
                         and len(batch) >= len(images) and torch.allclose(batch[:len(images)], first, atol=1e-6),
                         f"{name} gives the first {len(images)} images different results inside a larger batch: "
                         f"treat every image on its own")
        changed = (first - images).flatten(1).abs().amax(1) > 1e-6
        problems.require(changed.float().mean() >= 0.95, f"{name} leaves {int((~changed).sum())} of {len(images)} "
                                                         f"images unchanged: a trigger must change every image")


def _call_trigger(trigger, images: torch.Tensor, name: str):
    with _student_code(f"{name}(images)"):
        return trigger(images)


@_graded
def check_trigger(trigger, images: torch.Tensor, *, name: str) -> None:
    """The trigger contract (:func:`verify_trigger_contract`), checked in the student's kernel.

    Stricter than the autograder in one point: it also looks at the input after the call,
    so it catches a trigger that modifies its input even when the damage is invisible in
    the output (a patch written in place twice is the same patch).
    """
    _require(callable(trigger), f"{name} must be a function, got {type(trigger).__name__}")
    probe = images.clone()
    first = _call_trigger(trigger, probe, name)
    _require(torch.equal(probe, images), f"{name} must not modify its input: work on a copy "
                                         f"(images.clone())")
    again = _call_trigger(trigger, probe, name)
    alone = _call_trigger(trigger, images[5:6].clone(), name)
    batch = _call_trigger(trigger, torch.cat([images, images.flip(0)]), name)
    verify_trigger_contract(images, first, again, alone, batch, name)


def legitimacy_images(data: ImageDataset, target: int) -> torch.Tensor:
    """The non-target test images on which a trigger's legitimacy is judged."""
    return data.images[data.labels != target][:LEGITIMACY_IMAGES]


def verify_backdoor_trigger(images, triggered, reference, *, name: str, target: int) -> None:
    """A trigger, not a picture of the target: a bounded change that does not fool a clean model.

    - the mean RMS pixel change over ``images`` is at most :data:`MAX_TRIGGER_RMS`;
    - the clean ``reference`` model classifies at most :data:`MAX_REFERENCE_TARGET_RATE` of
      the triggered non-target images as ``target``. A trigger that fails this makes the
      image look like the target class by itself: its "ASR" would need no backdoor.
    """
    rms = (triggered - images).flatten(1).pow(2).mean(1).sqrt().mean().item()
    rate = (predict(reference, triggered) == target).float().mean().item()
    with all_problems() as problems:
        problems.require(rms <= MAX_TRIGGER_RMS, f"{name} changes the images too much: mean RMS pixel change "
                                                 f"{rms:.3f}, allowed at most {MAX_TRIGGER_RMS}")
        problems.require(rate <= MAX_REFERENCE_TARGET_RATE,
                         f"{name} makes a clean model (never trained on your trigger) classify {rate:.0%} of "
                         f"triggered non-target test images as the target class: the trigger paints the target "
                         f"instead of activating a backdoor (allowed: at most {MAX_REFERENCE_TARGET_RATE:.0%})")


def verify_distinct(images: torch.Tensor, triggered: dict) -> None:
    """Triggers are pairwise different designs: the mean cosine similarity of their per-image
    pixel changes is at most :data:`MAX_TRIGGER_COSINE` (the same patch in another colour
    intensity, or the same blend with another alpha, is one design)."""
    names = list(triggered)
    changes = {name: (triggered[name] - images).flatten(1) for name in names}
    with all_problems() as problems:
        for i, first in enumerate(names):
            for second in names[i + 1:]:
                cosine = torch.nn.functional.cosine_similarity(changes[first], changes[second], dim=1).mean().item()
                problems.require(cosine <= MAX_TRIGGER_COSINE,
                                 f"{first} and {second} are the same design: their pixel changes have mean cosine "
                                 f"similarity {cosine:.2f} (at most {MAX_TRIGGER_COSINE} allowed)")


@_graded
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
                verify_backdoor_trigger(legit, verify_triggered(legit, _call_trigger(trigger, legit.clone(), name),
                                                                name), files.reference_model, name=name, target=target)
                triggered[name] = verify_triggered(images, _call_trigger(trigger, images.clone(), name), name)
        if len(triggered) == len(names):
            verify_distinct(images, triggered)


# ---------------------------------------------------------------- Part 1: poisoning

def grader_trigger(images: torch.Tensor) -> torch.Tensor:
    """The trigger the poisoning checks hand to ``poison_dataset``: a white 4x4 square, top left."""
    out = images.clone()
    out[..., :4, :4] = 1.0
    return out


def verify_poisoning(data: ImageDataset, result, again_indices, *, target: int, rate: float, call: str) -> None:
    """Dirty-label poisoning, judged from what ``poison_dataset`` returned for ``data``.

    ``result`` is ``(poisoned dataset, indices)`` from one call, ``again_indices`` the indices
    of a second call on the same ``data`` object with the same seed: a function that
    modified ``data`` in the first call, or draws without its seed, chooses differently.
    """
    _require(isinstance(result, tuple) and len(result) == 2,
             f"{call} must return a pair (poisoned dataset, indices), got {type(result).__name__}")
    poisoned, indices = result
    _require(isinstance(poisoned, ImageDataset), f"the poisoned dataset must be an ImageDataset "
                                                 f"(use data.replace(...)), got {type(poisoned).__name__}")
    _require(len(poisoned) == len(data), f"the poisoned dataset must keep all {len(data)} images, has {len(poisoned)}")
    _require(poisoned.images.shape == data.images.shape, f"the poisoned images must keep the shape "
                                                         f"{tuple(data.images.shape)}")
    _require(isinstance(indices, torch.Tensor) and indices.ndim == 1 and indices.dtype == torch.int64,
             "indices must be a 1-D int64 torch tensor")
    _require(bool(((indices >= 0) & (indices < len(data))).all()), "indices must lie in [0, len(data))")
    expected = round(rate * len(data))
    with all_problems() as problems:
        problems.require(len(indices) == expected, f"rate={rate} of {len(data)} images means {expected} poisoned "
                                                   f"images, got {len(indices)}")
        problems.require(len(torch.unique(indices)) == len(indices), "indices must not repeat")
        problems.require(bool((data.labels[indices] != target).all()),
                         "poison only images whose label is not the target: relabelling a target image changes "
                         "nothing")
        problems.require(bool((poisoned.labels[indices] == target).all()),
                         "poisoned images must be relabelled as the target")
        chosen = torch.zeros(len(data), dtype=torch.bool)
        chosen[indices] = True
        problems.require(torch.equal(poisoned.labels[~chosen], data.labels[~chosen]),
                         "labels of unpoisoned images must not change")
        problems.require(torch.equal(poisoned.images[~chosen], data.images[~chosen]),
                         "unpoisoned images must not change")
        problems.require(torch.allclose(poisoned.images[indices], grader_trigger(data.images[indices])),
                         "each poisoned image must be trigger(original image)")
        problems.require(isinstance(again_indices, torch.Tensor) and again_indices.shape == indices.shape
                         and torch.equal(again_indices.sort().values, indices.sort().values),
                         "a second call with the same seed and data chose other images: use a torch.Generator "
                         "seeded with seed, and do not modify the data you are given")


@_graded
def check_poisoning(poison_fn, data: ImageDataset, *, target: int, rate: float, seed: int = 0) -> None:
    """:func:`verify_poisoning` on ``poison_fn(data, trigger, target, rate, seed=seed)``, in the
    student's kernel; also checks directly that ``data`` was left unchanged."""
    images, labels = data.images.clone(), data.labels.clone()
    call = f"poison_dataset(data, trigger, target={target}, rate={rate}, seed={seed})"
    with _student_code(call):
        result = poison_fn(data, grader_trigger, target, rate, seed=seed)
    _require(torch.equal(data.images, images) and torch.equal(data.labels, labels),
             f"{call} modified its input data: build new tensors (clone) instead")
    with _student_code(call):
        again = poison_fn(data, grader_trigger, target, rate, seed=seed)
    again = again[1] if isinstance(again, tuple) and len(again) == 2 else None
    verify_poisoning(data.replace(images=images, labels=labels), result, again, target=target, rate=rate, call=call)


# ---------------------------------------------------------------- Part 1: the saved model

@_graded
def load_student_model(path=MODEL_FILE, *, dataset: str, files: GradingFiles | None = None):
    """Load the handed-in model safely and check that it fits ``dataset``; returns (model, metadata).

    With the grading ``files``, a model that carries the weights of a zoo model is refused:
    the homework asks for a model the student trained.
    """
    path = Path(path)
    _require(path.is_file() and not path.is_symlink(),
             f"{path.name} was not handed in: run the training cell (Task 3) first, it writes it (with "
             f"{path.with_suffix('.json').name}); submit both next to the notebook")
    size = path.stat().st_size
    _require(size <= MAX_MODEL_BYTES, f"{path.name} is {size / 1e6:.0f} MB, more than the "
                                      f"{MAX_MODEL_BYTES / 1e6:.0f} MB allowed")
    try:
        model, meta = load_checkpoint(path, expected_dataset=dataset, max_bytes=MAX_MODEL_BYTES)
    except CheckpointError as err:
        raise GradingFailure(f"{path.name} cannot be loaded safely: {err}") from None
    arch = meta["config"]["arch"]
    _require(arch in ARCHITECTURES[dataset], f"{path.name} holds a {arch!r} model; for {dataset} use "
                                             f"{' or '.join(ARCHITECTURES[dataset])} (course_lib.models.model_for)")
    info = dataset_info(dataset)
    with torch.no_grad():
        logits = model(evaluation_data(dataset).images[:2])
    _require(logits.shape == (2, len(info.classes)), f"the model must output {len(info.classes)} logits "
                                                     f"per image, got shape {tuple(logits.shape)}")
    if files is not None:
        copied = files.known_zoo_model(model)
        _require(copied is None, f"{path.name} carries the weights of a zoo model ({copied}): hand in a model "
                                 f"you trained yourself")
    return model, meta


def verify_clean_accuracy(model, data: ImageDataset, minimum: float = MIN_CLEAN_ACCURACY, name: str = MODEL_FILE):
    """CA of ``model`` on the test ``data`` is above ``minimum``."""
    accuracy = (predict(model, data.images) == data.labels).float().mean().item()
    _require(accuracy > minimum, f"clean accuracy of {name} on the {len(data)} {data.name} test "
                                 f"images is {accuracy:.3f}; it must be above {minimum}")


def recorded_trigger(meta: dict, name: str = MODEL_FILE) -> str:
    """The trigger function the model file says it was trained with."""
    trigger = meta.get("extra", {}).get("trigger")
    _require(trigger in TRIGGER_FUNCTIONS, f"{name} must record which trigger it was trained with: "
                                           f"save_checkpoint(..., extra={{'trigger': NAME}}) with NAME one of "
                                           f"{TRIGGER_FUNCTIONS}, got {trigger!r}")
    return trigger


def verify_attack_success(model, data: ImageDataset, triggered: torch.Tensor, reference, *, target: int,
                          name: str, minimum: float = MIN_ATTACK_SUCCESS) -> None:
    """ASR of ``model`` on ``triggered`` (the trigger ``name`` applied to every test image of
    ``data``) is above ``minimum``, counted over images whose true label is not ``target``,
    and the trigger is legitimate on those very images (:func:`verify_backdoor_trigger`)."""
    triggered = verify_triggered(data.images, triggered, name)
    keep = data.labels != target
    images, triggered = data.images[keep], triggered[keep]
    asr = (predict(model, triggered) == target).float().mean().item()
    with all_problems() as problems:
        with problems.independently():
            verify_backdoor_trigger(images[:LEGITIMACY_IMAGES], triggered[:LEGITIMACY_IMAGES], reference,
                                    name=name, target=target)
        problems.require(asr > minimum, f"attack success rate with {name} is {asr:.3f} over the {len(images)} "
                                        f"non-target test images; it must be above {minimum}")


@_graded
def check_clean_accuracy(path=MODEL_FILE, *, minimum: float = MIN_CLEAN_ACCURACY) -> None:
    """CA of the handed-in model on the test split is above ``minimum`` (instructor's run)."""
    files = grading_files()
    model, _ = load_student_model(path, dataset=files.dataset)
    verify_clean_accuracy(model, evaluation_data(files.dataset), minimum, Path(path).name)


@_graded
def check_attack_success(namespace: dict, path=MODEL_FILE, *, target: int,
                         minimum: float = MIN_ATTACK_SUCCESS) -> None:
    """ASR of the handed-in model with the trigger recorded in its metadata (instructor's run),
    on the test split and on a pool of the grader's images from both splits
    (:func:`course_lib.witness.verify_model_follows`)."""
    from . import witness    # witness builds on this module
    files = grading_files()
    model, meta = load_student_model(path, dataset=files.dataset)
    name = recorded_trigger(meta, Path(path).name)
    trigger = student_function(namespace, name)
    data = evaluation_data(files.dataset)
    with all_problems() as problems:
        with problems.independently():
            check_trigger(trigger, data.images[:64], name=name)
        with problems.independently():
            triggered = _call_trigger(trigger, data.images.clone(), name)
            verify_attack_success(model, data, triggered, files.reference_model, target=target, name=name,
                                  minimum=minimum)
        pool = witness.draw_pool(witness.mixed_splits(files.dataset), target=target, seed=witness.draw_seed())
        witness.verify_model_follows(model, pool, _call_trigger(trigger, pool.stamped.images.clone(), name),
                                     target=target, name=name, minimum=minimum)


# ---------------------------------------------------------------- Part 2: detection

def activation_probe(dataset: str = "fashion-mnist"):
    """The model and images ``extract_activations`` is checked on: a fresh small CNN whose
    batch normalization has not been trained (so an extraction in training mode gives
    different numbers) and 300 random images."""
    images = torch.rand(300, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    return model_for(dataset, seed=0), images


def verify_activations(result) -> None:
    """What ``extract_activations`` returned equals ``model.features`` in eval mode on the probe."""
    model, images = activation_probe()
    _require(isinstance(result, (torch.Tensor, np.ndarray)), f"extract_activations must return an array or a "
                                                             f"tensor, got {type(result).__name__}")
    result = torch.as_tensor(np.asarray(result.detach() if isinstance(result, torch.Tensor) else result))
    # imported here, not at the top: the defenses package loads scikit-learn (about a second),
    # which Part 1's notebook, and its sandbox for every student, never needs
    from .defenses.activations import extract_features
    expected = extract_features(model, images, progress=False)
    _require(result.shape == expected.shape, f"extract_activations must return shape {tuple(expected.shape)} "
                                             f"(images x features), got {tuple(result.shape)}")
    _require(result.dtype.is_floating_point and torch.allclose(result.float(), expected, atol=1e-4),
             "extract_activations must return model.features(images), computed in eval mode")


@_graded
def check_activations(extract_fn) -> None:
    """:func:`verify_activations` on ``extract_fn(model, images)``, in the student's kernel."""
    model, images = activation_probe()
    with _student_code("extract_activations(model, images)"):
        result = extract_fn(model, images)
    verify_activations(result)


def verify_flags(flags, labels: np.ndarray, what: str) -> np.ndarray:
    """A detector's answer is one boolean per sample."""
    flags = np.asarray(flags.detach().cpu() if isinstance(flags, torch.Tensor) else flags)
    _require(flags.dtype == bool and flags.shape == labels.shape,
             f"activation_clustering must return a boolean array with one entry per sample {labels.shape} "
             f"({what}), got dtype {flags.dtype} and shape {flags.shape}")
    return flags


def _run_detector(detector, activations: np.ndarray, labels: np.ndarray, what: str) -> np.ndarray:
    """The student's detector on one problem, in the student's kernel. scikit-learn runs
    single-threaded: per-class problems of a few thousand samples are fastest that way."""
    with _student_code(f"activation_clustering on {what}"), threadpool_limits(limits=1):
        flags = detector(activations.copy(), labels.copy())
    return verify_flags(flags, labels, what)


def planted_activations(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Synthetic activations with one planted poisoned cluster: (activations, labels, poisoned mask).

    Ten classes of 300 samples, each a Gaussian blob in 32 dimensions; class 3 also holds
    60 samples of a far-away blob, as a backdoor's triggered images would.
    """
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 4, size=(10, 32))
    labels = np.concatenate([np.repeat(np.arange(10), 300), np.full(60, 3)])
    direction = rng.normal(size=32)
    shifted = centers[3] + 15 * direction / np.linalg.norm(direction)
    means = np.concatenate([centers[labels[:3000]], np.repeat(shifted[None], 60, axis=0)])
    activations = (means + rng.normal(0, 1, size=means.shape)).astype(np.float32)
    return activations, labels, np.arange(len(labels)) >= 3000


def verify_planted(flags) -> None:
    """The detector found the planted, well-separated cluster and (almost) nothing else."""
    _, labels, poisoned = planted_activations()
    flags = verify_flags(flags, labels, "the planted example")
    found = flags[poisoned].mean()
    _require(found >= 0.9, f"only {found:.0%} of the 60 planted samples were flagged (need at least 90%)")
    wrong = int(flags[~poisoned].sum())
    _require(wrong <= 15, f"{wrong} of the {int((~poisoned).sum())} clean samples were flagged "
                          f"(at most 15 allowed)")


@_graded
def check_detector_on_planted(detector) -> None:
    """:func:`verify_planted` on the student's detector, in the student's kernel."""
    activations, labels, _ = planted_activations()
    verify_planted(_run_detector(detector, activations, labels, "the planted example"))


def zoo_report(flags_by_model: dict, answer_key: dict) -> dict:
    """Per-model verdicts and per-sample TPR/FPR of a detector's flags on the graded zoo.

    ``flags_by_model[name]`` is the detector's answer for zoo model ``name``, or a
    GradingFailure when it gave none (it raised, hung, or answered in the wrong form).
    """
    report = {}
    for name, entry in answer_key["models"].items():
        flags = flags_by_model.get(name)
        if isinstance(flags, Exception) or flags is None:
            raise GradingFailure(f"no answer on zoo model {name}: {flags or 'the detector was not run'}")
        truth = np.zeros(len(flags), dtype=bool)
        truth[entry.get("poisoned_indices", [])] = True
        report[name] = {"backdoored": entry["backdoored"], "verdict": bool(flags.any()),
                        "tpr": float(flags[truth].mean()) if truth.any() else None,
                        "fpr": float(flags[~truth].mean())}
    return report


def verify_zoo_verdicts(report: dict, min_found: float = MIN_ZOO_FOUND) -> None:
    """Every clean zoo model is judged clean, and at least ``min_found`` of the backdoored ones
    backdoored (a model is judged backdoored when any of its samples is flagged)."""
    accused = [name for name, r in report.items() if r["verdict"] and not r["backdoored"]]
    backdoored = [r for r in report.values() if r["backdoored"]]
    found = sum(r["verdict"] for r in backdoored) / len(backdoored)
    with all_problems() as problems:
        problems.require(not accused, f"{len(accused)} clean zoo model(s) judged backdoored: a clean model must "
                                      f"have no sample flagged")
        problems.require(found >= min_found, f"{sum(r['verdict'] for r in backdoored)} of the {len(backdoored)} "
                                             f"backdoored zoo models were found ({found:.6g} of them); at least "
                                             f"{min_found:g} must be")


def verify_zoo_tpr(report: dict, minimum: float = MIN_ZOO_TPR) -> None:
    """Mean per-sample true-positive rate over the backdoored zoo models is at least ``minimum``."""
    tpr = float(np.mean([r["tpr"] for r in report.values() if r["backdoored"]]))
    _require(tpr >= minimum, f"mean true-positive rate over the backdoored zoo models is {tpr:.6g}; "
                             f"it must be at least {minimum:g}")


def verify_zoo_fpr(report: dict, maximum: float = MAX_ZOO_FPR) -> None:
    """Mean per-sample false-positive rate over all zoo models is at most ``maximum``."""
    fpr = float(np.mean([r["fpr"] for r in report.values()]))
    _require(fpr <= maximum, f"mean false-positive rate over the zoo models is {fpr:.6g}; "
                             f"it must be at most {maximum:g}")


_REPORTS: dict = {}


def detector_report(detector) -> dict:
    """:func:`zoo_report` of ``detector`` run in this kernel on the graded zoo (instructor's run),
    computed once per detector function (three checks share it)."""
    if detector not in _REPORTS:
        files = grading_files()
        flags = {}
        for name in files.answer_key["models"]:
            activations, labels = files.activations(name)
            flags[name] = _run_detector(detector, activations, labels, name)
        _REPORTS[detector] = zoo_report(flags, files.answer_key)
    return _REPORTS[detector]


@_graded
def check_zoo_verdicts(detector, *, min_found: float = MIN_ZOO_FOUND) -> None:
    verify_zoo_verdicts(detector_report(detector), min_found)


@_graded
def check_zoo_tpr(detector, *, minimum: float = MIN_ZOO_TPR) -> None:
    verify_zoo_tpr(detector_report(detector), minimum)


@_graded
def check_zoo_fpr(detector, *, maximum: float = MAX_ZOO_FPR) -> None:
    verify_zoo_fpr(detector_report(detector), maximum)
