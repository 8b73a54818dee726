"""The checks behind the Week 4 homework's autograder tests.

Every test cell of the homework notebooks is a short call to a ``check_*`` function
here. A check returns quietly or raises :class:`GradingFailure` (an AssertionError) with
a message saying what is wrong and what is required. Anything else that goes wrong on the
way (a student's function raising, a corrupt file, a missing variable) becomes such a
failure too, so a broken submission fails its own tests and never stops the grading run.

What Part 1 trusts: nothing the student printed. The saved model is loaded without
executing code (:func:`course_lib.checkpoints.load_checkpoint`: safetensors + JSON); its
clean accuracy (CA) and attack success rate (ASR, over test images whose true label is
not the target) are recomputed here on the dataset's test split with the student's own
trigger function, taken from the notebook the autograder has just re-executed. A trigger
counts only if it is a trigger, not a picture of the target class: it may change an image
by an RMS of at most :data:`MAX_TRIGGER_RMS`, and a clean reference model that never saw
it must not classify triggered images as the target.

What Part 2 trusts: the answer key and activations written by ``python -m course_lib zoo
build`` into the instructor's grading folder (see :func:`grading_dir`). The student's
detector is run here on those activations and scored per sample and per model.

Feedback must never quote hidden test code. A :class:`GradingFailure` is therefore shown
as its message alone, and when this module is imported during ``nbgrader autograde`` it
switches IPython to one-line tracebacks for every other error as well.
"""
from __future__ import annotations

import functools
import json
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from threadpoolctl import threadpool_limits

from .checkpoints import CheckpointError, load_checkpoint
from .data import ImageDataset, dataset_info, load_dataset
from .defenses.activations import extract_features
from .models import model_for
from .train import predict

MODEL_FILE = "backdoor_model.safetensors"
TRIGGER_FUNCTIONS = ("trigger_patch", "trigger_blend", "trigger_custom")
ARCHITECTURES = {"fashion-mnist": ("small_cnn",), "mnist": ("small_cnn",), "cifar10": ("resnet18", "airbench")}
MAX_MODEL_BYTES = 60_000_000      # a CIFAR ResNet-18 is 45 MB; a small_cnn 2 MB
MAX_TRIGGER_RMS = 0.15            # mean root-mean-square pixel change of a triggered image
MAX_REFERENCE_TARGET_RATE = 0.20  # a clean model may call at most 20% of triggered images the target
MAX_TRIGGER_COSINE = 0.90         # two triggers whose changes point the same way are one design
GRADING_DIR_ENV = "COURSE_GRADING_DIR"
GRADING_SUBDIR = Path("grading") / "week4"


class GradingFailure(AssertionError):
    """A failed check. IPython shows only its message: never the test code that raised it."""

    def _render_traceback_(self):
        return [f"{type(self).__name__}: {self}"]


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
    if not condition:
        raise GradingFailure(message)


# ---------------------------------------------------------------- shared data

@functools.lru_cache(maxsize=4)
def evaluation_data(dataset: str) -> ImageDataset:
    """The test split of ``dataset``: data the student does not supply."""
    return load_dataset(dataset, "test")


def grading_dir() -> Path:
    """The instructor's grading folder (answer key, reference model, zoo activations).

    ``$COURSE_GRADING_DIR`` when set; otherwise ``grading/week4`` in the nbgrader course
    folder, found by walking up from the working directory to ``nbgrader_config.py``
    (this works from ``source/week4`` and from ``autograded/<student>/week4``).
    """
    cwd = Path.cwd()
    if os.environ.get(GRADING_DIR_ENV):
        candidates = [Path(os.environ[GRADING_DIR_ENV])]
    else:
        candidates = [p / GRADING_SUBDIR for p in (cwd, *cwd.parents) if (p / "nbgrader_config.py").is_file()]
    for folder in candidates:
        if (folder / "answer_key.json").is_file():
            return folder
    raise GradingFailure("the instructor's grading files were not found (answer_key.json in "
                         f"${GRADING_DIR_ENV} or <course>/{GRADING_SUBDIR.as_posix()}): build them with "
                         "`python -m course_lib zoo build --out <course>/grading/week4 --public "
                         "<course>/source/week4/zoo` (docs/instructor_guide.md)")


def answer_key() -> dict:
    """The zoo's answer key (instructor only)."""
    return json.loads((grading_dir() / "answer_key.json").read_text())


