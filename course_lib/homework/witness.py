"""The grader's own poisoning run: a witness that a student's trigger plants a backdoor.

Part 1's handed-in model and trigger come from the same student. A clean model and an
adversarial "trigger" (a perturbation optimised against that very model) give a high
attack success rate without any backdoor: the model was never poisoned, it was evaded
(Szegedy et al. 2014; a universal perturbation, Moosavi-Dezfooli et al. 2017, is one
fixed pattern). The handed-in model alone cannot tell the two apart.

So the grader runs the attack itself, in its own process, with data and seeds the student
does not choose (BadNets, Gu et al. 2017, done by the grader):

1. a **pool** is drawn from the dataset's train and test splits mixed together, so that no
   image's public split says what it will be used for: non-target images
   that the student's trigger is applied to (in the sandbox, like every other call), plus
   clean training images and clean held-out images that the trigger never sees;
2. after the trigger has run, a fresh secret seed splits the stamped images: a fixed
   share of the training set is poisoned with them (relabelled to the target),
   the rest are held out to measure the attack;
3. a fresh model is trained on that data with the dataset's fixed recipe (:data:`RECIPES`:
   architecture, images, epochs, augmentation);
4. its attack success rate (ASR) on the triggered images it never trained on, and its clean
   accuracy (CA) on the held-out clean images, are the grader's own measurement. The CA bar
   is relative: the same recipe trained on the same pool *without* poison
   (:attr:`Pool.clean_ca`, once per pool) sets it, so that one rule is fair on a dataset
   where a short recipe reaches 0.9 and on one where it reaches 0.6.

A trigger cannot tell the images it poisons from those it is measured on: both are drawn
from the same mixed pool, and which is which is decided after the trigger returned. What
this certifies is the attack, not the handed-in model: a perturbation that a freshly
poisoned model learns as a backdoor *is* a working poisoning trigger, whatever it was
computed from, and it passes here even when the model handed in beside it is clean.

The same stamped images also check the handed-in model (:func:`verify_model_follows`): a
backdoor follows its trigger on any image, so its ASR must hold on the grader's images from
both splits, not only on the public test split, which a trigger can recognise image by image.

Who runs it: the trusted autograder (:func:`verify_trigger_poisons`, on what the trigger
returned in its sandbox), the student's own notebook (``check_trigger_poisons`` in
:mod:`.kernel`, the same rule and recipe), and the class tournament, whose arenas are this
run at the tournament's poisoning rate (:func:`poison`, :func:`train_recipe`;
:mod:`course_lib.tournament.arenas`).
"""
from __future__ import annotations

import functools
import secrets
from dataclasses import dataclass

import torch

from ..data import ImageDataset, load_dataset
from ..models import ARCHITECTURES, model_for
from ..train import predict, train
from .part1 import verify_backdoor_trigger, verify_triggered
from .rules import MAX_CA_DROP, MIN_ASR, MIN_ATTACK_SUCCESS, MODEL_FILE, require


@dataclass(frozen=True)
class Recipe:
    """One dataset's fixed poisoning recipe for the grader's run. Each was chosen so that every
    honest trigger family of the kit and the reference solution's three triggers clear
    :data:`MIN_ASR` and :data:`MAX_CA_DROP` with a margin (``python scripts/homework.py
    bench-witness``; docs/instructor_guide.md, "Thresholds" and "Switching the homework to CIFAR-10")."""

    arch: str = "small_cnn"      # trained whatever the student's architecture: the run certifies the trigger
    train_images: int = 5000     # the grader's training set, poisoned images included
    rate: float = 0.2            # share of it poisoned with the student's trigger (relabelled to the target)
    epochs: int = 2
    batch_size: int = 64         # small batches: a faint trigger needs steps more than it needs images
    augment: str | bool = False  # course_lib.train's augmentations ("flip", "crop", "flip+crop")
    measure_images: int = 1000   # triggered non-target images held out to measure the ASR
    holdout_images: int = 1000   # clean images held out to measure the CA

    def __post_init__(self):
        require(self.arch in ARCHITECTURES, f"arch must be one of {sorted(ARCHITECTURES)}, got {self.arch!r}")
        for arg in ("train_images", "epochs", "batch_size", "measure_images", "holdout_images"):
            value = getattr(self, arg)
            require(isinstance(value, int) and value > 0, f"{arg} must be a positive integer, got {value!r}")
        require(0 < self.rate < 1 and 0 < self.poisoned < self.train_images,
                 f"rate must poison some but not all of the {self.train_images} images, got {self.rate!r}")

    @property
    def poisoned(self) -> int:
        return round(self.rate * self.train_images)

    @property
    def stamped(self) -> int:
        """How many images the trigger is applied to: the poisoned ones and the measured ones."""
        return self.poisoned + self.measure_images


