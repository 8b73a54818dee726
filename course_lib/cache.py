"""Results cached on disk, keyed by their inputs and the code that computes them.

Many results of the course are expensive and deterministic: a defense run on a given model
(Neural Cleanse's search, a DP-SGD training), an optimized patch, a model's clean accuracy
on the test set. Computed once, they can be read back the next time a notebook asks for
them: :func:`cached` returns ``compute()``, or what it returned before for the same key.

**The key** of a result is its ``name``, a :func:`fingerprint` of every input (tensors,
models and data sets by their values; settings by their repr) and :func:`code_version`, a
hash of the source code that computes it. Edit that code, or change an input, and the key
changes: a stale result is never returned, it is computed again.

**The storage** never runs code on load (docs/DESIGN.md, "Untrusted files"): a cache file
holds plain data only (tensors, numbers, strings, bools, None, lists, tuples, dicts), written
with ``torch.save`` and read with ``torch.load(weights_only=True)``, which refuses anything
else, e.g. a pickled object planted in ``artifacts/`` to run code when a notebook opens it.
Richer values cross that boundary through :func:`to_plain` and :func:`from_plain`: a model
is stored as its ``config`` and weights and rebuilt with :func:`course_lib.models.build_model`
(as checkpoints are, :mod:`course_lib.checkpoints`); a NumPy array as a tensor; an instance
of a dataclass marked :func:`storable` (the defenses' results) as its fields.
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import os
import pickle
from importlib import import_module
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .models import build_model

#: The key that marks a dict written by :func:`to_plain` for something richer than plain data.
TAG = "__course_lib__"
SCALARS = (type(None), bool, int, float, str)
_STORABLE: dict[str, type] = {}


class CacheError(ValueError):
    """A cache file that cannot be read safely (it was not loaded)."""


def storable(cls: type) -> type:
    """Class decorator: instances of the dataclass ``cls`` may be cached, stored as their fields.

    Only marked classes are rebuilt from a cache file, so a file can never make the kit
    construct anything else.
    """
    if not dataclasses.is_dataclass(cls) or not isinstance(cls, type):
        raise TypeError(f"cls must be a dataclass, got {cls!r}")
    _STORABLE[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return cls


def fingerprint(value) -> str:
    """A short hash of ``value``'s content, for a cache key.

    Tensors and NumPy arrays count by dtype, shape and values; a model by its weights
    (``state_dict``, whose names and shapes also give its architecture); an object with a
    ``fingerprint()`` method (an :class:`~course_lib.data.ImageDataset`, a defense's
    ``Case``) by what that returns; dataclasses, dicts, lists and tuples by their items;
    anything else by its ``repr`` (settings, triggers).
    """
    digest = hashlib.sha256()
    _feed(digest, value)
    return digest.hexdigest()[:16]


def _feed(digest, value) -> None:
    """Add ``value`` to the hash ``digest``, by the rules of :func:`fingerprint`."""
    if isinstance(value, nn.Module):
        value = value.state_dict()
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, torch.Tensor):
        flat = value.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{value.dtype}{tuple(value.shape)}".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    elif callable(getattr(value, "fingerprint", None)) and not isinstance(value, type):
        digest.update(f"{type(value).__name__}:{value.fingerprint()}".encode())
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        _feed(digest, {"type": type(value).__qualname__, **vars(value)})
    elif isinstance(value, dict):
        for key, item in sorted(value.items(), key=lambda pair: str(pair[0])):
            digest.update(f"{key!r}:".encode())
            _feed(digest, item)
    elif isinstance(value, (list, tuple)):
        digest.update(f"{type(value).__name__}[{len(value)}]".encode())
        for item in value:
            _feed(digest, item)
    else:  # a repr that names a memory address ("<function f at 0x...>") differs every session: never a hit
        digest.update(repr(value).encode())


def code_version(*code) -> str:
    """A short hash of the source code of ``code``: modules (or their names), classes or functions.

    A package counts with every module in its folder (``"course_lib.defenses"``: all the
    defenses). Modules are read from their files, so an edit counts even before it is
    imported again.
    """
    digest = hashlib.sha256()
    for part in code:
        if isinstance(part, str):
            part = import_module(part)
        if inspect.ismodule(part):
            folder = hasattr(part, "__path__")
            files = sorted(Path(part.__file__).parent.glob("*.py")) if folder else [Path(part.__file__)]
            for path in files:
                digest.update(path.name.encode() + b"\0" + path.read_bytes())
        elif inspect.isclass(part) or inspect.isfunction(part) or inspect.ismethod(part):
            digest.update(inspect.getsource(part).encode())
        else:
            raise TypeError(f"code must hold modules, module names, classes or functions, got a {type(part).__name__}")
    return digest.hexdigest()[:16]


def cached(cache_dir, name: str, compute, *, inputs: dict, code: tuple = ()) -> tuple[object, bool]:
    """``compute()``, or what it returned before for the same ``name``, ``inputs`` and ``code``.

    ``inputs``: everything the result depends on, by name (see :func:`fingerprint`);
    ``code``: what computes it (modules, their names, classes, functions: :func:`code_version`). Returns ``(value, hit)``, where
    ``hit`` says whether the value came from the cache. The file is
    ``<cache_dir>/results/<name>-<key>.pt``; ``cache_dir=None`` always computes. A file is
    written through a temporary one and renamed, so an interrupted run never leaves half a
    result behind. A file that does not hold plain data raises :class:`CacheError` unread.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"name must be an identifier-like string (it names the file), got {name!r}")
    if not callable(compute):
        raise TypeError(f"compute must be callable, got {type(compute).__name__}")
    if not isinstance(inputs, dict):
        raise TypeError(f"inputs must be a dict of what the result depends on, got {type(inputs).__name__}")
    if not isinstance(code, tuple):
        raise TypeError(f"code must be a tuple of modules, module names, classes or functions, got {type(code).__name__}")
    if cache_dir is None:
        return compute(), False
    key = hashlib.sha256(f"{name}\0{fingerprint(inputs)}\0{code_version(*code)}".encode()).hexdigest()[:20]
    path = Path(cache_dir) / "results" / f"{name}-{key}.pt"
    if path.is_file():
        return load(path), True
    value = compute()
    save(value, path)
    return value, False