def homework_dataset() -> str:
    """The dataset the homework is graded on: the one the instructor built the zoo for."""
    return answer_key()["dataset"]


@functools.lru_cache(maxsize=2)
def _reference_model(folder: str, dataset: str):
    model, _ = load_checkpoint(Path(folder) / "reference.safetensors", expected_dataset=dataset)
    return model


def reference_model(dataset: str):
    """The clean reference model built with the zoo: it has never seen any student's trigger."""
    return _reference_model(str(grading_dir()), dataset)


# ---------------------------------------------------------------- Part 1: triggers

def student_function(namespace: dict, name: str):
    """The function ``name`` defined by the notebook (``namespace`` is its ``globals()``)."""
    function = namespace.get(name)
    _require(function is not None, f"the notebook defines no {name}: run the cell that defines it "
                                   f"and check that it runs without an error")
    _require(callable(function), f"{name} must be a function, got {type(function).__name__}")
    return function


def apply_trigger(trigger, images: torch.Tensor, name: str) -> torch.Tensor:
    """``trigger(images)`` on a copy, checked: a tensor of the same shape and dtype in [0, 1]."""
    with _student_code(f"{name}(images)"):
        out = trigger(images.clone())
    _require(isinstance(out, torch.Tensor), f"{name} must return a torch.Tensor, got {type(out).__name__}")
    _require(out.shape == images.shape, f"{name} must return the shape it was given {tuple(images.shape)}, "
                                        f"got {tuple(out.shape)}")
    _require(out.dtype == images.dtype, f"{name} must return dtype {images.dtype}, got {out.dtype}")
    _require(bool(torch.isfinite(out).all()), f"{name} returned NaN or infinite pixels")
    _require(out.min() >= 0 and out.max() <= 1, f"{name} must return pixels in [0, 1] (clamp them), got "
                                                f"values in [{out.min():.3f}, {out.max():.3f}]")
    return out.detach()


@_graded
def check_trigger(trigger, images: torch.Tensor, *, name: str) -> None:
    """The trigger contract: batched, same shape/dtype, in [0, 1], input untouched,
    deterministic, each image treated on its own, and every image actually changed."""
    _require(callable(trigger), f"{name} must be a function, got {type(trigger).__name__}")
    probe = images.clone()
    with _student_code(f"{name}(images)"):
        trigger(probe)
    _require(torch.equal(probe, images), f"{name} must not modify its input: work on a copy "
                                         f"(images.clone())")
    out = apply_trigger(trigger, images, name)
    _require(torch.equal(out, apply_trigger(trigger, images, name)),
             f"{name} must be deterministic: two calls on the same images gave different results")
    alone = apply_trigger(trigger, images[5:6], name)
    _require(torch.allclose(alone, out[5:6], atol=1e-6),
             f"{name} gives image 5 a different result alone than inside a batch: treat every image "
             f"on its own (e.g. one fixed pattern for all images, not one drawn per batch)")
    changed = (out - images).flatten(1).abs().amax(1) > 1e-6
    _require(changed.float().mean() >= 0.95, f"{name} leaves {int((~changed).sum())} of {len(images)} "
                                             f"images unchanged: a trigger must change every image")


@_graded
def check_trigger_is_backdoor(trigger, *, name: str, dataset: str, target: int) -> None:
    """A trigger, not a picture of the target: a bounded change that does not fool a clean model.

    - the mean RMS pixel change over test images is at most :data:`MAX_TRIGGER_RMS`;
    - the clean reference model classifies at most :data:`MAX_REFERENCE_TARGET_RATE` of
      triggered non-target test images as ``target``. A trigger that fails this makes the
      image look like the target class by itself: its "ASR" would need no backdoor.
    """
    data = evaluation_data(dataset)
    images = data.images[data.labels != target][:2000]
    _require_backdoor_trigger(images, apply_trigger(trigger, images, name), name=name, dataset=dataset,
                              target=target)


