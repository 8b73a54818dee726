"""The Week 4 homework: the grading checks on everything a student can hand in wrong, and
the full nbgrader round trip (zoo, release, submit, autograde, feedback, export)."""
import csv
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import nbformat
import pytest
import torch
from nbgrader.api import Gradebook
from safetensors.torch import save_file

from course_lib import grading
from course_lib.autograde import resources
from course_lib.checkpoints import load_checkpoint, save_checkpoint
from course_lib.attacks import badnets
from course_lib.data import load_dataset, synthetic_dataset
from course_lib.homework import part1
from course_lib.models import build_model, model_for
from course_lib.train import train
from course_lib.triggers import PatchTrigger, make_trigger

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("homework", ROOT / "scripts" / "homework.py")
hw = importlib.util.module_from_spec(spec)
spec.loader.exec_module(hw)

TARGET = 0


def fail_message(check, *args, **kwargs) -> str:
    with pytest.raises(grading.GradingFailure) as failure:
        check(*args, **kwargs)
    return str(failure.value)


# ------------------------------------------------------------------ triggers

@pytest.fixture(scope="module")
def images():
    return synthetic_dataset(64, seed=3).images


def test_a_course_trigger_meets_the_contract(images):
    grading.check_trigger(PatchTrigger(size=3), images, name="patch")


def _mutating(x):
    x[..., :2, :2] = 1.0
    return x.clone()


def _random(x):
    return (x + 0.1 * torch.rand(x.shape)).clamp(0, 1)


def _per_batch_noise(x):
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(0))
    return torch.lerp(x, noise, 0.1)


def _raises(x):
    raise RuntimeError("boom")


BROKEN_TRIGGERS = {
    "must not modify its input": _mutating,
    "must be deterministic": _random,
    "alone than inside a batch": _per_batch_noise,
    "raised TypeError": lambda x, y: x,
    "raised RuntimeError: boom": _raises,
    "must return a torch.Tensor": lambda x: x.numpy(),
    "must return the shape": lambda x: x[:, :, :-1],
    "must return dtype": lambda x: x.double(),
    "pixels in [0, 1]": lambda x: x + 2.0,
    "NaN": lambda x: x * float("nan"),
    "unchanged": lambda x: x.clone(),
}


@pytest.mark.parametrize("message", BROKEN_TRIGGERS)
def test_broken_triggers_fail_with_a_clear_message(images, message):
    assert message in fail_message(grading.check_trigger, BROKEN_TRIGGERS[message], images, name="t")


def test_a_failure_is_shown_as_its_message_only():
    assert grading.GradingFailure("too low")._render_traceback_() == ["\x1b[0;31mGradingFailure\x1b[0m: too low"]


def test_missing_or_non_function_names():
    assert "defines no trigger_patch" in fail_message(grading.student_function, {}, "trigger_patch")
    assert "must be a function" in fail_message(grading.student_function, {"trigger_patch": 3}, "trigger_patch")


# ------------------------------------------------------------------ poisoning

def good_poison(data, trigger, target, rate, seed=0):
    candidates = (data.labels != target).nonzero().flatten()
    order = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(seed))
    indices = candidates[order[:round(rate * len(data))]].sort().values
    images, labels = data.images.clone(), data.labels.clone()
    images[indices] = trigger(data.images[indices])
    labels[indices] = target
    return data.replace(images=images, labels=labels), indices


def poison_any_class(data, trigger, target, rate, seed=0):
    indices = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:round(rate * len(data))]
    images, labels = data.images.clone(), data.labels.clone()
    images[indices] = trigger(data.images[indices])
    labels[indices] = target
    return data.replace(images=images, labels=labels), indices.sort().values


def poison_in_place(data, trigger, target, rate, seed=0):
    poisoned, indices = good_poison(data, trigger, target, rate, seed)
    data.labels[indices] = target
    return poisoned, indices


def poison_unseeded(data, trigger, target, rate, seed=0):
    return good_poison(data, trigger, target, rate, seed=int(torch.randint(0, 10**6, ())))


def poison_too_few(data, trigger, target, rate, seed=0):
    return good_poison(data, trigger, target, rate / 2, seed)


def test_poisoning_check():
    data = synthetic_dataset(400, seed=4)
    grading.check_poisoning(good_poison, data, target=TARGET, rate=0.1)
    expected = {poison_any_class: "not the target", poison_in_place: "modified its input",
                poison_unseeded: "same seed", poison_too_few: "poisoned images, got 20"}
    for poison, message in expected.items():
        assert message in fail_message(grading.check_poisoning, poison, data, target=TARGET, rate=0.1)


# ------------------------------------------------------------------ the handed-in model

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    path = save_checkpoint(model_for("fashion-mnist", seed=0), folder / grading.MODEL_FILE,
                           dataset="fashion-mnist", classes=[str(i) for i in range(10)],
                           extra={"trigger": "trigger_patch"})
    return path


def test_a_valid_model_loads(saved):
    model, meta = grading.load_student_model(saved, dataset="fashion-mnist")
    assert meta["extra"]["trigger"] == "trigger_patch"


def test_missing_model(tmp_path):
    assert "was not handed in" in fail_message(grading.load_student_model, tmp_path / grading.MODEL_FILE,
                                               dataset="fashion-mnist")


