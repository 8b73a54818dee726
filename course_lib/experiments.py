"""One-call experiments: poison, train, measure.

The lecture's pipeline (design a trigger, poison the training set, train, evaluate) is
needed by the demo, the benchmarks, the notebooks, the defenses and the model zoo.
:func:`run_backdoor` does it once, the same way everywhere, and can cache the trained
model on disk so that two notebook cells (or two notebooks) needing the same backdoored
model train it only once. The cache also keeps what the model measured on a test set (its
clean accuracy and ASR): on a laptop CPU, measuring them on 10,000 test images costs a few
seconds per model, most of a lecture re-run's time once every model is trained. That record
is keyed by the test images and by the code that measures (:func:`code_version`).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from torch import nn

from .attacks import PoisonResult, badnets
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


@lru_cache(maxsize=1)
def code_version() -> str:
    """A short hash of the code behind a measured clean accuracy or ASR (metrics, prediction, triggers)."""
    package = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in [package / "metrics.py", package / "train.py", *sorted((package / "triggers").glob("*.py"))]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _measured(path: Path | None, test_data: ImageDataset, measure, what: str) -> list[float]:
    """``measure()`` for the cached model at ``path`` on ``test_data``, read from a record beside it when
    the same test images and code measured it before (``what`` names the measurement)."""
    if path is None:
        return measure()
    record = path.with_name(f"{path.stem}.{what}-{test_data.fingerprint()}-{code_version()}.json")
    if record.exists():
        return json.loads(record.read_text())
    values = measure()
    tmp = record.with_suffix(f".{os.getpid()}.part")
    tmp.write_text(json.dumps(values))
    os.replace(tmp, record)
    return values


def _train_or_load(data: ImageDataset, key: dict, cache_dir, arch, epochs, seed, progress, device,
                   train_kwargs) -> tuple[nn.Module, History | None, Path | None]:
    path = _cache_path(cache_dir, key) if cache_dir is not None else None
    if path is not None and path.exists():
        model, _ = load_checkpoint(path)
        return model, None, path
    model = model_for(data, arch=arch, seed=seed)
    history = train(model, data, epochs=epochs, seed=seed, progress=progress, device=device, **train_kwargs)
    if path is not None:
        save_checkpoint(model, path, dataset=data.name, classes=data.classes, extra={"key": key})
    return model, history, path


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
    model, history, path = _train_or_load(poison.dataset, key, cache_dir, arch, epochs, seed, progress, device,
                                          train_kwargs)
    clean_acc, asr = _measured(path, test_data, lambda: [clean_accuracy(model, test_data),
                                                         attack_success_rate(model, test_data, trigger, target)], "ca-asr")
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
    model, history, path = _train_or_load(train_data, key, cache_dir, arch, epochs, seed, progress, device,
                                          train_kwargs)
    if trigger is None:
        [clean_acc], asr = _measured(path, test_data, lambda: [clean_accuracy(model, test_data)], "ca"), None
    else:
        clean_acc, asr = _measured(path, test_data, lambda: [clean_accuracy(model, test_data),
                                                             attack_success_rate(model, test_data, trigger, target)],
                                   f"ca-asr-{hashlib.sha256(f'{trigger!r}{target}'.encode()).hexdigest()[:8]}")
    return BackdoorRun(model, None, history, clean_acc, asr, history.seconds if history else None)