def _require_backdoor_trigger(images, triggered, *, name: str, dataset: str, target: int) -> None:
    """The two conditions of :func:`check_trigger_is_backdoor`, on one triggered batch."""
    rms = (triggered - images).flatten(1).pow(2).mean(1).sqrt().mean().item()
    _require(rms <= MAX_TRIGGER_RMS, f"{name} changes the images too much: mean RMS pixel change {rms:.3f}, "
                                     f"allowed at most {MAX_TRIGGER_RMS}")
    rate = (predict(reference_model(dataset), triggered) == target).float().mean().item()
    _require(rate <= MAX_REFERENCE_TARGET_RATE,
             f"{name} makes a clean model (never trained on your trigger) classify {rate:.0%} of triggered "
             f"non-target test images as the target class: the trigger paints the target instead of "
             f"activating a backdoor (allowed: at most {MAX_REFERENCE_TARGET_RATE:.0%})")


@_graded
def check_distinct_triggers(namespace: dict, *, target: int, names=TRIGGER_FUNCTIONS) -> None:
    """Three trigger designs: each a valid backdoor trigger, pairwise different.

    Two triggers count as one design when their pixel changes point the same way: mean
    cosine similarity of the per-image changes above :data:`MAX_TRIGGER_COSINE` (e.g. the
    same patch in another colour intensity, or the same blend with another alpha).
    """
    dataset = homework_dataset()
    data = evaluation_data(dataset)
    images = data.images[:500]
    changes = {}
    for name in names:
        trigger = student_function(namespace, name)
        check_trigger(trigger, images, name=name)
        check_trigger_is_backdoor(trigger, name=name, dataset=dataset, target=target)
        changes[name] = (apply_trigger(trigger, images, name) - images).flatten(1)
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            cosine = torch.nn.functional.cosine_similarity(changes[first], changes[second], dim=1).mean().item()
            _require(cosine <= MAX_TRIGGER_COSINE,
                     f"{first} and {second} are the same design: their pixel changes have mean cosine "
                     f"similarity {cosine:.2f} (at most {MAX_TRIGGER_COSINE} allowed)")


# ---------------------------------------------------------------- Part 1: poisoning

def _grader_trigger(images: torch.Tensor) -> torch.Tensor:
    """The trigger the poisoning checks use: a white 4x4 square in the top-left corner."""
    out = images.clone()
    out[..., :4, :4] = 1.0
    return out


@_graded
def check_poisoning(poison_fn, data: ImageDataset, *, target: int, rate: float, seed: int = 0) -> None:
    """Dirty-label poisoning: ``poison_fn(data, trigger, target, rate, seed=seed)`` returns
    ``(poisoned, indices)`` with ``round(rate * len(data))`` non-target images triggered and
    relabelled ``target``, everything else untouched, ``data`` itself unchanged, and the
    same choice for the same seed."""
    images, labels = data.images.clone(), data.labels.clone()
    call = f"poison_dataset(data, trigger, target={target}, rate={rate}, seed={seed})"
    with _student_code(call):
        result = poison_fn(data, _grader_trigger, target, rate, seed=seed)
    _require(torch.equal(data.images, images) and torch.equal(data.labels, labels),
             f"{call} modified its input data: build new tensors (clone) instead")
    _require(isinstance(result, tuple) and len(result) == 2,
             f"{call} must return a pair (poisoned dataset, indices), got {type(result).__name__}")
    poisoned, indices = result
    _require(isinstance(poisoned, ImageDataset), f"the poisoned dataset must be an ImageDataset "
                                                 f"(use data.replace(...)), got {type(poisoned).__name__}")
    _require(len(poisoned) == len(data), f"the poisoned dataset must keep all {len(data)} images, has {len(poisoned)}")
    _require(isinstance(indices, torch.Tensor) and indices.ndim == 1 and indices.dtype == torch.int64,
             "indices must be a 1-D int64 torch tensor")
    expected = round(rate * len(data))
    _require(len(indices) == expected, f"rate={rate} of {len(data)} images means {expected} poisoned images, "
                                       f"got {len(indices)}")
    _require(len(torch.unique(indices)) == len(indices), "indices must not repeat")
    _require(bool(((indices >= 0) & (indices < len(data))).all()), "indices must lie in [0, len(data))")
    _require(bool((labels[indices] != target).all()),
             "poison only images whose label is not the target: relabelling a target image changes nothing")
    _require(bool((poisoned.labels[indices] == target).all()), "poisoned images must be relabelled as the target")
    chosen = torch.zeros(len(data), dtype=torch.bool)
    chosen[indices] = True
    _require(torch.equal(poisoned.labels[~chosen], labels[~chosen]), "labels of unpoisoned images must not change")
    _require(torch.equal(poisoned.images[~chosen], images[~chosen]), "unpoisoned images must not change")
    _require(torch.allclose(poisoned.images[indices], _grader_trigger(images[indices])),
             "each poisoned image must be trigger(original image)")
    with _student_code(call):
        again = poison_fn(data, _grader_trigger, target, rate, seed=seed)[1]
    _require(torch.equal(torch.as_tensor(again).sort().values, indices.sort().values),
             "the same seed must choose the same images (use a torch.Generator seeded with seed)")