RECIPES: dict[str, Recipe] = {
    # seconds on one CPU core; measured on honest triggers (docs/instructor_guide.md, "Thresholds");
    # MNIST, the easier dataset, takes Fashion-MNIST's recipe unmeasured
    "fashion-mnist": Recipe(),
    "mnist": Recipe(),
    # airbench, the kit's fast CIFAR network, with flips (no translation: it can push a corner
    # trigger off the image); meant for a GPU, not yet calibrated on the real CIFAR-10
    # (docs/instructor_guide.md, "Switching the homework to CIFAR-10")
    "cifar10": Recipe(arch="airbench", train_images=10000, epochs=10, batch_size=256, augment="flip",
                      holdout_images=2000),
}
RECIPE = RECIPES["fashion-mnist"]


def recipe_for(dataset: str) -> Recipe:
    """The grader's recipe for ``dataset`` (a key of :data:`RECIPES`)."""
    require(dataset in RECIPES, f"dataset must be one of {sorted(RECIPES)} (or pass a witness.Recipe), "
                                 f"got {dataset!r}")
    return RECIPES[dataset]


@dataclass(frozen=True)
class Pool:
    """The grader's images for one grading run: ``stamped`` (the trigger is applied to these),
    ``clean`` (training images never stamped) and ``holdout`` (clean images to measure CA)."""

    stamped: ImageDataset
    clean: ImageDataset
    holdout: ImageDataset
    recipe: Recipe = RECIPE
    seed: int = 0

    @functools.cached_property
    def clean_ca(self) -> float:
        """CA of the recipe trained on this pool without poison: the clean images plus as many
        stamped images as the run poisons, unstamped and with their own labels. Trained once
        per pool (the trigger plays no part), on the held-out images the poisoned model is
        measured on, so the two CAs differ by the poison and the seeds only."""
        order = torch.randperm(len(self.stamped), generator=torch.Generator().manual_seed(self.seed))
        unpoisoned = self.stamped.subset(order[:self.recipe.poisoned])
        data = self.clean.replace(images=torch.cat([self.clean.images, unpoisoned.images]),
                                  labels=torch.cat([self.clean.labels, unpoisoned.labels]))
        return hit_rate(train_recipe(self.recipe, data, self.seed), self.holdout.images, self.holdout.labels)


def draw_seed() -> int:
    """A seed no submission can predict (from the operating system's random source)."""
    return secrets.randbits(31)


@functools.lru_cache(maxsize=2)
def mixed_splits(dataset: str) -> ImageDataset:
    """The train and test splits of ``dataset`` as one set (70,000 images for Fashion-MNIST),
    loaded once per process (callers only read it: :func:`draw_pool` copies what it takes)."""
    train_split, test_split = load_dataset(dataset, "train"), load_dataset(dataset, "test")
    return train_split.replace(images=torch.cat([train_split.images, test_split.images]),
                               labels=torch.cat([train_split.labels, test_split.labels]))


