"""Saving and loading models without executing code.

A PyTorch ``.pt`` file is a pickle: loading one from a student or a model zoo with plain
``torch.load`` runs whatever code the file's author put in it. The kit therefore stores
weights as safetensors (raw tensors, nothing executable) next to a JSON sidecar that says
how to rebuild the model::

    model.safetensors   the weights (state_dict)
    model.json          {"format": ..., "config": {"arch": ..., ...}, "dataset": ..., "classes": [...], ...}

:func:`load_checkpoint` rebuilds the architecture from the sidecar with
:func:`course_lib.models.build_model` and loads the weights strictly: a checkpoint whose
tensors do not match the architecture, a corrupt file, NaN weights or a pickle renamed to
``.safetensors`` all raise :class:`CheckpointError` with a message saying what is wrong.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .models import ARCHITECTURES, build_model

FORMAT = "course_lib.checkpoint/1"
MAX_METADATA_BYTES = 1_000_000


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded safely or does not match what was expected."""


def sidecar_path(path) -> Path:
    """The JSON file that describes the safetensors file at ``path``."""
    return Path(path).with_suffix(".json")


def save_checkpoint(model: nn.Module, path, *, dataset: str, classes, extra: dict | None = None) -> Path:
    """Write ``model``'s weights to ``path`` (safetensors) and its description beside it (JSON).

    ``model`` must carry a ``config`` dict (every model from :mod:`course_lib.models` does).
    ``extra`` is any JSON-able metadata, e.g. the trigger and target of a backdoored model.
    """
    config = getattr(model, "config", None)
    if not isinstance(config, dict) or config.get("arch") not in ARCHITECTURES:
        raise ValueError("model must be built by course_lib.models (it needs a config with a known 'arch')")
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"path must end in .safetensors, got {path.name!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path))
    meta = {"format": FORMAT, "config": config, "dataset": dataset, "classes": list(classes),
            "normalization": {"mean": config.get("mean"), "std": config.get("std")},
            "extra": extra or {}}
    sidecar_path(path).write_text(json.dumps(meta, indent=2))
    return path


def read_metadata(path) -> dict:
    """The JSON sidecar of a checkpoint, validated (what is wrong with a bad one is said in
    terms of the file, never of the parser's internals)."""
    side = sidecar_path(path)
    if not side.is_file():
        raise CheckpointError(f"path: no metadata file {side.name} next to {Path(path).name}")
    if side.stat().st_size > MAX_METADATA_BYTES:
        raise CheckpointError(f"path: metadata file {side.name} is {side.stat().st_size} bytes, more than the "
                              f"{MAX_METADATA_BYTES} a model's description may take (save_checkpoint writes it)")
    try:
        meta = json.loads(side.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise CheckpointError(f"path: metadata file {side.name} is not text (UTF-8)") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"path: metadata file {side.name} is not valid JSON: {err.msg.lower()} at line "
                              f"{err.lineno}, column {err.colno}") from None
    except RecursionError:
        raise CheckpointError(f"path: metadata file {side.name} nests lists or objects too deeply to be a model's "
                              f"description (save_checkpoint writes a flat one)") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"path: {side.name} is not a course_lib checkpoint description (format {FORMAT})")
    return meta


def load_checkpoint(path, *, expected_arch: str | None = None, expected_dataset: str | None = None,
                    max_bytes: int = 200_000_000) -> tuple[nn.Module, dict]:
    """Rebuild a model from ``path`` without executing any code from the file.

    Returns ``(model, metadata)`` with the model in eval mode on the CPU, in the
    ``channels_last`` layout that :func:`course_lib.train.train` leaves a model in (the same
    kernels as the trained model, and 2-3x faster predictions on a CPU than the default layout
    with channels-last batches: ``python -m course_lib bench predict``). Raises
    :class:`CheckpointError` for a missing, oversized, corrupt, mismatching or NaN checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"path: checkpoint file {str(path)!r} does not exist")
    if path.stat().st_size > max_bytes:
        raise CheckpointError(f"path: {path.name} is {path.stat().st_size} bytes, more than max_bytes={max_bytes}")
    meta = read_metadata(path)
    config = dict(meta["config"])
    arch = config.pop("arch", None)
    if expected_arch is not None and arch != expected_arch:
        raise CheckpointError(f"expected_arch: checkpoint holds {arch!r}, expected {expected_arch!r}")
    if expected_dataset is not None and meta.get("dataset") != expected_dataset:
        raise CheckpointError(f"expected_dataset: checkpoint was trained on {meta.get('dataset')!r}, "
                              f"expected {expected_dataset!r}")
    try:
        with torch.device("meta"):  # size the described model first, without allocating it
            described = sum(t.numel() * t.element_size() for t in build_model(arch, **config).state_dict().values())
    except ValueError as err:
        raise CheckpointError(f"path: cannot rebuild architecture {arch!r} from {sidecar_path(path).name}: {err}") from err
    except TypeError:
        raise CheckpointError(f"path: the config in {sidecar_path(path).name} does not describe a {arch!r} model "
                              f"(settings: {', '.join(sorted(map(str, config)))})") from None
    if described > max_bytes:
        raise CheckpointError(f"path: {sidecar_path(path).name} describes a model of {described} bytes, "
                              f"more than max_bytes={max_bytes}")
    model = build_model(arch, **config)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"path: {path.name} is not a valid safetensors file ({err})") from err
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[0:3]
        raise CheckpointError(f"path: weights in {path.name} do not match architecture {arch!r}: "
                              f"{' '.join(first)}") from err
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"path: {path.name} holds NaN or infinite values in {bad[:3]}")
    return model.to(memory_format=torch.channels_last).eval(), meta
