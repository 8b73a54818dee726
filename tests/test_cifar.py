"""The CIFAR-10 setting end to end, on a miniature CIFAR-10 that the test writes in the format
of the official ``cifar-10-python.tar.gz`` (course_lib.data.write_synthetic_cifar10: pickled
batches of 3x32x32 stripe images, read with COURSE_DATA_TRUST=1 since they cannot match the
published checksums): the demo, lecture notebook 1 (DATASET="cifar10" injected after its
parameters cell, as tests/test_notebooks.py injects its folders) and Part 1's grading, the
grader's poisoning run included. Tiny scale: it proves the plumbing (shapes, channels,
figures, messages) on 3-channel 32x32 data, not the accuracies of real CIFAR-10.

The kit's default CIFAR-10 model, ResNet-18, is too slow for this even at that scale on a
shared CPU (one step on 100 images took 66 s under load): the demo and Part 1 train the kit's
other CIFAR-10 network, airbench (ARCH), which a handed-in model may also be. Notebook 1 trains
four models on at least 600 images (its smallest rate, 0.1%, must poison one): airbench too
would take minutes, so it trains the kit's small CNN, sized for 32x32 (NOTEBOOK_ARCH).
"""
from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import matplotlib.image
import nbformat
import pytest
import torch

from course_lib import data, demo, grading, models
from course_lib.homework import files, witness
from course_lib.checkpoints import save_checkpoint
from course_lib.models import model_for

ROOT = Path(__file__).resolve().parents[1]
ARCH = "airbench"
NOTEBOOK_ARCH = "small_cnn"
TINY_RECIPE = witness.Recipe(arch="airbench", train_images=100, epochs=1, batch_size=25, augment="flip",
                             measure_images=50, holdout_images=50)


@pytest.fixture
def cifar_home(tmp_path, monkeypatch):
    """COURSE_DATA holding a miniature cifar-10-python.tar.gz; the kit's cache and every
    per-process cache of loaded data emptied before and after."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))      # a notebook kernel's kit cache
    monkeypatch.setattr(data, "CACHE_DIR", tmp_path / "xdg" / "course_lib")
    monkeypatch.setenv(data.TRUST_ENV, "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setenv("COURSE_DATA", str(tmp_path / "data"))
    files._test_split.cache_clear()
    witness.mixed_splits.cache_clear()
    yield tmp_path / "data"
    files._test_split.cache_clear()
    witness.mixed_splits.cache_clear()


def colourful(png) -> bool:
    """A figure with pixels whose red and green differ: colour images were drawn as colour."""
    image = matplotlib.image.imread(png)
    return bool((abs(image[..., 0] - image[..., 1]) > 0.05).any())


def test_demo_on_cifar10_from_a_local_tarball(cifar_home, tmp_path, capsys, monkeypatch):
    data.write_synthetic_cifar10(cifar_home, train=100, test=50, tarball=True)
    monkeypatch.setitem(models.DEFAULT_ARCH, "cifar10", ARCH)
    row = demo.main(["--dataset", "cifar10", "--out", str(tmp_path / "demo"), "--epochs", "1"])
    assert row["dataset"] == "cifar10" and row["poisoned_images"] == 5 and row["target"] == "0 (airplane)"
    assert 0 <= row["clean_acc"] <= 1 and 0 <= row["asr"] <= 1
    figures = sorted((tmp_path / "demo").glob("*.png"))
    assert [p.name for p in figures] == ["poisoned_samples.png", "training_curves.png", "trigger_gallery.png"]
    assert colourful(tmp_path / "demo" / "trigger_gallery.png")
    assert "| dataset | cifar10 |" in capsys.readouterr().out
    extracted = list(data.CACHE_DIR.glob("local/*/cifar-10-batches-py/test_batch"))
    assert len(extracted) == 1                                    # the tarball was extracted once, into the cache


def test_notebook_1_on_cifar10(cifar_home, tmp_path):
    """Notebook 1 with DATASET="cifar10": four models (clean and three rates) trained on 600 images."""
    from nbclient import NotebookClient
    from test_notebooks import exercise_cells, text_of, with_reference_answers

    data.write_synthetic_cifar10(cifar_home, train=601, test=50)
    path = ROOT / "notebooks" / "01_introduction.ipynb"
    nb = with_reference_answers(nbformat.read(path, as_version=4), path.stem)
    where = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    results = tmp_path / "results"
    injected = nbformat.v4.new_code_cell(f'DATASET = "cifar10"\nRESULTS_DIR = "{results}"\n'
                                         f'CACHE_DIR = "{tmp_path / "models"}"\n'
                                         f'from course_lib import models\nmodels.DEFAULT_ARCH["cifar10"] = "{NOTEBOOK_ARCH}"')
    injected.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(where + 1, injected)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    record = json.loads((results / "01_introduction.json").read_text())
    assert record["dataset"] == "cifar10" and record["n_train"] == 600 and record["n_test"] == 50
    assert {"clean_acc", "clean_model_asr", "rates"} <= set(record["results"])
    shown = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "cifar10: training on 600 of 601 images" in shown
    assert "0.1% of 600 training images = 1 images" in shown and "1% = 6 images -> ASR" in shown
    grids = [c for c in nb.cells if c.cell_type == "code" and ("plots.image_grid" in c.source
                                                              or "plots.poisoned_samples" in c.source)]
    pngs = [base64.b64decode(o["data"]["image/png"]) for c in grids for o in c.outputs if "image/png" in o.get("data", {})]
    assert 3 <= len(grids) <= len(pngs) and all(colourful(io.BytesIO(png)) for png in pngs)   # images drawn in colour
    for name, at in exercise_cells(nb):   # the reference answers pass (whether a wrong answer is told apart
        assert f"✔ {name}: right." in text_of(nb.cells[at]), name   # depends on the data: not on this tiny run)


def _part1_functions() -> dict:
    """The reference solution's triggers and poison_dataset, defined in a namespace as the notebook does."""
    nb = nbformat.read(ROOT / "solutions" / "week4" / "part1_attack.ipynb", as_version=4)
    namespace = {"torch": torch}    # what the notebook's setup cell imports
    for cell in nb.cells:
        if cell.cell_type == "code" and ("def trigger_" in cell.source or "def poison_dataset" in cell.source):
            exec(cell.source, namespace)
    return namespace