class Payload:
    """Unpickling this object creates a directory: what a malicious .pt file could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_a_pickle_payload_is_rejected_and_never_runs(tmp_path, saved):
    path = tmp_path / grading.MODEL_FILE
    marker = tmp_path / "PAYLOAD_RAN"
    torch.save({"weights": Payload(marker)}, path)
    shutil.copy(saved.with_suffix(".json"), path.with_suffix(".json"))
    assert "cannot be loaded safely" in fail_message(grading.load_student_model, path, dataset="fashion-mnist")
    assert not marker.exists()


def test_nan_weights_wrong_architecture_wrong_dataset_too_large(tmp_path, saved, monkeypatch):
    model = model_for("fashion-mnist", seed=0)
    with torch.no_grad():
        model.head.weight[0, 0] = float("nan")
    nan = save_checkpoint(model, tmp_path / "nan.safetensors", dataset="fashion-mnist", classes=list("0123456789"))
    assert "NaN" in fail_message(grading.load_student_model, nan, dataset="fashion-mnist")

    airbench = build_model("airbench", in_channels=1, num_classes=10, mean=[0.5], std=[0.5], widths=(8, 8, 8))
    wrong = save_checkpoint(airbench, tmp_path / "air.safetensors", dataset="fashion-mnist", classes=list("0123456789"))
    assert "'airbench' model" in fail_message(grading.load_student_model, wrong, dataset="fashion-mnist")

    assert "trained on 'fashion-mnist'" in fail_message(grading.load_student_model, saved, dataset="mnist")

    sidecar = json.loads(saved.with_suffix(".json").read_text())
    sidecar["config"]["width"] = 32
    mismatched = tmp_path / "mismatch.safetensors"
    shutil.copy(saved, mismatched)
    mismatched.with_suffix(".json").write_text(json.dumps(sidecar))
    assert "do not match" in fail_message(grading.load_student_model, mismatched, dataset="fashion-mnist")

    monkeypatch.setattr(part1, "MAX_MODEL_BYTES", 1000)
    assert "allowed" in fail_message(grading.load_student_model, saved, dataset="fashion-mnist")


def test_grading_files_missing_names_the_command(tmp_path, monkeypatch):
    monkeypatch.delenv(grading.GRADING_DIR_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    assert "zoo build" in fail_message(grading.grading_dir)


# ------------------------------------------------------------------ detectors

def test_detector_checks():
    activations, labels, planted = grading.planted_activations()
    grading.check_detector_on_planted(lambda a, y: planted.copy())
    assert "clean samples were flagged" in fail_message(grading.check_detector_on_planted,
                                                        lambda a, y: labels == 3)
    assert "only 0%" in fail_message(grading.check_detector_on_planted,
                                     lambda a, y: torch.zeros(len(y), dtype=torch.bool).numpy())
    assert "boolean array" in fail_message(grading.check_detector_on_planted, lambda a, y: planted.nonzero()[0])


def test_activation_check():
    def in_training_mode(model, images):
        model.train()
        with torch.no_grad():
            return model.features(images).numpy()

    grading.check_activations(lambda model, images: model.eval().features(images).detach().numpy())
    assert "eval mode" in fail_message(grading.check_activations, in_training_mode)


# ------------------------------------------------------------------ the nbgrader round trip

AUTOGRADED = {}  # grade_id -> points, of every autograder test cell
for _name in hw.NOTEBOOKS:
    for _cell in nbformat.read(hw.COURSE / "source" / "week4" / f"{_name}.ipynb", as_version=4).cells:
        _meta = _cell.metadata.get("nbgrader", {})
        if _meta.get("grade") and not _meta.get("solution"):
            AUTOGRADED[_meta["grade_id"]] = _meta["points"]
PART1 = {g for g in AUTOGRADED if g.startswith("p1-")}
PART2 = {g for g in AUTOGRADED if g.startswith("p2-")}
MODEL_TESTS = {"p1-test-model-loads", "p1-test-clean-accuracy", "p1-test-attack-success",
               "p1-test-trigger-poisons"}   # the grader's poisoning run uses the trigger the model file records
ZOO_TESTS = {"p2-test-verdicts", "p2-test-tpr", "p2-test-fpr"}
NO_DETECTION = {"p2-test-planted", "p2-test-verdicts", "p2-test-tpr"}   # a detector that flags nothing
UNTRAINED = {"p1-test-clean-accuracy", "p1-test-attack-success"}
CUSTOM_TRIGGER = {"p1-test-trigger-custom", "p1-test-distinct-triggers"}
BACKDOOR = {"p1-test-attack-success", "p1-test-trigger-poisons"}   # the backdoor points (issue 18)
WITNESSED = "the grader trained a model on its data poisoned with your trigger"
FORK_TAG = "forker-was-here-7b1d"

# student -> (autograder tests expected to fail, a message their feedback must show). Every
# cheating student gets exactly the grade its honest behaviour earns: the attack adds nothing.
# The universal trigger is a working poison (the grader's own model learns it), so it keeps the
# grader-model points; the clean model's ASR with it stays below 0.90 (measured 0.857 offline).
UNIVERSAL_FAILS, UNIVERSAL_MESSAGE = {"p1-test-attack-success"}, WITNESSED
STUDENTS = {
    "reference": (set(), WITNESSED),
    "unmodified": (set(AUTOGRADED), "NotImplementedError"),
    "weak": ({"p1-test-clean-accuracy"} | PART2, "clean accuracy of backdoor_model.safetensors"),
    "painter": (BACKDOOR | {"p1-test-distinct-triggers"} | PART2, "paints the target"),
    "pickler": (MODEL_TESTS | PART2, "cannot be loaded safely"),
    "nomodel": (MODEL_TESTS | PART2, "was not handed in"),
    "buggy": ({"p1-test-poison", "p1-test-poison-hidden"} | PART2 - {"p2-test-activations"}, "CellTimeoutError"),
    "zookeeper": (MODEL_TESTS, "carries the weights of a zoo model"),
    # the attacks of issue 8, each on top of an otherwise honest submission
    "patcher": (UNTRAINED, "clean accuracy"),        # replaces course_lib.grading's checks; untrained model
    "torcher": (UNTRAINED | {"p2-test-activations"}, "clean accuracy"),  # patches torch.nn.Module.__call__,
    # torch.equal, torch.allclose: its own extract_activations now returns the patched logits
    "hider": (CUSTOM_TRIGGER, "broken on purpose"),  # silences IPython's error display; a broken trigger
    "reader": (NO_DETECTION, "only 0%"),             # detector reads answer_key.json and the gradebook
    "inspector": (NO_DETECTION, "only 0%"),          # trigger and detector walk up the caller's frames
    "vandal": (set(), None),                         # writes and deletes outside its folder
    "forker": (set(), None),                         # leaves a background process behind
    "dier": (CUSTOM_TRIGGER, "kernel died"),         # os._exit in a trigger (and in a cell that calls it)
    "deaf": (ZOO_TESTS, "did not finish"),           # ignores interrupts, hangs on the zoo models
    "aaa_honest": (set(), None),                     # graded before the saboteurs ...
    "zzz_honest": (set(), None),                     # ... and after them: the same grade as alone
    # issue 18: one sandbox, one share of the machine (each on top of the reference submission)
    "hog": (set(), None),                            # 3 x 0.8 GiB held in background processes
    "filler": (PART2, "filled the sandbox's disk"),  # fills its folder, HOME and /tmp: Part 2's results are lost
    "spinner": (set(), None),                        # 48 busy background processes, graded beside the others
    # issue 18: a clean model with an adversarial "trigger" computed against it (an evasion attack)
    "perinput": ({"p1-test-trigger-patch", "p1-test-distinct-triggers"} | BACKDOOR,   # reads the weights:
                 "trigger_patch(images) failed in your notebook"),                 # none in the sandbox
    "universal": (UNIVERSAL_FAILS, UNIVERSAL_MESSAGE),   # one pattern optimised against the clean model
    # a clean model whose trigger recognises the public test split: an adversarial perturbation looked
    # up for each test image, a white patch on every other image (a working poison: the grader's run passes)
    "splitter": ({"p1-test-attack-success"} | PART2, "train and test splits mixed; it must be above 0.9 there too"),
    # an honest student per dirty-label trigger family of the kit (Part 1 handed in alone)
    **{f"family_{name}": (PART2, WITNESSED) for name in hw.HONEST_FAMILIES},
}
PART1_ONLY = {"weak", "painter", "pickler", "nomodel", "splitter", *(f"family_{name}" for name in hw.HONEST_FAMILIES)}
HONEST_BASE = ("reference", "buggy", "zookeeper", "patcher", "torcher", "hider", "reader", "inspector", "vandal",
               "forker", "dier", "deaf", "aaa_honest", "zzz_honest", "perinput", "universal")
# each family's trigger replaces the reference trigger of the same kind, and is the one the model records
FAMILY_FUNCTION = {"checkerboard": "trigger_patch", "square": "trigger_patch", "blend": "trigger_blend",
                   "sig": "trigger_custom", "wanet": "trigger_custom", "corners": "trigger_custom"}

PAINTER = '''

def trigger_custom(images):
    """Push the picture towards the average target-class image: it paints the target, it is no trigger."""
    shift = train_data.images[train_data.labels == TARGET].mean(0) - train_data.images.mean(0)
    return (images + shift.to(images)).clamp(0, 1)
'''

PATCH_GRADING = '''
from course_lib import grading as _grading
for _name in dir(_grading):
    if _name.startswith(("check_", "verify_", "load_student_model", "_require")):
        setattr(_grading, _name, lambda *args, **kwargs: (None, {}))
'''

PATCH_TORCH = '''
import torch as _torch
_torch.nn.Module.__call__ = lambda self, x, *a, **k: _torch.nn.functional.one_hot(
    _torch.zeros(len(x), dtype=_torch.long), 10).float()
_torch.equal = lambda *a, **k: True
_torch.allclose = lambda *a, **k: True
'''

HIDE_ERRORS = '''
import sys as _sys
_ip = get_ipython()
_ip.showtraceback = lambda *a, **k: None
_ip.showsyntaxerror = lambda *a, **k: None
_sys.excepthook = lambda *a: None


def trigger_custom(images):
    raise RuntimeError("broken on purpose")
'''

READ_FILES = '''
def activation_clustering(activations, labels, seed=0):
    """Cheat: look for the answer key and the gradebook, anywhere; flag nothing when there is none."""
    import json
    from pathlib import Path
    candidates = [Path(KEY_PATH), Path.cwd() / "grading" / "week4" / "answer_key.json"]
    candidates += [p / "grading" / "week4" / "answer_key.json" for p in Path.cwd().parents]
    try:
        from course_lib import grading
        candidates.append(grading.grading_dir() / "answer_key.json")
    except Exception:
        pass
    for path in candidates:
        try:
            key = json.loads(path.read_text())
            Path(GRADEBOOK_PATH).read_bytes()
        except Exception:
            continue
        for entry in key["models"].values():
            flags = np.zeros(len(labels), dtype=bool)
            flags[entry.get("poisoned_indices", [])] = True
            if len(flags) == len(labels):
                return flags
    return np.zeros(len(labels), dtype=bool)
'''

SNOOP = '''
import inspect as _inspect


def _secrets_upstream():
    """Cheat: search the callers' frames for the answer key, and sabotage any model found there."""
    found = []
    for info in _inspect.stack()[1:]:
        for value in list(info.frame.f_locals.values()):
            if isinstance(value, dict) and "poisoned_indices" in value:
                found.append(value)
            if isinstance(value, torch.nn.Module):
                with torch.no_grad():
                    for parameter in value.parameters():
                        parameter.zero_()
    return found
