"""Part 1's rules: what a trigger, a poisoning function and a handed-in model must satisfy.

Part 1 asks for three backdoor triggers, a dirty-label poisoning function and a model trained
on poisoned data. Each rule here is a function of *data*, never of the student's code: the
images a trigger returned (``verify_triggered``, ``verify_trigger_contract``), the dataset and
indices a poisoning function returned (``verify_poisoning``), a saved model loaded without
executing code (``load_student_model``, safetensors + JSON). Two callers apply the same rules:
the notebook's test cells, in the student's kernel (:mod:`.kernel`), and the trusted
autograder, in a process the student's code never reaches (:mod:`course_lib.autograde`).

Why these rules. A trigger counts only if it is a trigger, not a picture of the target class:
it may change an image by an RMS of at most ``MAX_TRIGGER_RMS`` (:mod:`.rules`), and a clean
reference model that never saw it must not call triggered images the target
(``verify_backdoor_trigger``). The model's clean accuracy (CA) and attack success rate (ASR)
are measured with the images the student's own trigger returned, the ASR over test images
whose true label is not the target (erratum 1, docs/DESIGN.md). Whether the trigger really
plants a backdoor is decided by the grader's own poisoning run (:mod:`.witness`).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoints import CheckpointError, load_checkpoint
from ..data import ImageDataset, dataset_info
from ..train import predict
from .files import GradingFiles, evaluation_data
from .rules import (ARCHITECTURES, LEGITIMACY_IMAGES, MAX_MODEL_BYTES, MAX_REFERENCE_TARGET_RATE, MAX_TRIGGER_COSINE,
                    MAX_TRIGGER_RMS, MIN_ATTACK_SUCCESS, MIN_CLEAN_ACCURACY, MODEL_FILE, TRIGGER_FUNCTIONS,
                    GradingFailure, all_problems, graded, require)

# ---------------------------------------------------------------- triggers

def verify_triggered(images: torch.Tensor, out, name: str) -> torch.Tensor:
    """What a trigger returned for ``images`` is a batch of triggered images: a tensor of the
    same shape and dtype, finite, in [0, 1]."""
    require(isinstance(out, torch.Tensor), f"{name} must return a torch.Tensor, got {type(out).__name__}")
    require(out.shape == images.shape, f"{name} must return the shape it was given {tuple(images.shape)}, "
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
            require(torch.equal(first, verify_triggered(images, again, name)),
                    f"{name} gave a different result on a second call with the same images: it must be "
                    f"deterministic and must not modify its input (work on images.clone())")
        with problems.independently():
            require(torch.allclose(verify_triggered(images[5:6], alone, name), first[5:6], atol=1e-6),
                    f"{name} gives image 5 a different result alone than inside a batch: treat every image "
                    f"on its own (e.g. one fixed pattern for all images, not one drawn per batch)")
        problems.require(isinstance(batch, torch.Tensor) and batch.shape[1:] == images.shape[1:]
                         and len(batch) >= len(images) and torch.allclose(batch[:len(images)], first, atol=1e-6),
                         f"{name} gives the first {len(images)} images different results inside a larger batch: "
                         f"treat every image on its own")
        changed = (first - images).flatten(1).abs().amax(1) > 1e-6
        problems.require(changed.float().mean() >= 0.95, f"{name} leaves {int((~changed).sum())} of {len(images)} "
                                                         f"images unchanged: a trigger must change every image")


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



# ---------------------------------------------------------------- poisoning

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
    require(isinstance(result, tuple) and len(result) == 2,
            f"{call} must return a pair (poisoned dataset, indices), got {type(result).__name__}")
    poisoned, indices = result
    require(isinstance(poisoned, ImageDataset), f"the poisoned dataset must be an ImageDataset "
                                                f"(use data.replace(...)), got {type(poisoned).__name__}")
    require(len(poisoned) == len(data), f"the poisoned dataset must keep all {len(data)} images, has {len(poisoned)}")
    require(poisoned.images.shape == data.images.shape, f"the poisoned images must keep the shape "
                                                        f"{tuple(data.images.shape)}")
    require(isinstance(indices, torch.Tensor) and indices.ndim == 1 and indices.dtype == torch.int64,
            "indices must be a 1-D int64 torch tensor")
    require(bool(((indices >= 0) & (indices < len(data))).all()), "indices must lie in [0, len(data))")
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



# ---------------------------------------------------------------- the saved model

@graded
def load_student_model(path=MODEL_FILE, *, dataset: str, files: GradingFiles | None = None):
    """Load the handed-in model safely and check that it fits ``dataset``; returns (model, metadata).

    With the grading ``files``, a model that carries the weights of a zoo model is refused:
    the homework asks for a model the student trained.
    """
    path = Path(path)
    require(path.is_file() and not path.is_symlink(),
            f"{path.name} was not handed in: run the training cell (Task 3) first, it writes it (with "
            f"{path.with_suffix('.json').name}); submit both next to the notebook")
    size = path.stat().st_size
    require(size <= MAX_MODEL_BYTES, f"{path.name} is {size / 1e6:.0f} MB, more than the "
                                     f"{MAX_MODEL_BYTES / 1e6:.0f} MB allowed")
    try:
        model, meta = load_checkpoint(path, expected_dataset=dataset, max_bytes=MAX_MODEL_BYTES)
    except CheckpointError as err:
        raise GradingFailure(f"{path.name} cannot be loaded safely: {err}") from None
    arch = meta["config"]["arch"]
    require(arch in ARCHITECTURES[dataset], f"{path.name} holds a {arch!r} model; for {dataset} use "
                                            f"{' or '.join(ARCHITECTURES[dataset])} (course_lib.models.model_for)")
    info = dataset_info(dataset)
    with torch.no_grad():
        logits = model(evaluation_data(dataset).images[:2])
    require(logits.shape == (2, len(info.classes)), f"the model must output {len(info.classes)} logits "
                                                    f"per image, got shape {tuple(logits.shape)}")
    if files is not None:
        copied = files.known_zoo_model(model)
        require(copied is None, f"{path.name} carries the weights of a zoo model ({copied}): hand in a model "
                                f"you trained yourself")
    return model, meta


def verify_clean_accuracy(model, data: ImageDataset, minimum: float = MIN_CLEAN_ACCURACY, name: str = MODEL_FILE):
    """CA of ``model`` on the test ``data`` is above ``minimum``."""
    accuracy = (predict(model, data.images) == data.labels).float().mean().item()
    require(accuracy > minimum, f"clean accuracy of {name} on the {len(data)} {data.name} test "
                                f"images is {accuracy:.3f}; it must be above {minimum}")


def recorded_trigger(meta: dict, name: str = MODEL_FILE) -> str:
    """The trigger function the model file says it was trained with."""
    trigger = meta.get("extra", {}).get("trigger")
    require(trigger in TRIGGER_FUNCTIONS, f"{name} must record which trigger it was trained with: "
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