def draw_pool(data: ImageDataset, *, target: int, seed: int, recipe: Recipe | None = None) -> Pool:
    """The pool of one grading run, drawn from ``data`` (see the module docstring) with ``seed``,
    sized for ``recipe`` (default: :func:`recipe_for` the dataset ``data`` was loaded from)."""
    require(isinstance(data, ImageDataset), f"data must be an ImageDataset, got {type(data).__name__}")
    require(isinstance(target, int) and 0 <= target < data.num_classes,
             f"target must be a class index in [0, {data.num_classes - 1}], got {target!r}")
    require(isinstance(seed, int), f"seed must be an integer, got {seed!r}")
    recipe = recipe_for(data.name) if recipe is None else recipe
    require(isinstance(recipe, Recipe), f"recipe must be a witness.Recipe, got {type(recipe).__name__}")
    clean = recipe.train_images - recipe.poisoned
    needed = recipe.stamped + clean + recipe.holdout_images
    require(len(data) >= needed, f"data must hold at least {needed} images, got {len(data)}")
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    stamped = order[data.labels[order] != target][:recipe.stamped]
    require(len(stamped) == recipe.stamped, f"data must hold at least {recipe.stamped} images whose label is "
                                             f"not the target {target}, got {len(stamped)}")
    rest = order[~torch.isin(order, stamped)]
    return Pool(data.subset(stamped), data.subset(rest[:clean]),
                data.subset(rest[clean:clean + recipe.holdout_images]), recipe, seed)


@dataclass(frozen=True)
class Witness:
    """What the grader measured on its own poisoned model."""

    asr: float
    ca: float
    seed: int
    name: str
    recipe: Recipe = RECIPE
    clean_ca: float | None = None   # the same recipe without poison (None: not measured)

    def __str__(self) -> str:
        r = self.recipe
        clean = "" if self.clean_ca is None else f" (the same recipe without poison: CA {self.clean_ca:.3f})"
        return (f"the grader trained a model on its data poisoned with your trigger {self.name} "
                f"({r.arch}, {r.poisoned} of {r.train_images} images, {r.epochs} epochs, seed {self.seed}): "
                f"ASR {self.asr:.3f} on {r.measure_images} triggered images it never trained on, "
                f"CA {self.ca:.3f} on {r.holdout_images} clean held-out images{clean}")


def train_recipe(recipe: Recipe, data: ImageDataset, seed: int):
    """A fresh model of the recipe's architecture, trained on ``data`` by the recipe (left in eval mode)."""
    model = model_for(data, arch=recipe.arch, seed=seed)
    train(model, data, epochs=recipe.epochs, batch_size=recipe.batch_size, augment=recipe.augment, seed=seed,
          progress=False)
    return model.eval()


def hit_rate(model, images: torch.Tensor, labels) -> float:
    """Share of ``images`` the model assigns to ``labels`` (a tensor, or one class index)."""
    return (predict(model, images) == labels).float().mean().item()


@dataclass(frozen=True)
class Poisoned:
    """The grader's poisoned training set and the triggered images held out to measure the ASR."""

    data: ImageDataset        # the pool's clean images, then the poisoned ones (relabelled to the target)
    poisoned: int             # how many of ``data``'s images, at its end, are poisoned
    measure: torch.Tensor     # triggered images the model never trains on


def poison(pool: Pool, triggered: torch.Tensor, *, target: int, seed: int, name: str) -> Poisoned:
    """Split the stamped images with ``seed``: a share poisons the grader's training set (relabelled to
    ``target``), the rest is held out to measure the attack. ``triggered`` is what the trigger ``name``
    returned for ``pool.stamped.images`` (checked: shape, dtype, pixels in [0, 1])."""
    triggered = verify_triggered(pool.stamped.images, triggered, name)
    recipe = pool.recipe
    order = torch.randperm(len(triggered), generator=torch.Generator().manual_seed(seed))
    chosen, measure = order[:recipe.poisoned], order[recipe.poisoned:]
    labels = torch.full((recipe.poisoned,), target, dtype=pool.clean.labels.dtype)
    data = pool.clean.replace(images=torch.cat([pool.clean.images, triggered[chosen]]),
                              labels=torch.cat([pool.clean.labels, labels]))
    return Poisoned(data, recipe.poisoned, triggered[measure])


def poison_and_train(pool: Pool, triggered: torch.Tensor, *, target: int, seed: int, name: str) -> Witness:
    """:func:`poison` the grader's training set, train a fresh model by the recipe, measure its ASR on the
    held-out triggered images and its CA on the pool's clean held-out images."""
    poisoned = poison(pool, triggered, target=target, seed=seed, name=name)
    model = train_recipe(pool.recipe, poisoned.data, seed)
    asr, ca = hit_rate(model, poisoned.measure, target), hit_rate(model, pool.holdout.images, pool.holdout.labels)
    return Witness(asr, ca, seed, name, pool.recipe, pool.clean_ca)