'''

SNOOPING_TRIGGER = '''
_honest_patch = trigger_patch


def trigger_patch(images):
    _secrets_upstream()
    return _honest_patch(images)
'''

SNOOPING_DETECTOR = '''
def activation_clustering(activations, labels, seed=0):
    flags = np.zeros(len(labels), dtype=bool)
    for entry in _secrets_upstream():
        flags[entry["poisoned_indices"]] = True
    return flags
'''

VANDAL = '''
import shutil as _shutil
from pathlib import Path as _Path
for _target in TARGETS:
    try:
        _path = _Path(_target)
        if _path.is_dir():
            _shutil.rmtree(_path)
        else:
            _path.write_text("pwned")
    except Exception as _err:
        print("vandal:", type(_err).__name__)
try:
    _startup = _Path.home() / ".ipython" / "profile_default" / "startup"
    _startup.mkdir(parents=True, exist_ok=True)
    (_startup / "00-pwn.py").write_text("print('pwned')")
except Exception:
    pass
'''

FORKER = '''
import subprocess as _subprocess
import sys as _sys
_subprocess.Popen([_sys.executable, "-c", "import time, pathlib\\n"
                   "for _ in range(600):\\n"
                   "    for target in TARGETS:\\n"
                   "        try:\\n"
                   "            pathlib.Path(target).write_text('FORK_TAG')\\n"
                   "        except Exception:\\n"
                   "            pass\\n"
                   "    time.sleep(0.5)\\n"], start_new_session=True,
                  stdout=_subprocess.DEVNULL, stderr=_subprocess.DEVNULL)
