"""The homework's model zoo, built on small synthetic data: layout, secrecy, determinism."""
import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file

from course_lib import zoo
from course_lib.data import synthetic_dataset
from course_lib.defenses.activations import extract_features


@pytest.fixture(scope="module")
def data():
    train = synthetic_dataset(600, seed=1)
    test = synthetic_dataset(300, seed=2)
    return train, test


def build(tmp_path, data, seed=0, name="zoo"):
    out = tmp_path / name
    key = zoo.build_zoo(out, small=True, seed=seed, data=data, progress=False)
    return out, key


@pytest.fixture(scope="module")
def built(tmp_path_factory, data):
    return build(tmp_path_factory.mktemp("zoo"), data)


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_layout_and_answer_key(built):
    out, key = built
    assert (out / "answer_key.json").is_file() and (out / "reference.safetensors").is_file()
    assert json.loads((out / "answer_key.json").read_text()) == key
    recipes = sorted(entry["recipe"] for entry in key["models"].values())
    assert recipes == sorted(recipe.label for recipe in zoo.SMALL_RECIPES)
    for name, entry in key["models"].items():
        assert (out / "public" / f"{name}.safetensors").is_file()
        assert (out / "activations" / f"{name}.safetensors").is_file()
        if entry["backdoored"]:
            assert entry["num_poisoned"] == len(entry["poisoned_indices"]) > 0
            assert 0 <= entry["target"] < 10


def test_public_folder_holds_no_answer(built):
    out, key = built
    public = out / "public"
    assert not (public / "answer_key.json").exists() and not (public / "reference.safetensors").exists()
    index = json.loads((public / "index.json").read_text())
    assert [m["name"] for m in index["models"]] == sorted(key["models"])
    for name in key["models"]:
        sidecar = json.loads((public / f"{name}.json").read_text())
        assert sidecar["extra"] == {}
        text = json.dumps(sidecar) + json.dumps(index["models"])
        assert "target" not in text and "poison" not in text and "badnets" not in text


def test_load_zoo_gives_models_and_their_training_sets(built):
    out, key = built
    models = zoo.load_zoo(out / "public")
    assert [m.name for m in models] == sorted(key["models"])
    for entry in models:
        stored = load_file(str(out / "activations" / f"{entry.name}.safetensors"))
        assert torch.equal(stored["labels"], entry.data.labels)
        assert torch.allclose(stored["activations"], extract_features(entry.model, entry.data.images, progress=False),
                              atol=1e-5)
        poisoned = key["models"][entry.name].get("poisoned_indices", [])
        if key["models"][entry.name]["attack"] == "badnets":
            assert (entry.data.labels[poisoned] == key["models"][entry.name]["target"]).all()


def test_practice_model_comes_with_its_answer(built):
    out, _ = built
    practice = zoo.load_practice(out / "public")
    assert practice.poisoned is not None and len(practice.poisoned) == round(zoo.PRACTICE.rate * len(practice.data))
    assert (practice.data.labels[practice.poisoned] == practice.target).all()


def test_same_seed_same_zoo(tmp_path, data, built):
    out, key = built
    again, key_again = build(tmp_path, data, seed=0, name="again")
    key.pop("seconds"), key_again.pop("seconds")
    assert key_again == key
    for name in key["models"]:
        assert digest(again / "public" / f"{name}-train.safetensors") == digest(out / "public" / f"{name}-train.safetensors")


def test_the_seed_decides_who_is_who():
    plans = [zoo.plan_zoo(seed=seed) for seed in range(5)]
    assert plans[0] == zoo.plan_zoo(seed=0)
    assert [p.name for p in plans[0]] == ["reference", "practice"] + [f"model_{i + 1}" for i in range(len(zoo.DEFAULT_RECIPES))]
    orders = {tuple((p.recipe.label, p.target) for p in plan[2:]) for plan in plans}
    assert len(orders) == 5


def test_bad_arguments(tmp_path, data):
    with pytest.raises(ValueError, match="dataset"):
        zoo.build_zoo(tmp_path, dataset="imagenet")
    with pytest.raises(ValueError, match="seed"):
        zoo.plan_zoo(seed=-1)
    with pytest.raises(ValueError, match="public"):
        zoo.build_zoo(tmp_path, public=tmp_path, data=data)
    with pytest.raises(FileNotFoundError, match="zoo build"):
        zoo.load_zoo(tmp_path / "missing")
