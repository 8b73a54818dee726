"""What the autograder asks of each homework notebook, and on which inputs.

The grader, not the student, chooses every input a student's function sees. For each
notebook the plan lists *calls* (function name, arguments, how many times) that
:mod:`.harvest` performs in the sandbox; :func:`write_inputs` writes the arguments' data
once per grading run, to a folder every sandbox reads but none can write. The calls of
Part 1 mirror the visible test cells (the same 64 contract images, the same poisoning
cases), plus the whole test split for the hidden checks and the grader's own poisoning
pool (:mod:`course_lib.homework.witness`: drawn from the mixed train and test splits with a seed
drawn here, once per inputs folder; the seed is no secret, since the trigger sees the
stamped images anyway: which of them poison and which measure is drawn only when the
verdict is decided, after the trigger ran); Part 2 hands the detector the planted example and the
activations of every model of the hidden graded zoo.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from .. import grading
from ..homework import witness
from ..data import load_dataset

CONTRACT_IMAGES = 64
# grade id -> the poisoning case its test cell checks (training images [start, stop), target, rate, seed)
POISON_CASES = {
    "p1-test-poison": {"start": 0, "stop": 2000, "target": 0, "rate": 0.1, "seed": 0},
    "p1-test-poison-hidden": {"start": 3000, "stop": 4500, "target": 3, "rate": 0.07, "seed": 11},
}
TARGET = 0                   # the homework's target class (the notebook's TARGET)
CALL_TIMEOUT = 60.0          # seconds for one call (one trigger on 10,000 images, one zoo model)


def _tensor(folder: Path, name: str, value: torch.Tensor) -> None:
    save_file({"value": value.contiguous()}, str(folder / f"{name}.safetensors"))


def part1_calls(dataset: str, classes) -> list[dict]:
    """Each trigger on the contract images (twice, on one object), on image 5 alone, on the
    whole test split and on the stamped images of the grader's poisoning pool;
    ``poison_dataset`` on each poisoning case (twice)."""
    calls = []
    for name in grading.TRIGGER_FUNCTIONS:
        calls += [{"id": f"{name}.contract", "function": name, "args": [{"tensor": "contract"}], "repeat": 2},
                  {"id": f"{name}.alone", "function": name, "args": [{"tensor": "alone"}]},
                  {"id": f"{name}.eval", "function": name, "args": [{"tensor": "eval"}]},
                  {"id": f"{name}.witness", "function": name, "args": [{"tensor": "witness_stamped"}]}]
    for grade_id, case in POISON_CASES.items():
        data = {"dataset": {"file": grade_id, "classes": list(classes), "name": dataset}}
        calls.append({"id": grade_id, "function": "poison_dataset", "repeat": 2,
                      "args": [data, {"grader_trigger": True}, {"value": case["target"]}, {"value": case["rate"]}],
                      "kwargs": {"seed": {"value": case["seed"]}}})
    return calls


def part2_calls(model_names) -> list[dict]:
    """``extract_activations`` on the probe model; the detector on the planted example and on
    every graded zoo model, one call each (one model's failure costs only that model)."""
    calls = [{"id": "activations", "function": "extract_activations",
              "args": [{"model": {"dataset": "fashion-mnist", "seed": 0}}, {"tensor": "probe_images"}]},
             {"id": "planted", "function": "activation_clustering",
              "args": [{"array": "planted_activations"}, {"array": "planted_labels"}]}]
    calls += [{"id": f"zoo.{name}", "function": "activation_clustering", "timeout": CALL_TIMEOUT,
               "args": [{"array": f"zoo_{name}_activations"}, {"array": f"zoo_{name}_labels"}]}
              for name in model_names]
    return calls


def write_inputs(folder: Path, files: grading.GradingFiles) -> dict:
    """Write every input of every call into ``folder``; returns {notebook id: calls}."""
    folder.mkdir(parents=True, exist_ok=True)
    test = grading.evaluation_data(files.dataset)
    _tensor(folder, "eval", test.images)
    _tensor(folder, "contract", test.images[:CONTRACT_IMAGES])
    _tensor(folder, "alone", test.images[5:6])
    seed = witness.draw_seed()
    pool = witness.draw_pool(witness.mixed_splits(files.dataset), target=TARGET, seed=seed)
    _tensor(folder, "witness_stamped", pool.stamped.images)
    (folder / "witness.json").write_text(json.dumps({"seed": seed, "target": TARGET}))
    train = load_dataset(files.dataset, "train")
    for grade_id in POISON_CASES:
        part = poison_case_data(train, grade_id)
        save_file({"images": part.images.contiguous(), "labels": part.labels.contiguous()},
                  str(folder / f"{grade_id}.safetensors"))
    _, probe = grading.activation_probe()
    _tensor(folder, "probe_images", probe)
    activations, labels, _ = grading.planted_activations()
    _tensor(folder, "planted_activations", torch.from_numpy(activations))
    _tensor(folder, "planted_labels", torch.from_numpy(labels))
    names = list(files.answer_key["models"])
    for name in names:
        activations, labels = files.activations(name)
        _tensor(folder, f"zoo_{name}_activations", torch.from_numpy(activations))
        _tensor(folder, f"zoo_{name}_labels", torch.from_numpy(labels))
    plans = {"part1_attack": part1_calls(files.dataset, test.classes), "part2_detection": part2_calls(names)}
    (folder / "plans.json").write_text(json.dumps(plans))
    return plans


def poison_case_data(train, grade_id: str):
    """The training images a poisoning case hands to ``poison_dataset``."""
    case = POISON_CASES[grade_id]
    return train.subset(range(case["start"], case["stop"]))


def witness_pool(folder: Path, dataset: str) -> witness.Pool:
    """The grader's poisoning pool of the inputs in ``folder`` (drawn again from its seed)."""
    settings = json.loads((folder / "witness.json").read_text())
    return witness.draw_pool(witness.mixed_splits(dataset), target=settings["target"], seed=settings["seed"])