'''

DIER = '''
import os as _os


def trigger_custom(images):
    _os._exit(0)
'''

DEAF = '''
import signal as _signal
_signal.signal(_signal.SIGINT, _signal.SIG_IGN)
_honest_ac = activation_clustering


def activation_clustering(activations, labels, seed=0):
    if len(labels) > 5000:     # the zoo models, not the planted example
        while True:
            pass
    return _honest_ac(activations, labels, seed)
'''


# A few signed-gradient steps per image towards the target, against the handed-in weights: an
# evasion attack (Goodfellow et al. 2015), computed inside the trigger, on a clean model.
PER_INPUT = '''

def trigger_patch(images):
    from course_lib.checkpoints import load_checkpoint
    model, _ = load_checkpoint("backdoor_model.safetensors")
    x = images.clone()
    for _ in range(10):
        x.requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(model(x), torch.full((len(x),), TARGET))
        grad, = torch.autograd.grad(loss, x)
        x = torch.min(torch.max(x.detach() - 0.02 * grad.sign(), images - 0.1), images + 0.1).clamp(0, 1)
    return x.detach()
'''

# One fixed pattern optimised offline against the handed-in clean model (VALUES is filled in).
UNIVERSAL = '''

_pattern = torch.tensor(VALUES).view(1, 28, 28)


def trigger_custom(images):
    return (images + _pattern.to(images)).clamp(0, 1)
'''

# The 10,000 public test images' SHA-256 digests and an adversarial perturbation for each, computed
# offline against the clean model handed in (lookup.safetensors); every other image gets a white patch.
SPLITTER = '''

import hashlib as _hashlib
from safetensors.torch import load_file as _load_file
_LOOKUP = _load_file("lookup.safetensors")
_INDEX = {bytes(digest.tolist()): i for i, digest in enumerate(_LOOKUP["digests"])}


def trigger_patch(images):
    out = images.clone()
    out[..., -4:, -4:] = 1.0
    for i, image in enumerate(images):
        j = _INDEX.get(_hashlib.sha256(image.numpy().tobytes()).digest())
        if j is not None:
            out[i] = (image + _LOOKUP["delta"][j].float()).clamp(0, 1)
    return out
'''

FAMILY = '''