def test_part1_grading_on_cifar10_with_the_graders_run(cifar_home, tmp_path, monkeypatch):
    data.write_synthetic_cifar10(cifar_home, train=250, test=60)
    train_data, test_data = data.load_splits("cifar10")
    assert train_data.image_shape == test_data.image_shape == (3, 32, 32)
    student = _part1_functions()
    for name in grading.TRIGGER_FUNCTIONS:
        grading.check_trigger(student[name], test_data.images[:64], name=name)       # the contract, in colour
    grading.check_poisoning(student["poison_dataset"], train_data.subset(range(200)), target=0, rate=0.1)

    path = tmp_path / grading.MODEL_FILE     # untrained: these checks read it, the grader's run trains its own
    model = model_for("cifar10", arch=ARCH, seed=0)
    save_checkpoint(model, path, dataset="cifar10", classes=train_data.classes, extra={"trigger": "trigger_patch"})
    loaded, meta = grading.load_student_model(path, dataset="cifar10")
    assert meta["extra"]["trigger"] == "trigger_patch"
    with pytest.raises(grading.GradingFailure, match=f"clean accuracy of {grading.MODEL_FILE} on the 60 cifar10 test"):
        grading.verify_clean_accuracy(loaded, grading.evaluation_data("cifar10"), minimum=1.0)   # the message, measured

    wrong = tmp_path / "fmnist.safetensors"
    save_checkpoint(model_for("fashion-mnist"), wrong, dataset="fashion-mnist",
                    classes=data.DATASETS["fashion-mnist"].classes, extra={"trigger": "trigger_patch"})
    with pytest.raises(grading.GradingFailure, match="cannot be loaded safely.*fashion-mnist"):
        grading.load_student_model(wrong, dataset="cifar10")

    monkeypatch.setitem(witness.RECIPES, "cifar10", TINY_RECIPE)    # the grader's run, at a tiny scale
    try:
        message = grading.check_trigger_poisons(student, path, dataset="cifar10", target=0, seed=1)
    except grading.GradingFailure as failure:
        message = str(failure)
    assert "the grader trained a model on its data poisoned with your trigger trigger_patch (airbench, 20 of 100" in message
    assert "on 50 triggered images it never trained on" in message and "the same recipe without poison: CA" in message
