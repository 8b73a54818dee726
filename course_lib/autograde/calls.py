"""Inside the student's kernel: call one of the notebook's functions and save what it returns.

:func:`perform` is the only code the autograder runs in the student's kernel, one call at a
time (see :mod:`.harvest`). It builds the arguments the grader chose (tensors from files,
datasets, a fresh model, the grader's own trigger), calls the function, and writes the
return value as tensors to the file ``out`` that the harvest named for this call. A call with ``"repeat": 2`` calls
the function twice on the very same argument objects: if the first call modified its input,
the second sees the damage, which is how the grader tells, from data alone, that a function
works on a copy.

This code runs next to the student's, so the student can change what it does; that is
fine, because nothing it writes is believed: the harvest signs only what a call left in its
file by the time the call returned, and the grader checks the data itself.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file


def build_argument(spec: dict, inputs: Path):
    """One argument of a call, as the grader described it in the plan."""
    kind, value = next(iter(spec.items()))
    if kind == "value":
        return value
    if kind == "tensor":
        return load_file(str(inputs / f"{value}.safetensors"))["value"]
    if kind == "array":
        return load_file(str(inputs / f"{value}.safetensors"))["value"].numpy()
    if kind == "dataset":
        from course_lib.data import ImageDataset
        tensors = load_file(str(inputs / f"{value['file']}.safetensors"))
        return ImageDataset(tensors["images"], tensors["labels"], tuple(value["classes"]), value["name"])
    if kind == "grader_trigger":
        from course_lib.grading import grader_trigger
        return grader_trigger
    if kind == "model":
        from course_lib.models import model_for
        return model_for(value["dataset"], seed=value["seed"])
    raise ValueError(f"unknown argument kind {kind!r}")


def as_tensors(result, prefix: str) -> dict:
    """A return value as named CPU tensors: tensors, arrays, datasets and tuples of them."""
    if isinstance(result, torch.Tensor):
        return {prefix: result.detach().cpu().contiguous().clone()}
    if isinstance(result, np.ndarray) and result.dtype != object:
        return {prefix: torch.from_numpy(np.ascontiguousarray(result).copy())}
    if hasattr(result, "images") and hasattr(result, "labels"):
        return {**as_tensors(result.images, f"{prefix}.images"), **as_tensors(result.labels, f"{prefix}.labels")}
    if isinstance(result, (tuple, list)) and not isinstance(result, str):
        tensors = {}
        for i, item in enumerate(result):
            tensors.update(as_tensors(item, f"{prefix}.{i}"))
        tensors[f"{prefix}.length"] = torch.tensor(len(result))
        return tensors
    raise TypeError(f"returned a {type(result).__name__}, which the autograder cannot read "
                    f"(expected a tensor, an array, a dataset or a tuple of them)")


def perform(namespace: dict, call: str, inputs: str, out: str) -> None:
    """Perform one call of the plan (a JSON string) with the notebook's ``namespace``; save what
    it returns to the file ``out``."""
    call = json.loads(call)
    function = namespace.get(call["function"])
    if not callable(function):
        raise NameError(f"the notebook defines no function {call['function']}")
    args = [build_argument(spec, Path(inputs)) for spec in call.get("args", [])]
    kwargs = {key: build_argument(spec, Path(inputs)) for key, spec in call.get("kwargs", {}).items()}
    tensors = {}
    for k in range(call.get("repeat", 1)):
        tensors.update(as_tensors(function(*args, **kwargs), f"call{k}"))
    save_file(tensors, str(out))