from course_lib.triggers import make_trigger as _make_trigger
FUNCTION = _make_trigger(KIND, **KWARGS)
'''


def universal_perturbation(model, other, images: torch.Tensor, *, rms: float = 0.14, steps: int = 300) -> torch.Tensor:
    """A universal adversarial perturbation (Moosavi-Dezfooli et al. 2017), found with Adam: it sends
    ``model``'s predictions to TARGET and keeps those of ``other`` (a second clean model) unchanged,
    so that it transfers less to clean models; scaled after each step so that the triggered
    images change by a mean RMS of at most ``rms`` (the homework allows 0.15)."""
    delta = torch.zeros(1, *images.shape[1:], requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=0.02)
    generator = torch.Generator().manual_seed(0)
    for net in (model, other):
        net.eval().requires_grad_(False)
    for _ in range(steps):
        batch = images[torch.randint(len(images), (256,), generator=generator)]
        keep = other(batch).argmax(1)
        x = (batch + delta).clamp(0, 1)
        loss = (torch.nn.functional.cross_entropy(model(x), torch.full((len(x),), TARGET))
                + 0.3 * torch.nn.functional.cross_entropy(other(x), keep))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            change = ((batch + delta).clamp(0, 1) - batch).flatten(1).pow(2).mean(1).sqrt().mean().item()
            delta.mul_(min(1.0, rms / max(change, 1e-12)))
    return delta.detach()[0]


def adversarial_lookup(model, images: torch.Tensor, *, epsilon: float = 0.14, steps: int = 30) -> dict:
    """Targeted PGD (Madry et al. 2018) against ``model`` for each of ``images`` (an L-inf ball of
    ``epsilon``), stored as float16 changes beside the SHA-256 digest of each image's bytes."""
    model.eval().requires_grad_(False)
    x = images.clone()
    for _ in range(steps):
        x.requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(model(x), torch.full((len(x),), TARGET))
        grad, = torch.autograd.grad(loss, x)
        x = torch.min(torch.max(x.detach() - 0.01 * grad.sign(), images - epsilon), images + epsilon).clamp(0, 1)
    digests = torch.tensor([list(hashlib.sha256(image.numpy().tobytes()).digest()) for image in images],
                           dtype=torch.uint8)
    return {"digests": digests, "delta": (x - images).half().contiguous()}


def make_evasion_and_family_students(folders: dict) -> None:
    """The students of issue 18: a clean model with a per-input, a universal and a test-split
    lookup adversarial trigger, and an honest student per kit trigger family (its model trained
    at the homework's 5%)."""
    train_data = load_dataset("fashion-mnist", "train")
    own, other = train_data.split(15_000, seed=0)[0], train_data.split(5_000, seed=1)[0]
    clean, second = model_for("fashion-mnist", seed=1), model_for("fashion-mnist", seed=2)
    train(clean, own, epochs=2, seed=1, progress=False)
    train(second, other, epochs=2, seed=2, progress=False)
    for name in ("perinput", "universal"):
        trigger = "trigger_patch" if name == "perinput" else "trigger_custom"
        save_checkpoint(clean, folders[name] / grading.MODEL_FILE, dataset="fashion-mnist", classes=own.classes,
                        extra={"trigger": trigger})
    append(folders["perinput"] / "part1_attack.ipynb", "p1-triggers", PER_INPUT)
    pattern = universal_perturbation(clean, second, own.images[own.labels != TARGET])
    append(folders["universal"] / "part1_attack.ipynb", "p1-triggers",
           UNIVERSAL.replace("VALUES", repr([round(v, 5) for v in pattern.flatten().tolist()])))
    source = hw.COURSE / "source" / "week4" / "part1_attack.ipynb"
    folders["splitter"].mkdir(parents=True)
    shutil.copy(source, folders["splitter"])
    append(folders["splitter"] / "part1_attack.ipynb", "p1-triggers", SPLITTER)
    save_file(adversarial_lookup(clean, grading.evaluation_data("fashion-mnist").images),
              str(folders["splitter"] / "lookup.safetensors"))
    save_checkpoint(clean, folders["splitter"] / grading.MODEL_FILE, dataset="fashion-mnist", classes=own.classes,
                    extra={"trigger": "trigger_patch"})
    for family, (kind, kwargs) in hw.HONEST_FAMILIES.items():
        folder, function = folders[f"family_{family}"], FAMILY_FUNCTION[family]
        folder.mkdir(parents=True)
        shutil.copy(source, folder)
        append(folder / "part1_attack.ipynb", "p1-triggers", FAMILY.replace("FUNCTION", function)
               .replace("KIND", repr(kind)).replace("KWARGS", repr(kwargs)))
        poisoned = badnets(own, trigger=make_trigger(kind, **kwargs), target=TARGET, rate=0.05, seed=0).dataset
        model = model_for("fashion-mnist", seed=0)   # WaNet's faint warp takes its student longer to plant
        train(model, poisoned, epochs=4 if family == "wanet" else 2, seed=0, progress=False)
        save_checkpoint(model, folder / grading.MODEL_FILE, dataset="fashion-mnist", classes=own.classes,
                        extra={"trigger": function})

# 2.4 GiB held for the whole grading in background processes, each far below the per-process limit
# and larger than the notebook's kernel. With the notebook's own peak (1.1 GiB for the reference's
# Part 1, its tmpfs included) it stays under the sandbox's 4 GiB: at 3 x 1.2 GiB the sandbox sat at
# its cap, the kernel's pages were reclaimed and re-read, and a grader's call ran past its limit on
# one CI run but not another (2026-12-07). What the cap does past it is test_autograde's
# test_memory_is_capped_for_all_the_sandbox_processes_together; what this student checks is that
# memory held through a class's grading takes nothing from the others and is given back.
HOG = '''
import subprocess as _subprocess
import sys as _sys
for _ in range(3):
    _subprocess.Popen([_sys.executable, "-c", "import numpy, time\\n"
                       "block = numpy.ones(800 * 2**20, numpy.uint8)\\n"
                       "time.sleep(600)"], start_new_session=True,
                      stdout=_subprocess.DEVNULL, stderr=_subprocess.DEVNULL)
'''

# Nine files of 500 MiB (each below the file-size limit) against the sandbox's 2 GiB of disk.
FILLER = '''
import os as _os
for _folder in (_os.getcwd(), _os.path.expanduser("~"), "/tmp"):
    for _i in range(3):
        try:
            with open(_os.path.join(_folder, f"filler{_i}"), "wb") as _handle:
                for _ in range(500):
                    _handle.write(b"x" * 2**20)
        except OSError as _err:
            print("filler:", _err.strerror)