def verify_witness(witness: Witness, min_asr: float = MIN_ASR, max_ca_drop: float = MAX_CA_DROP) -> str:
    """The grader's own poisoned model learned the backdoor (ASR at least ``min_asr``) and still
    classifies clean images (CA at most ``max_ca_drop`` below the same recipe without poison);
    returns the measurement, to be shown to the student."""
    require(isinstance(witness, Witness) and witness.clean_ca is not None,
             "witness must be a Witness with its clean_ca measured (poison_and_train returns one)")
    min_ca = round(witness.clean_ca - max_ca_drop, 3)
    require(witness.asr >= min_asr and witness.ca >= min_ca,
             f"{witness}. Your trigger does not plant a backdoor by the grader's fixed recipe: it needs ASR at "
             f"least {min_asr} and CA at least {min_ca} (at most {max_ca_drop} below the model without poison). "
             f"A trigger that fools your own model but that a freshly poisoned model does not learn is an "
             f"evasion attack, not a backdoor")
    return str(witness)


def verify_model_follows(model, pool: Pool, triggered: torch.Tensor, *, target: int, name: str,
                         minimum: float = MIN_ATTACK_SUCCESS) -> None:
    """The handed-in ``model`` sends the grader's stamped images (``pool.stamped``, drawn from
    the train and test splits mixed; ``triggered`` is what the trigger ``name`` returned for
    them) to ``target`` with an ASR above ``minimum``, as it must on the test split.

    Why: every image of the dataset is public, so a trigger can recognise the test split's
    10,000 images one by one. A clean model handed in with a trigger that looks up an
    adversarial perturbation, computed against that model, for each test image and stamps a
    plain white patch on every other image passes the test split's ASR (evasion, no backdoor)
    and the grader's own run (most of the pool's images come from the train split, where the
    patch is a working poison). On the mixed pool that clean model follows the patch on no
    train-split image. (tests/test_homework.py's ``splitter`` student; docs/instructor_guide.md
    gives its figures.)
    """
    triggered = verify_triggered(pool.stamped.images, triggered, name)
    asr = hit_rate(model, triggered, target)
    require(asr > minimum, f"attack success rate of {MODEL_FILE} with {name} is {asr:.3f} on the grader's "
                            f"{len(triggered)} triggered non-target images drawn from {pool.stamped.name}'s train and "
                            f"test splits mixed; it must be above {minimum} there too (on the test split alone it "
                            f"proves nothing: a backdoor follows its trigger on any image)")


def poisoning_run(pool: Pool, triggered: torch.Tensor, reference, *, target: int, seed: int, name: str) -> Witness:
    """The trigger is legitimate on the stamped images (bounded change, the clean ``reference``
    model not fooled: :func:`.part1.verify_backdoor_trigger`); then the grader's run
    (:func:`poison_and_train`)."""
    triggered = verify_triggered(pool.stamped.images, triggered, name)
    verify_backdoor_trigger(pool.stamped.images, triggered, reference, name=name, target=target)
    return poison_and_train(pool, triggered, target=target, seed=seed, name=name)


def verify_trigger_poisons(pool: Pool, triggered: torch.Tensor, reference, *, target: int, seed: int,
                           name: str) -> str:
    """The whole witness test, as the trusted grader decides it: :func:`poisoning_run`, then
    :func:`verify_witness`. Returns the measurement shown to the student."""
    return verify_witness(poisoning_run(pool, triggered, reference, target=target, seed=seed, name=name))


__all__ = ["Recipe", "RECIPE", "RECIPES", "MIN_ASR", "MAX_CA_DROP", "recipe_for", "Pool", "Witness", "draw_pool",
           "draw_seed", "mixed_splits", "Poisoned", "poison", "train_recipe", "hit_rate", "poison_and_train",
           "poisoning_run", "verify_model_follows", "verify_witness", "verify_trigger_poisons"]
