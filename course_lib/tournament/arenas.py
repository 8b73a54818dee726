"""Arenas: one poisoned training set and its freshly trained model per attack, built by the grader.

Every attack of the tournament meets the detectors on the same footing, the grader's own
poisoning run (:mod:`course_lib.homework.witness`, BadNets done by the grader, Gu et al. 2017): a pool
of images drawn with the tournament seed, the attack's trigger applied to its stamped images
(a student's in the grading sandbox, a house family here), a share of them relabelled to the
target and mixed into clean training images, a fresh small CNN trained by the fixed
:data:`course_lib.homework.witness.RECIPE`. What the arena keeps is what the detectors and the scores
need: the training set (its order shuffled, so that no position gives a poisoned sample
away), the model, its penultimate activations, its clean accuracy (CA) and attack success
rate (ASR), the trigger's stealth (PSNR, SSIM) and the **ground truth**: which samples are
poisoned. The ground truth stays in the grader's process and on its disk; a detector is
handed the activations and the labels only.

**House attacks** (:data:`HOUSE_ATTACKS`) are the kit's trigger families, each with a stated
recipe: the trigger's strength and the share of the arena poisoned. A family enters only if
its arena passes the grader's bars, like a student's; the recipes were chosen so that each
does (docs/tournament.md, "House attacks", gives the measurements). The house clean-label
arena follows Turner et al. 2019 (:func:`course_lib.attacks.label_consistent`): target-class
images made hard on a surrogate model, stamped, labels kept.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..attacks import label_consistent
from ..checkpoints import load_checkpoint, save_checkpoint
from ..data import ImageDataset
from ..defenses.activations import extract_features
from ..homework import witness
from ..metrics import stealth_summary
from ..train import predict
from ..triggers import BlendTrigger, DistributedTrigger, PatchTrigger, SIGTrigger, Trigger, WaNetTrigger

# The house families' strengths (docs/tournament.md, "House attacks", has the measurements). At the detection
# matrix's (blend alpha 0.1, SIG delta 0.08, WaNet strength 0.5) their arenas reach ASR 0.77, 0.65 and 0.11 at 5%
# and the grader's 2 epochs, below its 0.80 bar; these are the faintest measured that clear it on tournament seeds
# 0, 1 (and 2 for WaNet), at the tournament's own 5%.
BLEND_ALPHA = 0.15
SIG_DELTA = 0.12
WANET_STRENGTH = 3.0


@dataclass(frozen=True)
class HouseAttack:
    """A house family's recipe: its trigger (``make`` builds it; ``words`` says it on the page) and the
    share of the arena's training set it poisons (None: the tournament's rate, as a student's)."""

    family: str
    make: Callable[[], Trigger]
    words: str
    rate: float | None = None


HOUSE_ATTACKS = {a.family: a for a in (
    HouseAttack("checkerboard", lambda: PatchTrigger(size=3, pattern="checkerboard"),
                "3x3 checkerboard patch, bottom right"),
    HouseAttack("blend", lambda: BlendTrigger(alpha=BLEND_ALPHA), f"uniform noise blended at alpha {BLEND_ALPHA}"),
    HouseAttack("sig", lambda: SIGTrigger(delta=SIG_DELTA), f"horizontal sine wave, amplitude {SIG_DELTA}, 6 periods"),
    HouseAttack("wanet", lambda: WaNetTrigger(strength=WANET_STRENGTH),
                f"WaNet warp, 4x4 control grid, strength {WANET_STRENGTH}"),
    HouseAttack("corners", lambda: DistributedTrigger(), "four 3x3 patches, one per corner"),
    HouseAttack("clean_label", lambda: PatchTrigger(size=5, pattern="checkerboard"),
                "label-consistent: 5x5 checkerboard on half the target images, made hard by PGD (eps 64/255), "
                "labels kept"),
)}
HOUSE_FAMILIES = tuple(HOUSE_ATTACKS)
CLEAN_LABEL_SHARE = 0.5        # share of the target-class training images the clean-label attack poisons
# its PGD budget on the surrogate: the detection matrix's 32/255 reaches ASR 0.751 on tournament seed 0 (below the
# bar); 64/255 reaches 0.854 and 0.924 on seeds 0 and 1 (docs/tournament.md, "House attacks")
CLEAN_LABEL_EPS = 64 / 255
STEALTH_IMAGES = 200           # triggered images PSNR and SSIM are averaged over
KEPT_MEASURE_IMAGES = 300      # triggered held-out images kept for the model-level defenses