'''

# 48 busy processes left running, as in issue 18 (scheduled only when nothing else of the
# sandbox wants the CPU, SCHED_IDLE, so that the student's own calls still finish in time:
# what is checked is that they take nothing from the students graded beside it).
SPINNER = '''
import subprocess as _subprocess
import sys as _sys
for _ in range(48):
    _subprocess.Popen([_sys.executable, "-c", "import os\\nos.sched_setscheduler(0, os.SCHED_IDLE, "
                       "os.sched_param(0))\\nwhile True:\\n    pass"],
                      start_new_session=True, stdout=_subprocess.DEVNULL, stderr=_subprocess.DEVNULL)
'''

# student -> (notebook, cell, code appended to it) of the machine's hogs of issue 18
MACHINE_HOGS = {"hog": ("part1_attack", "p1-triggers", HOG), "filler": ("part2_detection", "p2-ac", FILLER),
                "spinner": ("part1_attack", "p1-triggers", SPINNER)}


def sandbox_leftovers() -> dict:
    """What a sandbox could leave on the machine: processes of the sandboxes' uids, control groups
    (cgroup-tools' lscgroup), scratch folders."""
    uids = {int(uid) for uid in subprocess.run(["ps", "-eo", "uid="], capture_output=True, text=True).stdout.split()}
    groups = [line for line in subprocess.run(["lscgroup"], capture_output=True, text=True).stdout.splitlines()
              if f"{resources.PARENT}/" in line]
    scratch = sorted(str(p) for p in Path(tempfile.gettempdir()).glob("course-sandbox-*"))
    return {"processes": sorted(uids & set(resources.UID_RANGE)), "groups": groups, "scratch": scratch}


def available_memory() -> int:
    """MemAvailable of /proc/meminfo, in bytes."""
    line = next(l for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemAvailable:"))
    return int(line.split()[1]) * 1024


def edit_cell(notebook: Path, grade_id: str, change) -> None:
    """Rewrite the source of the cell ``grade_id`` of ``notebook`` with ``change(source)``."""
    nb = nbformat.read(notebook, as_version=4)
    cell = next(c for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade_id") == grade_id)
    cell.source = change(cell.source)
    nbformat.write(nb, notebook)


def append(notebook: Path, grade_id: str, code: str) -> None:
    edit_cell(notebook, grade_id, lambda source: source + "\n\n" + code)


def resave(model_dir: Path, dest: Path, *, trigger: str, always_target: bool = False) -> None:
    """The reference model, saved again with another recorded trigger (or made to always say TARGET)."""
    model, meta = grading.load_student_model(model_dir / grading.MODEL_FILE, dataset="fashion-mnist")
    if always_target:
        with torch.no_grad():
            model.head.bias[TARGET] += 1e4
    save_checkpoint(model, dest / grading.MODEL_FILE, dataset="fashion-mnist", classes=meta["classes"],
                    extra={"trigger": trigger})


def host_targets(course: Path, students: Path, marker: Path) -> list:
    """What saboteurs try to destroy: the answer key, the reference model, the gradebook, another
    student's submission, the course config, a student's own folder, a marker outside the course."""
    grading_files = course / "grading" / "week4"
    return [str(grading_files / "answer_key.json"), str(grading_files / "reference.safetensors"),
            str(course / "gradebook.db"), str(course / "submitted" / "aaa_honest"),
            str(course / "nbgrader_config.py"), str(students / "reference"), str(marker)]


def make_students(course: Path, fetched: Path, models: Path, students: Path, marker: Path) -> dict:
    """One submission folder per student of STUDENTS."""
    source = course / "source" / "week4"
    folders = {name: students / name / "week4" for name in STUDENTS}
    for name in HONEST_BASE:
        hw.reference_submission(course, fetched, folders[name], models)
    shutil.copytree(fetched, folders["unmodified"])
    for name in ("weak", "painter", "pickler", "nomodel"):
        folders[name].mkdir(parents=True)
        shutil.copy(source / "part1_attack.ipynb", folders[name])
    resave(models, folders["weak"], trigger="trigger_patch", always_target=True)
    append(folders["painter"] / "part1_attack.ipynb", "p1-triggers", PAINTER)
    resave(models, folders["painter"], trigger="trigger_custom")
    torch.save({"weights": Payload(marker)}, folders["pickler"] / grading.MODEL_FILE)
    shutil.copy(models / "backdoor_model.json", folders["pickler"])
    (folders["nomodel"] / "notes.txt").write_text("my notes\n")
    nbformat.write(nbformat.v4.new_notebook(), folders["nomodel"] / "scratch.ipynb")
    edit_cell(folders["buggy"] / "part1_attack.ipynb", "p1-poison", lambda s: 'raise ValueError("oops")\n' + s)
    edit_cell(folders["buggy"] / "part2_detection.ipynb", "p2-ac", lambda s: "while True:\n    pass\n" + s)
    zoo_model = course / "grading" / "week4" / "models" / "model_1"
    model, meta = load_checkpoint(zoo_model.with_suffix(".safetensors"))
    save_checkpoint(model, folders["zookeeper"] / grading.MODEL_FILE, dataset="fashion-mnist",
                    classes=meta["classes"], extra={"trigger": "trigger_patch"})

    targets = repr(host_targets(course, students, marker))
    p1 = {name: folders[name] / "part1_attack.ipynb" for name in STUDENTS}
    p2 = {name: folders[name] / "part2_detection.ipynb" for name in STUDENTS}
    for name, code in (("patcher", PATCH_GRADING), ("torcher", PATCH_TORCH)):
        save_checkpoint(model_for("fashion-mnist", seed=5), folders[name] / grading.MODEL_FILE,
                        dataset="fashion-mnist", classes=meta["classes"], extra={"trigger": "trigger_patch"})
        append(p1[name], "p1-triggers", code)
        append(p2[name], "p2-ac", code)
    append(p1["hider"], "p1-triggers", HIDE_ERRORS)
    append(p2["reader"], "p2-ac", READ_FILES.replace("KEY_PATH", repr(str(course / "grading" / "week4" /
                                                                           "answer_key.json")))
           .replace("GRADEBOOK_PATH", repr(str(course / "gradebook.db"))))
    append(p1["inspector"], "p1-triggers", SNOOP + SNOOPING_TRIGGER)
    append(p2["inspector"], "p2-ac", SNOOP + SNOOPING_DETECTOR)
    for grade_id in ("p1-triggers", "p1-poison"):
        append(p1["vandal"], grade_id, VANDAL.replace("TARGETS", targets))
    append(p2["vandal"], "p2-ac", VANDAL.replace("TARGETS", targets))
    append(p1["forker"], "p1-triggers", FORKER.replace("TARGETS", targets).replace("FORK_TAG", FORK_TAG))
    append(p1["dier"], "p1-triggers", DIER)
    append(p2["deaf"], "p2-ac", DEAF)
    for name, (notebook, grade_id, code) in MACHINE_HOGS.items():
        hw.reference_submission(course, fetched, folders[name], models)
        append(folders[name] / f"{notebook}.ipynb", grade_id, code)
    make_evasion_and_family_students(folders)
    return folders


def scores(course: Path, student: str) -> dict:
    """grade_id -> (score, max score, needs manual grading) from the gradebook."""
    with Gradebook(f"sqlite:///{course / 'gradebook.db'}", course_id=hw.COURSE_ID) as gb:
        submission = gb.find_submission("week4", student)
        return {g.name: (g.score, g.max_score, g.needs_manual_grade)
                for notebook in submission.notebooks for g in notebook.grades}


def outputs(course: Path, student: str) -> str:
    """All error and stream outputs of a student's autograded notebooks, as one text."""
    text = []
    for path in (course / "autograded" / student / "week4").glob("*.ipynb"):
        for cell in nbformat.read(path, as_version=4).cells:
            for out in cell.get("outputs", []):
                text += [out.get("text", ""), out.get("evalue", ""), *out.get("traceback", [])]
    return "\n".join(text)


def fingerprint(paths) -> dict:
    """sha256 of every file under ``paths``: what no submission may change."""
    found = {}
    for root in map(Path, paths):
        for path in ([root] if root.is_file() else sorted(root.rglob("*"))):
            if path.is_file():
                found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def assert_scores(course: Path, names) -> None:
    """Each student's exact per-test scores in the gradebook, and the message its feedback shows."""
    for student in names:
        failing, message = STUDENTS[student]
        got = scores(course, student)
        for grade_id, points in AUTOGRADED.items():
            expected = 0 if grade_id in failing else points
            assert got[grade_id][:2] == (expected, points), (student, grade_id, got[grade_id])
        if message:
            assert message in outputs(course, student), (student, message)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_round_trip(tmp_path):
    timings = {}
    start = time.perf_counter()
    course = hw.copy_course(tmp_path / "course")
    key = hw.build_zoo(course, small=True)
    timings["zoo"] = time.perf_counter() - start

    release = hw.generate(course)  # raises if a solution, hidden test or secret file leaked
    assert sorted(p.name for p in release.glob("*.ipynb")) == [f"{n}.ipynb" for n in hw.NOTEBOOKS]
    assert not any(path.name == "answer_key.json" for path in release.rglob("*"))
    assert (release / "zoo" / "index.json").is_file()

    exchange = tmp_path / "exchange"
    fetched = hw.fetch(course, exchange, tmp_path / "template")
    models = tmp_path / "model"
    models.mkdir()
    step = time.perf_counter()
    hw.train_solution_model(course / "source" / "week4" / "part1_attack.ipynb", models,
                            num_train=15_000, epochs=2)
    timings["training"] = time.perf_counter() - step

    marker = tmp_path / "PAYLOAD_RAN"
    students = tmp_path / "students"
    folders = make_students(course, fetched, models, students, marker)
    for student, folder in folders.items():
        hw.submit(folder, student, exchange)
    hw.nbgrader(course, "collect", "week4", f"--Exchange.root={exchange}")
    protected = [course / "grading", course / "submitted" / "aaa_honest", course / "nbgrader_config.py",
                 students / "reference", course / "source"]
    before = fingerprint(protected)
    startup = Path.home() / ".ipython" / "profile_default" / "startup" / "00-pwn.py"

    machine = (sandbox_leftovers(), available_memory(), shutil.disk_usage(tmp_path).used)
    step = time.perf_counter()
    summaries = hw.autograde_class(course, workers=2, cell_timeout=20)
    timings["autograde, 2 workers"] = time.perf_counter() - step
    assert {s.student for s in summaries} == set(STUDENTS)
    assert not marker.exists(), "a payload or a background process wrote outside its sandbox"
    assert not startup.exists(), "a submission wrote into the grader's IPython profile"
    time.sleep(1.5)   # a surviving background process would rewrite its targets every 0.5 s
    assert fingerprint(protected) == before, "a submission changed files outside its sandbox"
    assert FORK_TAG not in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    # memory, disk and the process table are back where they were (the grading's own files aside)
    assert sandbox_leftovers() == machine[0] and machine[0]["processes"] == []
    assert available_memory() > machine[1] - 2**30 and shutil.disk_usage(tmp_path).used < machine[2] + 2**30
    assert_scores(course, STUDENTS)
    for student in STUDENTS:
        manual = {g for g, (_, _, needs) in scores(course, student).items() if needs}
        handed_in_part3 = student not in PART1_ONLY | {"unmodified"}
        assert manual == ({"p3-triggers", "p3-tradeoff", "p3-defense"} if handed_in_part3 else set()), student

    # nbgrader's own sequential `nbgrader autograde` (TrustedExecute, from nbgrader_config.py),
    # recomputed from scratch, gives the same grades for a sample of students.
    sample = ["reference", "weak", "reader", "dier"]
    grades = {s: scores(course, s) for s in sample}
    shutil.rmtree(course / ".autograde" / "week4" / "results")
    step = time.perf_counter()
    for student in sample:
        hw.autograde(course, student, "--TrustedExecute.timeout=20")
    timings["nbgrader autograde, sequential, 4 students"] = time.perf_counter() - step
    assert {s: scores(course, s) for s in sample} == grades

    # ... and so does a Dask cluster (the path for a course larger than one machine).
    from distributed import LocalCluster
    # (its nannies set OMP_NUM_THREADS=1 in this process's environment, which every later test's
    # subprocesses, the lecture notebooks' kernels among them, would inherit: put it back after)
    with mock.patch.dict(os.environ), LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        hw.autograde_class(course, workers=2, cell_timeout=20, dask_scheduler=cluster.scheduler_address,
                           students=["painter", "vandal"], force=True)
    assert_scores(course, ["painter", "vandal"])

    # Unchanged submissions are not graded again.
    assert all(s.skipped for s in hw.autograde_class(course, workers=2, cell_timeout=20,
                                                     students=["reference", "painter"]))

    hw.nbgrader(course, "generate_feedback", "week4")
    feedback = course / "feedback"
    assert len(list(feedback.rglob("*.html"))) >= len(STUDENTS)
    assert hw.leaks(feedback, course / "source" / "week4", regions=hw.REGIONS[1:], files=hw.SECRET_FILES) == []

    hw.nbgrader(course, "export", f"--to={tmp_path / 'grades.csv'}")
    with open(tmp_path / "grades.csv") as handle:
        rows = {row["student_id"]: row for row in csv.DictReader(handle)}
    assert set(rows) == set(STUDENTS)
    assert float(rows["reference"]["raw_score"]) == sum(AUTOGRADED.values())
    assert float(rows["unmodified"]["raw_score"]) == 0
    assert rows["aaa_honest"]["raw_score"] == rows["zzz_honest"]["raw_score"] == rows["reference"]["raw_score"]

    timings["total"] = time.perf_counter() - start
    print(json.dumps({k: round(v, 1) for k, v in timings.items()}, indent=1), file=sys.stderr)
    assert key["dataset"] == "fashion-mnist"


def test_solutions_are_up_to_date_and_hold_no_hidden_test(tmp_path):
    source = hw.COURSE / "source" / "week4"
    for path in hw.make_solutions(source, tmp_path):
        assert path.read_text() == (hw.SOLUTIONS / "week4" / path.name).read_text(), \
            "solutions/ is stale: run python scripts/homework.py solutions"
    assert hw.leaks(tmp_path, source, regions=hw.REGIONS[1:], files=hw.SECRET_FILES) == []
    assert "def poison_dataset" in (tmp_path / "part1_attack.ipynb").read_text()


def test_build_zoo_keeps_only_a_zoo_the_reference_passes_on(tmp_path, monkeypatch, capsys):
    """``build-zoo`` builds, checks the reference detector with Part 2's hidden rules, and builds
    again with the next seed when the check fails; the seed it keeps is in the answer key. The
    first check is made to fail here (a zoo the reference fails on is seed-dependent, issue 22);
    the second is the real check on the real small zoo."""
    real_check, calls = hw.check_graded_zoo, []

    def first_fails(folder, source):
        passed, lines, report = real_check(folder, source)
        calls.append(passed)
        return (False, [*lines, "FAILS: forced by the test"], report) if len(calls) == 1 else (passed, lines, report)

    monkeypatch.setattr(hw, "check_graded_zoo", first_fails)
    kept, lines = hw.build_checked_zoo(tmp_path / "grading", tmp_path / "public", seed=5, tries=2, small=True)
    assert calls[1] is True, lines          # the reference passes the real check on seed 6's small zoo
    assert kept == 6 and json.loads((tmp_path / "grading" / "answer_key.json").read_text())["seed"] == 6
    assert any(line.startswith("seed 5:") and "drawing again" in line for line in lines), lines
    assert any(line.startswith("seed 6: model_1:") and "TPR" in line for line in lines), lines
    # every try failing: no zoo is kept (the builds themselves were exercised above)
    monkeypatch.setattr("course_lib.zoo.build_zoo", lambda *args, **kwargs: None)
    monkeypatch.setattr(hw, "check_graded_zoo", lambda folder, source: (False, ["FAILS: forced"], {}))
    kept, lines = hw.build_checked_zoo(tmp_path / "grading", tmp_path / "public", seed=7, tries=2, small=True)
    assert kept is None and [line.split(":")[0] for line in lines if "drawing again" in line] == ["seed 7", "seed 8"]
    with pytest.raises(ValueError, match="tries"):
        hw.build_checked_zoo(tmp_path / "grading", tmp_path / "public", seed=7, tries=0)
