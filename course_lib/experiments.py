"""One-call experiments: poison, train, measure.

The lecture's pipeline (design a trigger, poison the training set, train, evaluate) is
needed by the demo, the benchmarks, the notebooks, the defenses and the model zoo.
:func:`run_backdoor` does it once, the same way everywhere, and can cache the trained
model on disk so that two notebook cells (or two notebooks) needing the same backdoored
model train it only once. The cache also keeps what the model measured on a test set (its
clean accuracy and ASR): on a laptop CPU, measuring them on 10,000 test images costs a few
seconds per model, most of a lecture re-run's time once every model is trained. That result
is cached like any other (:mod:`course_lib.cache`), keyed by the model's weights, the test
images, the trigger and the code that measures (:data:`MEASURING_CODE`).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from .attacks import PoisonResult, badnets
from .cache import cached
from .checkpoints import load_checkpoint, save_checkpoint
from .data import ImageDataset
from .metrics import attack_success_rate, clean_accuracy
from .models import model_for
from .train import History, train
from .triggers import PatchTrigger


@dataclass
class BackdoorRun:
    """A trained model with everything needed to measure it."""

    model: nn.Module
    poison: PoisonResult | None      # None for a clean model
    history: History | None          # None when the model came from the cache
    clean_acc: float
    asr: float | None                # None for a clean model without a trigger to test
    train_seconds: float | None


def default_trigger() -> PatchTrigger:
    """The kit's default BadNets trigger: a 3x3 checkerboard in the bottom-right corner."""
    return PatchTrigger(size=3, pattern="checkerboard", location="bottom-right")


def _cache_path(cache_dir, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{key['kind']}-{digest}.safetensors"


#: The code behind a measured clean accuracy or ASR: metrics, prediction, triggers.
MEASURING_CODE = ("course_lib.metrics", "course_lib.train", "course_lib.triggers")


def _measured(model: nn.Module, test_data: ImageDataset, trigger, target, cache_dir) -> tuple[float, float | None]:
    """(clean accuracy, ASR of ``trigger``; None without one) of ``model`` on ``test_data``, read from
    ``cache_dir`` when the same weights, test images, trigger and code were measured before."""
    def measure():
        asr = None if trigger is None else attack_success_rate(model, test_data, trigger, target)
        return clean_accuracy(model, test_data), asr

    values, _ = cached(cache_dir, "measured", measure, code=MEASURING_CODE,
                       inputs={"model": model, "test": test_data, "trigger": trigger, "target": target})
    return values


def _train_or_load(data: ImageDataset, key: dict, cache_dir, arch, epochs, seed, progress, device,
                   train_kwargs) -> tuple[nn.Module, History | None]:
    path = _cache_path(cache_dir, key) if cache_dir is not None else None
    if path is not None and path.exists():
        model, _ = load_checkpoint(path)
        return model, None
    model = model_for(data, arch=arch, seed=seed)
    history = train(model, data, epochs=epochs, seed=seed, progress=progress, device=device, **train_kwargs)
    if path is not None:
        save_checkpoint(model, path, dataset=data.name, classes=data.classes, extra={"key": key})
    return model, history


def run_backdoor(train_data: ImageDataset, test_data: ImageDataset, *, trigger=None, target: int = 0,
                 rate: float = 0.05, epochs: int = 2, seed: int = 0, arch: str | None = None,
                 progress: bool = True, device=None, cache_dir=None, **train_kwargs) -> BackdoorRun:
    """Poison ``train_data`` with BadNets (Gu et al. 2017), train a fresh model, measure it.

    Returns clean accuracy on ``test_data`` and ASR over its non-target images.
    With ``cache_dir``, a model trained earlier with the same settings is loaded instead.
    """
    trigger = trigger or default_trigger()
    poison = badnets(train_data, trigger=trigger, target=target, rate=rate, seed=seed)
    key = {"kind": "badnets", "dataset": train_data.name, "data": train_data.fingerprint() if cache_dir else None, "trigger": repr(trigger),
           "target": target, "rate": rate, "epochs": epochs, "seed": seed, "arch": arch, **train_kwargs}
    model, history = _train_or_load(poison.dataset, key, cache_dir, arch, epochs, seed, progress, device, train_kwargs)
    clean_acc, asr = _measured(model, test_data, trigger, target, cache_dir)
    return BackdoorRun(model, poison, history, clean_acc, asr, history.seconds if history else None)


def run_clean(train_data: ImageDataset, test_data: ImageDataset, *, epochs: int = 2, seed: int = 0,
              arch: str | None = None, progress: bool = True, device=None, cache_dir=None, trigger=None,
              target: int | None = None, **train_kwargs) -> BackdoorRun:
    """Train a model on ``train_data`` as given (unpoisoned: the baseline every attack and defense is
    compared to; or a training set some attack already poisoned), and measure its clean accuracy.

    With ``trigger`` and ``target``, the ASR of that trigger is measured too (and cached with the model).
    """
    if (trigger is None) != (target is None):
        raise ValueError("trigger and target must be given together (to measure an ASR) or not at all")
    key = {"kind": "clean", "dataset": train_data.name, "data": train_data.fingerprint() if cache_dir else None, "epochs": epochs,
           "seed": seed, "arch": arch, **train_kwargs}
    model, history = _train_or_load(train_data, key, cache_dir, arch, epochs, seed, progress, device, train_kwargs)
    clean_acc, asr = _measured(model, test_data, trigger, target, cache_dir)
    return BackdoorRun(model, None, history, clean_acc, asr, history.seconds if history else None)