@dataclass
class Arena:
    """One attack's arena. ``truth`` (a boolean mask over ``data``) never leaves the grader."""

    name: str                   # "house:checkerboard" or "student:<id>"
    data: ImageDataset          # the poisoned training set, shuffled
    truth: torch.Tensor         # which samples of ``data`` are poisoned
    model: torch.nn.Module
    features: torch.Tensor      # model.features of ``data`` (N, D)
    ca: float
    asr: float
    stealth: dict               # {"psnr": ..., "ssim": ...}
    example: torch.Tensor       # (2, C, H, W): one clean image and the same image triggered
    measure: torch.Tensor       # triggered held-out images (model-level defenses)
    info: dict = field(default_factory=dict)   # seed, recipe, target, poisoned count

    @property
    def kind(self) -> str:
        return self.name.split(":", 1)[0]


def _check_pool(pool) -> None:
    if not isinstance(pool, witness.Pool):
        raise TypeError(f"pool must be a witness.Pool, got {type(pool).__name__}")


def _finish(name: str, pool: witness.Pool, images, labels, truth, triggered, measured, *, target: int,
            seed: int) -> Arena:
    """Shuffle the training set, train the recipe's model on it, measure CA and ASR (on ``measured``, the
    triggered images held out), keep the rest. ``triggered`` is the trigger on every stamped image."""
    recipe = pool.recipe
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed + 1))
    data = pool.clean.replace(images=images[order], labels=labels[order])
    truth = truth[order]
    model = witness.train_recipe(recipe, data, seed)
    asr = (predict(model, measured) == target).float().mean().item()
    ca = (predict(model, pool.holdout.images) == pool.holdout.labels).float().mean().item()
    clean = pool.stamped.images[:STEALTH_IMAGES]
    stealth = {k: round(v, 3) for k, v in stealth_summary(clean, triggered[:STEALTH_IMAGES]).items()}
    info = {"seed": seed, "target": target, "poisoned": int(truth.sum()), "train_images": len(data),
            "recipe": {k: getattr(recipe, k) for k in ("arch", "train_images", "rate", "epochs", "batch_size")}}
    return Arena(name, data, truth, model, extract_features(model, data.images, progress=False), ca, asr, stealth,
                 torch.stack([pool.stamped.images[0], triggered[0]]),
                 measured[:KEPT_MEASURE_IMAGES].clone(), info)


def dirty_label_arena(name: str, pool: witness.Pool, triggered: torch.Tensor, *, target: int, seed: int) -> Arena:
    """The grader's poisoning run (:func:`course_lib.homework.witness.poison`) with ``triggered``, what a
    trigger returned for ``pool.stamped.images``, keeping the model and the ground truth."""
    _check_pool(pool)
    poisoned = witness.poison(pool, triggered, target=target, seed=seed, name=name)
    truth = torch.arange(len(poisoned.data)) >= len(poisoned.data) - poisoned.poisoned
    return _finish(name, pool, poisoned.data.images, poisoned.data.labels, truth, triggered, poisoned.measure,
                   target=target, seed=seed)


