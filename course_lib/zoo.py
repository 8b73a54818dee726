"""The model zoo of the Week 4 homework: models to run a backdoor detector on.

Part 2 of the homework asks students to implement Activation Clustering (Chen et al.
2018) and to find out which models of a zoo are backdoored and which training samples
were poisoned. ``python -m course_lib zoo build --out DIR`` trains that zoo from a list
of recipes:

- a few clean models and a few backdoored ones: dirty-label BadNets (Gu et al. 2017)
  with different triggers, targets and poisoning rates, and one clean-label backdoor
  (Turner et al. 2019, :func:`course_lib.attacks.label_consistent`);
- each model is trained on its own random part of the training split.

Every recipe is trained twice, with independent seeds: once as a *graded* model
(``model_1``, ``model_2``...) and once as an *exercise* model (``exercise_1``...). The
graded models never leave the instructor's folder. Had they been public with their
training sets, a student could diff each training set against the public dataset and
read off the poisoned samples (a dirty-label poison matches no original image, or has
another label): the answer key. Students get the exercise models instead, which they
may take apart as they please: they are not graded.

It writes two folders that must never be confused:

``--public`` (default ``DIR/public``): what students get. ``index.json``, and for each
    exercise model and for the *practice* model ``<name>.safetensors`` + ``<name>.json``
    (a safe checkpoint, no hint of its answer) and ``<name>-train.safetensors`` (its
    training set, uint8 images and labels). The practice model's answer is in
    ``index.json``, so students can measure their detector.
``DIR`` itself: the instructor's folder, never released. ``answer_key.json`` (which
    graded and exercise models are backdoored, targets, poisoned indices, measured
    CA/ASR), a clean ``reference.safetensors`` (the Part 1 autograder checks that a
    student's trigger does not fool a clean model on its own), ``activations/<name>.safetensors``
    (each graded model's penultimate activations on its training set: the Part 2
    autograder feeds them to the student's detector) and ``models/<name>.safetensors``
    + ``.json`` (every graded, exercise and practice checkpoint, for :func:`known_zoo_model`).

No backdoored zoo model has the homework's target class (``homework_target``), and
:func:`known_zoo_model` recognizes zoo weights: a zoo model handed in as a student's
Part 1 model is caught twice.

Which recipe becomes which name, every target class and every training subset are drawn
from ``seed``. The recipes below are public, so an instructor must pass a seed of their
own: with the default seed a student could rebuild the answer key.

Every poisoned training set is rounded to 8-bit pixels *before* training, so the stored
training set and activations are exactly what the model saw.

``--small`` builds a zoo for the kit's own tests: three graded models and a single exercise
model. Students never get it: Part 2 promises several exercise models, one of them
clean-label, and ``python scripts/homework.py release`` warns when the zoo it releases is
small (``index.json`` records it).
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .attacks import PoisonResult, badnets, label_consistent
from .checkpoints import load_checkpoint, save_checkpoint
from .data import DATASETS, ImageDataset, load_splits
from .defenses.activations import extract_features
from .metrics import attack_success_rate, clean_accuracy
from .models import model_for
from .train import train
from .triggers import make_trigger

FORMAT = "course_lib.zoo/2"
PUBLIC_MODE = 0o644               # the public zoo is read by every student (a shared path, WEEK4_ZOO)
FINGERPRINT_THRESHOLD = 0.5
"""Relative L2 distance below which :func:`known_zoo_model` says a model carries a zoo model's
weights. Measured on Fashion-MNIST (small CNN, docs/instructor_guide.md section 1): models
trained from different random initializations lie 1.02-1.05 apart, whatever their data;
a model trained further from a zoo model's weights stays 0.005-0.3 from it (0.28 after 2
epochs on 20,000 poisoned images at the homework's learning rate): training never forgets
its starting point. 0.5 lies in the middle of that gap: it catches copies and fine-tuned copies and
leaves every model trained from scratch (zoo weight seeds are never 0, the notebook's seed)."""


@dataclass(frozen=True)
class Recipe:
    """How to make one zoo model.

    ``attack`` is None (clean), ``"badnets"`` (``rate`` = fraction of the whole training
    set) or ``"label_consistent"`` (``rate`` = fraction of the target class);
    ``trigger`` is a :func:`course_lib.triggers.make_trigger` name and its arguments.
    """

    label: str
    attack: str | None = None
    trigger: tuple[str, dict] | None = None
    rate: float = 0.0


DEFAULT_RECIPES = (
    Recipe("clean"),
    Recipe("clean"),
    Recipe("badnets-patch", "badnets", ("patch", {"size": 3, "pattern": "checkerboard"}), 0.05),
    Recipe("badnets-distributed", "badnets", ("distributed", {"patch_size": 2}), 0.03),
    Recipe("badnets-square", "badnets", ("patch", {"size": 4, "pattern": "solid", "location": "top-right"}), 0.07),
    Recipe("badnets-blend", "badnets", ("blend", {"alpha": 0.2, "seed": 7}), 0.08),
    Recipe("label-consistent", "label_consistent", ("distributed", {"patch_size": 3}), 0.5),
)
SMALL_RECIPES = DEFAULT_RECIPES[1:4]
SMALL_EXERCISES = DEFAULT_RECIPES[2:3]  # one backdoored exercise model keeps the small build short
PRACTICE = Recipe("practice", "badnets", ("patch", {"size": 4, "pattern": "solid", "location": "top-left"}), 0.05)


@dataclass(frozen=True)
class Settings:
    """Training-set size and epochs of every zoo model."""

    num_train: int
    epochs: int


DEFAULT_SETTINGS = Settings(num_train=10_000, epochs=3)
SMALL_SETTINGS = Settings(num_train=6_000, epochs=2)


@dataclass(frozen=True)
class ZooModel:
    """One model of the zoo and the training set it was trained on.

    ``poisoned`` and ``target`` are known only for the practice model (None otherwise).
    """

    name: str
    model: nn.Module
    data: ImageDataset
    poisoned: torch.Tensor | None = None
    target: int | None = None


@dataclass(frozen=True)
class Planned:
    """One model to train: its name, role, recipe, target class and the seeds of its data and weights.

    ``role`` is ``"reference"``, ``"practice"``, ``"graded"`` (instructor only) or ``"exercise"`` (public).
    """

    name: str
    role: str
    recipe: Recipe
    target: int
    subset_seed: int
    model_seed: int


def plan_zoo(*, small: bool = False, seed: int = 0, num_classes: int = 10,
             homework_target: int = 0) -> list[Planned]:
    """Who is who in the zoo, drawn from ``seed``: the reference, the practice model, the graded
    ``model_1``, ``model_2``... and the public ``exercise_1``... (each list of recipes in its own
    seeded random order).

    Targets are drawn from every class except ``homework_target``, the class the students'
    own backdoor must aim at, so no zoo model can pass for a student's Part 1 model.
    Weight seeds start at 1: the homework's reference solution trains with seed 0.
    """
    _check_seed(seed)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if isinstance(homework_target, bool) or not isinstance(homework_target, int) \
            or not 0 <= homework_target < num_classes:
        raise ValueError(f"homework_target must be a class index in [0, {num_classes}), got {homework_target!r}")
    rng = np.random.default_rng(seed)
    targets = [c for c in range(num_classes) if c != homework_target]
    named = [("reference", "reference", Recipe("reference")), ("practice", "practice", PRACTICE)]
    for role, prefix, recipes in (("graded", "model", SMALL_RECIPES if small else DEFAULT_RECIPES),
                                  ("exercise", "exercise", SMALL_EXERCISES if small else DEFAULT_RECIPES)):
        named += [(f"{prefix}_{i + 1}", role, recipes[j]) for i, j in enumerate(rng.permutation(len(recipes)))]
    return [Planned(name, role, recipe, int(rng.choice(targets)), *(int(v) for v in rng.integers(1, 2**31 - 1, 2)))
            for name, role, recipe in named]


def _check_seed(seed) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")


def build_zoo(out, *, public=None, dataset: str = "fashion-mnist", small: bool = False, seed: int = 0,
              homework_target: int = 0, device=None, progress: bool = True,
              data: tuple[ImageDataset, ImageDataset] | None = None, graded_only: bool = False) -> dict:
    """Train the zoo and write it (see the module docstring). Returns the answer key.

    ``data`` is an optional (train, test) pair to use instead of loading ``dataset`` (tests
    pass small synthetic data); the zoo then records the data's own name. ``graded_only``
    trains the reference and the graded models only (the same names, seeds and answer key
    entries as a full build with this seed): enough to check a detector on many seeds'
    graded zoos at half the cost; the public folder then has an empty index.
    """
    if not isinstance(graded_only, bool):
        raise ValueError(f"graded_only must be True or False, got {graded_only!r}")
    if data is None and dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {sorted(DATASETS)}, got {dataset!r}")
    out = Path(out)
    public = out / "public" if public is None else Path(public)
    if public.resolve() == out.resolve() or public.resolve() in out.resolve().parents:
        raise ValueError("public must be a folder that neither is nor contains out: out holds the answer key")
    _check_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    out.chmod(0o700)                  # the answer key and the hidden models: the instructor's alone
    train_split, test_split = data if data is not None else load_splits(dataset)
    plan = plan_zoo(small=small, seed=seed, num_classes=train_split.num_classes, homework_target=homework_target)
    settings = SMALL_SETTINGS if small else DEFAULT_SETTINGS
    start = time.perf_counter()
    reference, _, _ = _fit(plan[0], train_split, settings, None, device, progress)
    save_checkpoint(reference, out / "reference.safetensors", dataset=train_split.name, classes=train_split.classes)
    key = {"format": FORMAT, "dataset": train_split.name, "seed": seed, "small": small,
           "homework_target": homework_target, "num_train": settings.num_train, "epochs": settings.epochs,
           "models": {}, "exercises": {}}
    index = {"format": FORMAT, "dataset": train_split.name, "classes": list(train_split.classes), "small": small,
             "models": []}
    for planned in plan[1:]:
        if graded_only and planned.role != "graded":
            continue
        name = planned.name
        model, trained, poison = _fit(planned, train_split, settings, reference, device, progress)
        save_checkpoint(model, out / "models" / f"{name}.safetensors", dataset=trained.name, classes=trained.classes)
        answer = _answer(planned.recipe, model, poison, test_split)
        if planned.role == "graded":  # hidden: only its activations and answer are kept
            _write_activations(out / "activations" / f"{name}.safetensors", model, trained)
            key["models"][name] = answer
        elif planned.role == "exercise":  # public, answer kept back
            _write_model(public, name, model, trained)
            key["exercises"][name] = answer
            index["models"].append(_files(name))
        else:  # the practice model: public, answer included
            _write_model(public, name, model, trained)
            key["practice"] = answer
            index["practice"] = {**_files(name), "target": poison.target, "trigger": repr(poison.trigger),
                                 "poisoned_indices": poison.indices.tolist()}
    public.mkdir(parents=True, exist_ok=True)
    (public / "index.json").write_text(json.dumps(index, indent=1))
    (public / "index.json").chmod(PUBLIC_MODE)
    key["seconds"] = round(time.perf_counter() - start, 1)
    (out / "answer_key.json").write_text(json.dumps(key, indent=1))
    (out / "answer_key.json").chmod(0o600)
    return key


def _fit(planned: Planned, train_split: ImageDataset, settings: Settings, surrogate, device, progress: bool):
    """Train one planned model on its own subset, poisoned by its recipe and rounded to 8 bits.

    Returns the model (CPU, eval mode), its training set and the :class:`PoisonResult` (None if clean).
    """
    subset, _ = train_split.split(min(settings.num_train, len(train_split) - 1), seed=planned.subset_seed)
    poison = _poison(planned, subset, surrogate, device, progress)
    trained = _quantized(poison.dataset if poison else subset)
    model = model_for(trained, seed=planned.model_seed)
    train(model, trained, epochs=settings.epochs, seed=planned.model_seed, device=device, progress=progress)
    if progress:
        print(f"zoo: trained {planned.name} ({planned.recipe.label})", flush=True)
    return model.cpu().eval(), trained, poison


def _poison(planned: Planned, data: ImageDataset, surrogate, device, progress: bool) -> PoisonResult | None:
    """Apply the planned recipe's attack to ``data`` (None for a clean recipe)."""
    recipe = planned.recipe
    if recipe.attack is None:
        return None
    name, kwargs = recipe.trigger
    trigger = make_trigger(name, **kwargs)
    if recipe.attack == "badnets":
        return badnets(data, trigger=trigger, target=planned.target, rate=recipe.rate, seed=planned.model_seed)
    return label_consistent(data, trigger=trigger, target=planned.target, rate=recipe.rate, surrogate=surrogate,
                            seed=planned.model_seed, device=device, progress=progress)


def _quantized(data: ImageDataset) -> ImageDataset:
    """``data`` with its pixels rounded to 8 bits: exactly what the stored uint8 file holds."""
    return data.replace(images=_to_uint8(data.images).float() / 255)


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    return (images * 255).round().clamp(0, 255).to(torch.uint8)


def _files(name: str) -> dict:
    return {"name": name, "checkpoint": f"{name}.safetensors", "training_set": f"{name}-train.safetensors"}


def _write_model(folder: Path, name: str, model: nn.Module, data: ImageDataset) -> None:
    """A public zoo model's checkpoint (no hint of its answer in the metadata) and its training set."""
    files = _files(name)
    save_checkpoint(model, folder / files["checkpoint"], dataset=data.name, classes=data.classes)
    save_file({"images": _to_uint8(data.images).contiguous(), "labels": data.labels.contiguous()},
              str(folder / files["training_set"]))
    checkpoint_json = Path(files["checkpoint"]).with_suffix(".json").name
    for written in (files["checkpoint"], checkpoint_json, files["training_set"]):
        if (folder / written).is_file():       # safetensors writes 0600, and a umask may hide the rest
            (folder / written).chmod(PUBLIC_MODE)
    folder.chmod(0o755)


def _write_activations(path: Path, model: nn.Module, data: ImageDataset) -> None:
    """A graded model's penultimate activations on its training set, and the labels: what the
    Part 2 autograder feeds to a student's detector."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"activations": extract_features(model, data.images, progress=False).contiguous(),
               "labels": data.labels.contiguous()}, str(path))


def _answer(recipe: Recipe, model: nn.Module, poison: PoisonResult | None, test: ImageDataset) -> dict:
    """The answer-key entry of one model: what was done to it and how well it works."""
    entry = {"recipe": recipe.label, "backdoored": poison is not None, "attack": recipe.attack,
             "clean_accuracy": round(clean_accuracy(model, test), 4)}
    if poison is not None:
        entry.update(trigger=repr(poison.trigger), target=poison.target, rate=recipe.rate,
                     num_poisoned=len(poison.indices), poisoned_indices=poison.indices.tolist(),
                     asr=round(attack_success_rate(model, test, poison.trigger, poison.target), 4))
    return entry


def known_zoo_model(model: nn.Module, folder, *, threshold: float = FINGERPRINT_THRESHOLD) -> str | None:
    """The name of the zoo model whose weights ``model`` carries, or None if it carries none.

    ``folder`` is the instructor's zoo folder (``build_zoo``'s ``out``). The autograder calls
    this with a student's Part 1 model: handing in a zoo model, or training on from one, is
    not doing the homework. ``model``'s parameters (weights and biases; not
    buffers such as the normalization statistics) are compared with those of
    ``folder/reference.safetensors`` and of every checkpoint in ``folder/models/`` (graded,
    exercise and practice models) that has the same parameter names and shapes. A zoo model
    matches when the relative L2 distance ``||w - w_zoo|| / ||w_zoo||`` is below ``threshold``
    (see :data:`FINGERPRINT_THRESHOLD`); the closest match wins. Checkpoints are loaded with
    :func:`course_lib.checkpoints.load_checkpoint` (safetensors + JSON, no pickle).

    A copy, a noisy copy or a model trained further from a zoo model's weights is caught; a
    zoo model whose channels were permuted (same function, other weights) is not.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold < 1:
        raise ValueError(f"threshold must be a number in (0, 1), got {threshold!r}")
    folder = Path(folder)
    if not (folder / "models").is_dir():
        raise FileNotFoundError(f"folder: {folder / 'models'} does not exist; pass the folder written by "
                                f"`python -m course_lib zoo build --out DIR` (DIR, not the public folder)")
    weights = _parameters(model)
    candidates = [folder / "reference.safetensors", *sorted((folder / "models").glob("*.safetensors"))]
    best, best_distance = None, threshold
    for path in filter(Path.is_file, candidates):
        distance = relative_distance(weights, _parameters(load_checkpoint(path)[0]))
        if distance < best_distance:
            best, best_distance = path.stem, distance
    return best