# ---------------------------------------------------------------- Part 1: the saved model

@_graded
def load_student_model(path=MODEL_FILE, *, dataset: str):
    """Load the handed-in model safely and check that it fits ``dataset``; returns (model, metadata)."""
    path = Path(path)
    _require(path.is_file(), f"{path.name} was not handed in: the training cell writes it (with "
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
    probe = evaluation_data(dataset).images[:2]
    with _student_code(f"the model in {path.name} on two test images"):
        logits = model(probe)
    _require(logits.shape == (2, len(info.classes)), f"the model must output {len(info.classes)} logits "
                                                     f"per image, got shape {tuple(logits.shape)}")
    return model, meta


@_graded
def check_clean_accuracy(path=MODEL_FILE, *, minimum: float) -> None:
    """CA of the handed-in model on the test split is above ``minimum``."""
    dataset = homework_dataset()
    model, _ = load_student_model(path, dataset=dataset)
    data = evaluation_data(dataset)
    accuracy = (predict(model, data.images) == data.labels).float().mean().item()
    _require(accuracy > minimum, f"clean accuracy of {Path(path).name} on the {len(data)} {dataset} test "
                                 f"images is {accuracy:.3f}; it must be above {minimum}")


@_graded
def check_attack_success(namespace: dict, path=MODEL_FILE, *, target: int, minimum: float) -> None:
    """ASR of the handed-in model with the trigger named in its metadata is above ``minimum``.

    The trigger must first pass :func:`check_trigger` and :func:`check_trigger_is_backdoor`.
    ASR counts only test images whose true label is not ``target``.
    """
    dataset = homework_dataset()
    model, meta = load_student_model(path, dataset=dataset)
    name = meta.get("extra", {}).get("trigger")
    _require(name in TRIGGER_FUNCTIONS, f"{Path(path).name} must record which trigger it was trained with: "
                                        f"save_checkpoint(..., extra={{'trigger': NAME}}) with NAME one of "
                                        f"{TRIGGER_FUNCTIONS}, got {name!r}")
    trigger = student_function(namespace, name)
    data = evaluation_data(dataset)
    check_trigger(trigger, data.images[:500], name=name)
    images = data.images[data.labels != target]
    # One call: the legitimacy checks and the ASR see the very same triggered images, so a
    # trigger cannot behave differently when it is checked and when it is measured.
    triggered = apply_trigger(trigger, images, name)
    _require_backdoor_trigger(images, triggered, name=name, dataset=dataset, target=target)
    asr = (predict(model, triggered) == target).float().mean().item()
    _require(asr > minimum, f"attack success rate with {name} is {asr:.3f} over the {len(images)} non-target "
                            f"test images; it must be above {minimum}")


# ---------------------------------------------------------------- Part 2: detection

@_graded
def check_activations(extract_fn) -> None:
    """``extract_fn(model, images)`` returns what ``model.features`` gives in eval mode.

    The model is a fresh small CNN whose batch normalization has not been trained, so an
    extraction in training mode (batch statistics) gives different numbers.
    """
    model = model_for("fashion-mnist", seed=0)
    images = torch.rand(300, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with _student_code("extract_activations(model, images)"):
        result = extract_fn(model, images)
    result = torch.as_tensor(np.asarray(result.detach() if isinstance(result, torch.Tensor) else result))
    expected = extract_features(model, images, progress=False)
    _require(result.shape == expected.shape, f"extract_activations must return shape {tuple(expected.shape)} "
                                             f"(images x features), got {tuple(result.shape)}")
    _require(torch.allclose(result.float(), expected, atol=1e-4),
             "extract_activations must return model.features(images), computed in eval mode")


def _flags(detector, activations: np.ndarray, labels: np.ndarray, what: str) -> np.ndarray:
    """Run the student's detector and check its answer: one boolean per sample.

    scikit-learn runs single-threaded here: per-class problems of a few thousand samples
    are fastest that way, and a busy grading machine does not slow them down tenfold.
    """
    with _student_code(f"activation_clustering on {what}"), threadpool_limits(limits=1):
        flags = detector(activations.copy(), labels.copy())
    flags = np.asarray(flags.detach().cpu() if isinstance(flags, torch.Tensor) else flags)
    _require(flags.dtype == bool and flags.shape == labels.shape,
             f"activation_clustering must return a boolean array with one entry per sample {labels.shape}, "
             f"got dtype {flags.dtype} and shape {flags.shape}")
    return flags


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


@_graded
def check_detector_on_planted(detector) -> None:
    """The detector finds a planted, well-separated cluster and (almost) nothing else."""
    activations, labels, poisoned = planted_activations()
    flags = _flags(detector, activations, labels, "the planted example")
    found = flags[poisoned].mean()
    _require(found >= 0.9, f"only {found:.0%} of the 60 planted samples were flagged (need at least 90%)")
    wrong = int(flags[~poisoned].sum())
    _require(wrong <= 15, f"{wrong} of the {int((~poisoned).sum())} clean samples were flagged "
                          f"(at most 15 allowed)")


def _score(detector) -> dict:
    """Per-model verdicts and per-sample TPR/FPR of ``detector`` on the graded zoo."""
    folder, key = grading_dir(), answer_key()
    report = {}
    for name, entry in key["models"].items():
        tensors = load_file(str(folder / "activations" / f"{name}.safetensors"))
        labels = tensors["labels"].numpy()
        flags = _flags(detector, tensors["activations"].numpy(), labels, name)
        truth = np.zeros(len(labels), dtype=bool)
        truth[entry.get("poisoned_indices", [])] = True
        report[name] = {"backdoored": entry["backdoored"], "verdict": bool(flags.any()),
                        "tpr": float(flags[truth].mean()) if truth.any() else None,
                        "fpr": float(flags[~truth].mean())}
    return report


_SCORES: dict = {}


def detector_report(detector) -> dict:
    """:func:`_score`, computed once per detector function (three checks share it)."""
    if detector not in _SCORES:
        _SCORES[detector] = _score(detector)
    return _SCORES[detector]


@_graded
def check_zoo_verdicts(detector, *, min_found: float) -> None:
    """Every clean zoo model is judged clean, and at least ``min_found`` of the backdoored ones
    backdoored (a model is judged backdoored when any of its samples is flagged)."""
    report = detector_report(detector)
    accused = [name for name, r in report.items() if r["verdict"] and not r["backdoored"]]
    _require(not accused, f"{len(accused)} clean zoo model(s) judged backdoored: a clean model must have "
                          f"no sample flagged")
    backdoored = [r for r in report.values() if r["backdoored"]]
    found = sum(r["verdict"] for r in backdoored) / len(backdoored)
    _require(found >= min_found, f"{found:.0%} of the backdoored zoo models were found; at least "
                                 f"{min_found:.0%} must be")


@_graded
def check_zoo_tpr(detector, *, minimum: float) -> None:
    """Mean per-sample true-positive rate over the backdoored zoo models is at least ``minimum``."""
    rates = [r["tpr"] for r in detector_report(detector).values() if r["backdoored"]]
    tpr = float(np.mean(rates))
    _require(tpr >= minimum, f"mean true-positive rate over the backdoored zoo models is {tpr:.2f}; "
                             f"it must be at least {minimum}")


@_graded
def check_zoo_fpr(detector, *, maximum: float) -> None:
    """Mean per-sample false-positive rate over all zoo models is at most ``maximum``."""
    fpr = float(np.mean([r["fpr"] for r in detector_report(detector).values()]))
    _require(fpr <= maximum, f"mean false-positive rate over the zoo models is {fpr:.3f}; "
                             f"it must be at most {maximum}")


def _short_tracebacks_when_autograding() -> None:
    """During ``nbgrader autograde``, show every error as one line (no quoted test code)."""
    if os.environ.get("NBGRADER_EXECUTION") != "autograde":
        return
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is not None and hasattr(shell, "InteractiveTB"):
        shell.InteractiveTB.set_mode("Minimal")


_short_tracebacks_when_autograding()
