"""The homework's model zoo, built on small synthetic data: layout, secrecy, fingerprints, determinism."""
import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file

from course_lib import zoo
from course_lib.checkpoints import load_checkpoint
from course_lib.data import synthetic_dataset
from course_lib.defenses.activations import extract_features
from course_lib.models import model_for
from course_lib.train import train


@pytest.fixture(scope="module")
def data():
    train = synthetic_dataset(600, seed=1)
    test = synthetic_dataset(300, seed=2)
    return train, test


def build(tmp_path, data, seed=0, name="zoo", **kwargs):
    out = tmp_path / name
    key = zoo.build_zoo(out, small=True, seed=seed, data=data, progress=False, **kwargs)
    return out, key


@pytest.fixture(scope="module")
def built(tmp_path_factory, data):
    return build(tmp_path_factory.mktemp("zoo"), data)


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def weights(path):
    return zoo._parameters(load_checkpoint(path)[0])


def test_layout_and_answer_key(built):
    out, key = built
    assert (out / "answer_key.json").is_file() and (out / "reference.safetensors").is_file()
    assert json.loads((out / "answer_key.json").read_text()) == key
    assert key["homework_target"] == 0
    assert sorted(e["recipe"] for e in key["models"].values()) == sorted(r.label for r in zoo.SMALL_RECIPES)
    assert sorted(e["recipe"] for e in key["exercises"].values()) == sorted(r.label for r in zoo.SMALL_EXERCISES)
    for name in [*key["models"], *key["exercises"], "practice"]:
        assert (out / "models" / f"{name}.safetensors").is_file() and (out / "models" / f"{name}.json").is_file()
    for name, entry in key["models"].items():
        stored = load_file(str(out / "activations" / f"{name}.safetensors"))
        model, _ = load_checkpoint(out / "models" / f"{name}.safetensors")
        assert stored["activations"].dtype == torch.float32 and stored["labels"].dtype == torch.int64
        assert stored["activations"].shape == (len(stored["labels"]), model.head.in_features)
        if entry["backdoored"]:
            assert entry["num_poisoned"] == len(entry["poisoned_indices"]) > 0
        if entry["attack"] == "badnets":
            assert (stored["labels"][entry["poisoned_indices"]] == entry["target"]).all()


def test_public_folder_holds_no_graded_model_and_no_answer(built):
    out, key = built
    public = out / "public"
    names = sorted(path.name for path in public.iterdir())
    exercises = sorted(key["exercises"])
    assert names == sorted(["index.json"] + [f"{n}{suffix}" for n in exercises + ["practice"]
                                             for suffix in (".safetensors", ".json", "-train.safetensors")])
    index = json.loads((public / "index.json").read_text())
    assert [m["name"] for m in index["models"]] == exercises
    for name in exercises:
        sidecar = json.loads((public / f"{name}.json").read_text())
        assert sidecar["extra"] == {}
        text = json.dumps(sidecar) + json.dumps(index["models"])
        assert "target" not in text and "poison" not in text and "badnets" not in text


def test_exercise_models_are_not_the_graded_ones(built):
    out, key = built
    for exercise in key["exercises"]:
        public = weights(out / "public" / f"{exercise}.safetensors")
        for graded in key["models"]:
            hidden = out / "models" / f"{graded}.safetensors"
            assert zoo.relative_distance(public, weights(hidden)) > 1.5 * zoo.FINGERPRINT_THRESHOLD
            assert digest(out / "public" / f"{exercise}.safetensors") != digest(hidden)


def test_no_zoo_backdoor_aims_at_the_homework_target(data, tmp_path):
    for target in (0, 3):
        plan = zoo.plan_zoo(seed=1, homework_target=target)
        assert {p.target for p in plan}.isdisjoint({target}) and len({p.target for p in plan}) > 3
    _, key = build(tmp_path, data, seed=4, homework_target=5)
    entries = [*key["models"].values(), *key["exercises"].values(), key["practice"]]
    assert key["homework_target"] == 5 and all(e["target"] != 5 for e in entries if e["backdoored"])


def test_load_zoo_gives_the_exercise_models_and_their_training_sets(built):
    out, key = built
    models = zoo.load_zoo(out / "public")
    assert [m.name for m in models] == sorted(key["exercises"])
    for entry in models:
        answer = key["exercises"][entry.name]
        assert torch.equal(zoo._parameters(entry.model)["head.weight"],
                           weights(out / "models" / f"{entry.name}.safetensors")["head.weight"])
        assert extract_features(entry.model, entry.data.images, progress=False).shape[0] == len(entry.data)
        if answer["attack"] == "badnets":
            assert (entry.data.labels[answer["poisoned_indices"]] == answer["target"]).all()


def test_practice_model_comes_with_its_answer(built):
    out, key = built
    practice = zoo.load_practice(out / "public")
    assert practice.poisoned is not None and len(practice.poisoned) == round(zoo.PRACTICE.rate * len(practice.data))
    assert (practice.data.labels[practice.poisoned] == practice.target).all()
    assert practice.target == key["practice"]["target"] != key["homework_target"]