def save(value, path) -> Path:
    """Write ``value`` (see :func:`to_plain`) to ``path``, atomically (temporary file, then rename)."""
    path = Path(path)
    plain = to_plain(value)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.part")
    torch.save(plain, tmp)
    os.replace(tmp, path)
    return path


def load(path):
    """Read a value written by :func:`save`, without running any code from the file."""
    try:
        plain = torch.load(path, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
        reason = next((line for line in lines if "Unsupported" in line), lines[0])
        raise CacheError(f"{path}: not a cache file of plain data, refused unread ({reason[:200]}). "
                         f"Delete it to compute the result again.") from None
    return from_plain(plain, where=str(path))


def to_plain(value, where: str = "value"):
    """``value`` as plain data that ``torch.load(weights_only=True)`` reads back.

    Plain data passes as it is. A kit model becomes its ``config`` and weights (on the CPU),
    a NumPy array (or scalar) a tensor (or number), a :func:`storable` dataclass its type
    name and fields. Anything else raises a TypeError saying where in ``value`` it is.
    """
    if isinstance(value, np.generic):  # before the scalars: np.float64 is a float, but pickles as NumPy's
        return value.item()
    if type(value) in SCALARS or isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        return {TAG: "numpy", "tensor": torch.from_numpy(np.ascontiguousarray(value))}
    if isinstance(value, nn.Module):
        config = getattr(value, "config", None)
        if not isinstance(config, dict) or "arch" not in config:
            raise TypeError(f"{where}: a model must be built by course_lib.models (it needs its config) to be cached")
        state = {k: v.detach().cpu() for k, v in value.state_dict().items()}  # strides kept (see from_plain)
        return {TAG: "model", "config": config, "state": state}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        name = f"{type(value).__module__}.{type(value).__qualname__}"
        if _STORABLE.get(name) is not type(value):
            raise TypeError(f"{where}: a {type(value).__name__} is not marked @storable, so it cannot be cached")
        return {TAG: "dataclass", "type": name, "fields": {f.name: to_plain(getattr(value, f.name), f"{where}.{f.name}")
                                                          for f in dataclasses.fields(value)}}
    if isinstance(value, (list, tuple)):
        items = [to_plain(item, f"{where}[{i}]") for i, item in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, dict):
        if TAG in value:
            raise TypeError(f"{where}: the key {TAG!r} is reserved for the cache's own records")
        return {to_plain(k, f"{where} key"): to_plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    raise TypeError(f"{where}: a {type(value).__name__} cannot be cached (plain data, kit models, NumPy arrays and "
                    f"@storable dataclasses can)")


def from_plain(plain, where: str = "value"):
    """The value :func:`to_plain` turned into ``plain``: models rebuilt, dataclasses constructed."""
    if isinstance(plain, list):
        return [from_plain(item, where) for item in plain]
    if isinstance(plain, tuple):
        return tuple(from_plain(item, where) for item in plain)
    if not isinstance(plain, dict):
        return plain
    if TAG not in plain:
        return {k: from_plain(v, where) for k, v in plain.items()}
    kind = plain[TAG]
    if kind == "numpy":
        return plain["tensor"].numpy()
    if kind == "model":
        model, state = build_model(**plain["config"]), plain["state"]
        if any(_channels_last(tensor) for tensor in state.values()):
            model.to(memory_format=torch.channels_last)  # as training left it: the same kernels, the same outputs
        model.load_state_dict(state, strict=True)
        return model.eval()
    if kind == "dataclass":
        cls = _storable_class(plain["type"], where)
        return cls(**{k: from_plain(v, where) for k, v in plain["fields"].items()})
    raise CacheError(f"{where}: unknown record kind {kind!r}")


def _channels_last(tensor: torch.Tensor) -> bool:
    return (tensor.dim() == 4 and not tensor.is_contiguous()
            and tensor.is_contiguous(memory_format=torch.channels_last))


def _storable_class(name: str, where: str) -> type:
    """The :func:`storable` class called ``name``, importing its kit module if needed (kit code only)."""
    module = name.rpartition(".")[0]
    if name not in _STORABLE and module.startswith("course_lib."):
        try:
            import_module(module)
        except ImportError:
            pass
    if name not in _STORABLE:
        raise CacheError(f"{where}: names the type {name!r}, which is not a @storable kit result; refused")
    return _STORABLE[name]