def clean_label_arena(pool: witness.Pool, *, target: int, seed: int) -> Arena:
    """Turner et al.'s label-consistent attack with a 5x5 checkerboard, on the recipe's training set:
    the pool's clean images plus as many of its unstamped non-target images, target images made
    hard by PGD on a surrogate trained by the same recipe, stamped, labels kept."""
    _check_pool(pool)
    recipe, trigger = pool.recipe, HOUSE_ATTACKS["clean_label"].make()
    order = torch.randperm(len(pool.stamped), generator=torch.Generator().manual_seed(seed))
    filler, measure = order[:recipe.poisoned], order[recipe.poisoned:]
    base = pool.clean.replace(images=torch.cat([pool.clean.images, pool.stamped.images[filler]]),
                              labels=torch.cat([pool.clean.labels, pool.stamped.labels[filler]]))
    surrogate = witness.train_recipe(recipe, base, seed + 2)
    poison = label_consistent(base, trigger=trigger, target=target, rate=CLEAN_LABEL_SHARE, surrogate=surrogate,
                              eps=CLEAN_LABEL_EPS, seed=seed, progress=False)
    truth = torch.zeros(len(base), dtype=torch.bool)
    truth[poison.indices] = True
    triggered = trigger(pool.stamped.images)
    return _finish("house:clean_label", pool, poison.dataset.images, poison.dataset.labels, truth, triggered,
                   triggered[measure], target=target, seed=seed)


def house_arena(family: str, pool: witness.Pool, *, target: int, seed: int) -> Arena:
    """The arena of one of the kit's trigger families (:data:`HOUSE_ATTACKS`), on a ``pool`` drawn for
    the family's rate."""
    if family not in HOUSE_ATTACKS:
        raise ValueError(f"family must be one of {HOUSE_FAMILIES}, got {family!r}")
    if family == "clean_label":
        arena = clean_label_arena(pool, target=target, seed=seed)
    else:
        arena = dirty_label_arena(f"house:{family}", pool, HOUSE_ATTACKS[family].make()(pool.stamped.images),
                                  target=target, seed=seed)
    arena.info["trigger"] = HOUSE_ATTACKS[family].words
    return arena


# ---------------------------------------------------------------- storage (plain data only)

def save(arena: Arena, folder: Path) -> None:
    """Write ``arena`` to ``folder``: tensors as safetensors, the model as a checkpoint, the rest as JSON."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"images": arena.data.images.contiguous(), "labels": arena.data.labels.contiguous(),
               "truth": arena.truth.contiguous(), "features": arena.features.contiguous(),
               "example": arena.example.contiguous(), "measure": arena.measure.contiguous()},
              str(folder / "arena.safetensors"))
    save_checkpoint(arena.model, folder / "model.safetensors", dataset=arena.data.name, classes=arena.data.classes)
    (folder / "arena.json").write_text(json.dumps({"name": arena.name, "ca": arena.ca, "asr": arena.asr,
                                                   "stealth": arena.stealth, "info": arena.info}))


def load_features(folder: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(features, labels, truth) of the arena in ``folder``, without its images or model: what a
    detector's cell needs (a detector that meets hundreds of arenas loads a few MB of each, not all)."""
    with safe_open(str(Path(folder) / "arena.safetensors"), framework="pt") as handle:
        return handle.get_tensor("features"), handle.get_tensor("labels"), handle.get_tensor("truth")


def load(folder: Path) -> Arena:
    """An arena written by :func:`save` (no code is executed: safetensors and JSON)."""
    folder = Path(folder)
    meta = json.loads((folder / "arena.json").read_text())
    tensors = load_file(str(folder / "arena.safetensors"))
    model, ckpt = load_checkpoint(folder / "model.safetensors")
    model.eval()
    data = ImageDataset(tensors["images"], tensors["labels"], tuple(ckpt["classes"]), ckpt["dataset"])
    return Arena(meta["name"], data, tensors["truth"], model, tensors["features"], meta["ca"], meta["asr"],
                 meta["stealth"], tensors["example"], tensors["measure"], meta["info"])