def test_known_zoo_model_finds_copies(built):
    out, key = built
    for name in [next(iter(key["models"])), next(iter(key["exercises"])), "practice"]:
        model, _ = load_checkpoint(out / "models" / f"{name}.safetensors")
        assert zoo.known_zoo_model(model, out) == name
    reference, _ = load_checkpoint(out / "reference.safetensors")
    assert zoo.known_zoo_model(reference, out) == "reference"
    graded = next(iter(key["models"]))
    noisy, _ = load_checkpoint(out / "models" / f"{graded}.safetensors")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in noisy.parameters():  # 1% relative noise, well inside the threshold
            parameter += 0.01 * parameter.norm() / parameter.numel() ** 0.5 * torch.randn(parameter.shape,
                                                                                           generator=generator)
    assert 0 < zoo.relative_distance(zoo._parameters(noisy), weights(out / "models" / f"{graded}.safetensors")) < 0.02
    assert zoo.known_zoo_model(noisy, out) == graded


def test_known_zoo_model_finds_a_model_trained_on_from_a_zoo_model(built, data):
    out, key = built
    exercise = next(iter(key["exercises"]))
    model, _ = load_checkpoint(out / "models" / f"{exercise}.safetensors")
    train(model, data[0], epochs=1, seed=5, progress=False)
    distance = zoo.relative_distance(zoo._parameters(model.cpu()), weights(out / "models" / f"{exercise}.safetensors"))
    assert 0.01 < distance < zoo.FINGERPRINT_THRESHOLD
    assert zoo.known_zoo_model(model, out) == exercise


def test_known_zoo_model_passes_an_independently_trained_model(built, data):
    out, _ = built
    model = model_for(data[0], seed=0)
    train(model, data[0], epochs=2, seed=0, progress=False)
    model = model.cpu()
    for path in (out / "models").glob("*.safetensors"):
        assert zoo.relative_distance(zoo._parameters(model), weights(path)) > 1.5 * zoo.FINGERPRINT_THRESHOLD
    assert zoo.known_zoo_model(model, out) is None
    other_architecture = model_for(data[0], arch="resnet18", seed=0)
    assert zoo.known_zoo_model(other_architecture, out) is None


def test_same_seed_same_zoo(tmp_path, data, built):
    out, key = built
    again, key_again = build(tmp_path, data, seed=0, name="again")
    key, key_again = dict(key), dict(key_again)
    key.pop("seconds"), key_again.pop("seconds")
    assert key_again == key
    for path in (out / "public").iterdir():
        assert digest(again / "public" / path.name) == digest(path)


def test_the_seed_decides_who_is_who():
    plans = [zoo.plan_zoo(seed=seed) for seed in range(5)]
    assert plans[0] == zoo.plan_zoo(seed=0)
    count = len(zoo.DEFAULT_RECIPES)
    assert [p.name for p in plans[0]] == (["reference", "practice"] + [f"model_{i + 1}" for i in range(count)]
                                          + [f"exercise_{i + 1}" for i in range(count)])
    assert len({tuple((p.recipe.label, p.target) for p in plan[2:]) for plan in plans}) == 5
    seeds = [(p.subset_seed, p.model_seed) for p in plans[0]]
    assert len(set(seeds)) == len(seeds) and min(min(s) for s in seeds) > 0


def test_bad_arguments(tmp_path, data, built):
    with pytest.raises(ValueError, match="dataset"):
        zoo.build_zoo(tmp_path, dataset="imagenet")
    with pytest.raises(ValueError, match="seed"):
        zoo.plan_zoo(seed=-1)
    for target in (10, -1, True, 1.0):
        with pytest.raises(ValueError, match="homework_target"):
            zoo.plan_zoo(homework_target=target)
    with pytest.raises(ValueError, match="num_classes"):
        zoo.plan_zoo(num_classes=1)
    with pytest.raises(ValueError, match="public"):
        zoo.build_zoo(tmp_path, public=tmp_path, data=data)
    with pytest.raises(ValueError, match="public"):
        zoo.build_zoo(tmp_path / "zoo" / "grading", public=tmp_path / "zoo", data=data)
    with pytest.raises(FileNotFoundError, match="zoo build"):
        zoo.load_zoo(tmp_path / "missing")
    out, _ = built
    model, _ = load_checkpoint(out / "reference.safetensors")
    with pytest.raises(TypeError, match="model"):
        zoo.known_zoo_model("reference.safetensors", out)
    for threshold in (0, 1.5, "0.05"):
        with pytest.raises(ValueError, match="threshold"):
            zoo.known_zoo_model(model, out, threshold=threshold)
    with pytest.raises(FileNotFoundError, match="folder"):
        zoo.known_zoo_model(model, out / "public")
    with pytest.raises(TypeError, match="weights"):
        zoo.relative_distance(model, {})
