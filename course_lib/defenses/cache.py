"""Defense results cached on disk, keyed by everything they depend on, the code included.

A defense is deterministic for a given model, data, settings and code: the detection matrix,
run twice, reproduced every figure to its rounding (README.md, "The detection matrix"). So a
lecture that reruns notebook 6 with its models already trained need not rerun Neural
Cleanse's search or DP-SGD's training: :func:`cached` stores what a computation returned
under a key and returns it the next time the same key is asked for.

The key (:func:`digest`) holds a fingerprint of every input (model weights, images, labels,
poisoned indices, trigger, settings) and :func:`code_version`, a hash of the source files
that compute a result (``course_lib/defenses/*.py`` and the training, model, metric and data
modules they call). Editing any of them changes every key, so a stale result is never
returned; it is simply computed again.

The files are pickles (``torch.save`` of rows and result objects, which hold models), so
load only a cache this kit wrote on this machine; never point ``cache_dir`` at files from
elsewhere (docs/DESIGN.md, "Untrusted files": students' and zoo checkpoints go through
safetensors instead).
"""
from __future__ import annotations

import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

#: The modules whose code decides a defense's result, besides the defenses themselves.
CODE = ("train.py", "models.py", "metrics.py", "data.py", "attacks.py")


@lru_cache(maxsize=1)
def code_version() -> str:
    """A short hash of the sources of ``course_lib/defenses`` and of the modules in :data:`CODE`."""
    package = Path(__file__).resolve().parents[1]
    files = sorted(Path(__file__).parent.glob("*.py")) + [package / name for name in CODE]
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def model_fingerprint(model: nn.Module) -> str:
    """A short hash of a model's parameters and buffers (its architecture is in their names and shapes)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def tensor_fingerprint(tensor: torch.Tensor) -> str:
    """A short hash of a tensor's values (e.g. the poisoned indices)."""
    return hashlib.sha256(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def digest(key: dict) -> str:
    """The file name stem for ``key`` (a JSON-able dict), the code's version included."""
    text = json.dumps({**key, "code": code_version()}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def cached(cache_dir, name: str, key: dict, compute):
    """``compute()``, or what it returned before for the same ``name``, ``key`` and code.

    Returns ``(value, hit)``; ``hit`` says whether the value came from the cache.
    ``cache_dir=None`` always computes. Writes go through a temporary file, so an
    interrupted run never leaves half a result behind.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"name must be an identifier-like string (it names the file), got {name!r}")
    if not isinstance(key, dict):
        raise TypeError(f"key must be a dict of the inputs the result depends on, got {type(key).__name__}")
    if not callable(compute):
        raise TypeError(f"compute must be callable, got {type(compute).__name__}")
    if cache_dir is None:
        return compute(), False
    path = Path(cache_dir) / "defenses" / f"{name}-{digest(key)}.pt"
    if path.exists():
        return torch.load(path, weights_only=False), True  # written by this function (see the module docstring)
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.part")
    torch.save(value, tmp)
    os.replace(tmp, path)
    return value, False