def _parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """A model's trained parameters by name, as float CPU tensors: its fingerprint."""
    return {name: p.detach().cpu().float() for name, p in model.named_parameters()}


def relative_distance(weights: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    """``||w - w_ref|| / ||w_ref||`` over all tensors of two name -> tensor dicts (e.g. parameters);
    infinity when their names or shapes differ (different architectures are never the same model)."""
    if not isinstance(weights, dict) or not isinstance(reference, dict):
        raise TypeError("weights and reference must be dicts of tensors, e.g. dict(model.named_parameters())")
    if weights.keys() != reference.keys() or any(weights[k].shape != reference[k].shape for k in reference):
        return float("inf")
    difference = torch.cat([(weights[k].float() - reference[k].float()).flatten() for k in reference])
    norm = torch.cat([reference[k].float().flatten() for k in reference]).norm()
    return (difference.norm() / norm).item()


def load_zoo(folder) -> list[ZooModel]:
    """The exercise models of a public zoo folder (what students get), in name order, loaded safely.

    Their answers are not published; the graded models they mirror stay with the instructor.
    """
    index = _read_index(folder)
    return [_load_entry(Path(folder), entry, index) for entry in index["models"]]


def load_practice(folder) -> ZooModel:
    """The practice model, with its poisoned indices and target: the one model whose answer is public."""
    index = _read_index(folder)
    entry = index["practice"]
    loaded = _load_entry(Path(folder), entry, index)
    return ZooModel(loaded.name, loaded.model, loaded.data,
                    torch.tensor(entry["poisoned_indices"], dtype=torch.int64), int(entry["target"]))


def _read_index(folder) -> dict:
    path = Path(folder) / "index.json"
    if not path.is_file():
        raise FileNotFoundError(f"folder: {path} does not exist; build the zoo with "
                                f"`python -m course_lib zoo build --out DIR` or ask your instructor for it")
    index = json.loads(path.read_text())
    if index.get("format") != FORMAT:
        raise ValueError(f"folder: {path} is not a course_lib zoo index of format {FORMAT}; rebuild the zoo")
    return index


def _load_entry(folder: Path, entry: dict, index: dict) -> ZooModel:
    model, _ = load_checkpoint(folder / entry["checkpoint"], expected_dataset=index["dataset"])
    return ZooModel(entry["name"], model, load_training_set(folder / entry["training_set"], index))


def load_training_set(path, index: dict) -> ImageDataset:
    """A zoo training set file (uint8 images + int64 labels) as a float ImageDataset."""
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"path: {path} is not a readable zoo training set ({err})") from err
    images, labels = tensors.get("images"), tensors.get("labels")
    if images is None or labels is None or images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"path: {path} must hold uint8 'images' (N, C, H, W) and int64 'labels'")
    return ImageDataset(images.float() / 255, labels, tuple(index["classes"]), index["dataset"])


def main(argv=None) -> None:
    """``python -m course_lib zoo build --out DIR [--public DIR] [--dataset D] [--small] [--seed N]
    [--homework-target C]``."""
    parser = argparse.ArgumentParser(prog="python -m course_lib zoo", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="train the zoo and write it with its answer key")
    build.add_argument("--out", required=True, type=Path,
                       help="instructor-only folder: answer key, reference, graded models, activations")
    build.add_argument("--public", type=Path, default=None,
                       help="student-facing folder (default OUT/public), e.g. assignments/source/week4/zoo")
    build.add_argument("--dataset", default="fashion-mnist", choices=sorted(DATASETS))
    build.add_argument("--small", action="store_true",
                       help="a test fixture, never for students: 3 graded models and 1 exercise model, smaller "
                            "and shorter training (time: see docs/instructor_guide.md, Timings)")
    build.add_argument("--seed", type=int, default=0,
                       help="choose your own: the recipes are public, the seed keeps the answer secret")
    build.add_argument("--homework-target", type=int, default=0,
                       help="the homework's target class, which no zoo backdoor aims at (default 0)")
    build.add_argument("--device", default=None, help="cpu, cuda, mps (default: the fastest present)")
    build.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    key = build_zoo(args.out, public=args.public, dataset=args.dataset, small=args.small, seed=args.seed,
                    homework_target=args.homework_target, device=args.device, progress=not args.quiet)
    print(f"zoo: {len(key['models'])} graded and {len(key['exercises'])} exercise models in {key['seconds']} s; "
          f"answer key in {args.out / 'answer_key.json'}")
    for name, entry in {**key["models"], **key["exercises"], "practice": key["practice"]}.items():
        asr = f"ASR {entry['asr']:.3f} (target {entry['target']})" if entry["backdoored"] else "clean"
        print(f"  {name}: {entry['recipe']:<20} CA {entry['clean_accuracy']:.3f}  {asr}")
