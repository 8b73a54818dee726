"""course_lib.cache: a hit returns what was computed (models with equal weights), a change of an input or
of the code misses, and a file that does not hold plain data is refused without running anything."""
import dataclasses
import importlib.util
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from course_lib import cache
from course_lib.defenses import Mitigation
from course_lib.defenses.activation_clustering import ClassSplit
from course_lib.defenses.dp_sgd import lecture_batch_noise_training, train_dp_sgd
from course_lib.models import model_for
from course_lib.train import train


def trained(data, seed=0):
    model = model_for(data, seed=seed)
    train(model, data, epochs=1, seed=seed, progress=False, device="cpu")
    return model


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa)


def test_a_hit_returns_the_values_and_models_computed(toy, tmp_path):
    model = trained(toy)
    split = ClassSplit(3, torch.arange(4), np.array([0, 1, 0, 1], dtype=np.int32), np.zeros((4, 2)), 0.5, 0.25,
                       trusted_share=(1.0, 0.0))
    calls = []

    def compute():
        calls.append(1)
        return {"row": {"f1": 0.5, "flagged": [3], "ca": np.float64(0.9)}, "split": split,
                "result": Mitigation("a paper", model, 1.5), "pair": (1, None)}

    first, hit = cache.cached(tmp_path, "demo", compute, inputs={"model": model, "data": toy, "seed": 0})
    again, hit_again = cache.cached(tmp_path, "demo", compute, inputs={"model": model, "data": toy, "seed": 0})
    assert (hit, hit_again, len(calls)) == (False, True, 1)
    assert again["row"] == {"f1": 0.5, "flagged": [3], "ca": 0.9} and again["pair"] == (1, None)
    assert isinstance(again["split"], ClassSplit) and again["split"].trusted_share == (1.0, 0.0)
    assert np.array_equal(again["split"].clusters, split.clusters) and again["split"].clusters.dtype == np.int32
    assert torch.equal(again["split"].smaller, split.smaller)
    restored = again["result"]
    assert isinstance(restored, Mitigation) and restored.model is not model and same_weights(restored.model, model)
    assert torch.equal(restored.model(toy.images[:50]), model.eval()(toy.images[:50]))   # the same predictions
    assert len(list((tmp_path / "results").glob("demo-*.pt"))) == 1


def test_dp_sgd_models_are_rebuilt_too(toy, tmp_path):
    """DP-SGD's model has GroupNorm instead of BatchNorm (Opacus): its config says so, and it is rebuilt."""
    result = lecture_batch_noise_training(toy, epochs=1, progress=False)
    private = train_dp_sgd(toy, epochs=1, batch_size=64, progress=False)
    assert private.model.config["private"] is True
    for value in (result, private):
        path = cache.save(value, tmp_path / "dp.pt")
        back = cache.load(path)
        assert type(back) is type(value) and back.epsilon == value.epsilon and same_weights(back.model, value.model)
        assert torch.equal(back.model(toy.images[:50]), value.model.eval()(toy.images[:50]))


def test_another_input_or_edited_code_misses(toy, tmp_path, monkeypatch):
    module_file = tmp_path / "h6_cache_code.py"
    module_file.write_text("def work(x):\n    return x + 1\n")
    spec = importlib.util.spec_from_file_location("h6_cache_code", module_file)
    code = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(code)
    model = trained(toy)
    calls = []

    def run(**inputs):
        return cache.cached(tmp_path, "demo", lambda: calls.append(1) or len(calls), inputs=inputs, code=(code,))

    assert run(model=model, seed=0) == (1, False)
    assert run(model=model, seed=0) == (1, True)
    assert run(model=model, seed=1) == (2, False)                  # another setting
    assert run(model=model, data=toy.subset(range(100)), seed=0) == (3, False)   # another input
    nudged = trained(toy)
    with torch.no_grad():
        next(nudged.parameters()).add_(1e-4)
    assert run(model=nudged, seed=0) == (4, False)                 # a model counts by its weights
    module_file.write_text("def work(x):\n    return x + 2\n")     # the code is edited (not even re-imported)
    assert run(model=model, seed=0) == (5, False)
    assert cache.code_version(code) != cache.code_version("course_lib.metrics")


class Payload:
    """A pickled object that would run code on load: it creates ``marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_file_that_would_run_code_is_refused_unread(toy, tmp_path):
    value, _ = cache.cached(tmp_path, "demo", lambda: {"f1": 0.5}, inputs={"seed": 0})
    [path] = (tmp_path / "results").glob("demo-*.pt")
    marker = tmp_path / "payload_ran"
    torch.save({"f1": Payload(marker)}, path)                      # a planted file, under the right name
    with pytest.raises(cache.CacheError, match="refused unread.*Delete it"):
        cache.cached(tmp_path, "demo", lambda: {"f1": 0.5}, inputs={"seed": 0})
    assert not marker.exists(), "loading the cache file ran its payload"
    with open(path, "wb") as f:                                    # a plain pickle, not torch's format
        pickle.dump(Payload(marker), f)
    with pytest.raises(cache.CacheError, match="refused unread"):
        cache.load(path)
    assert not marker.exists()
    # plain data that names a class not marked @storable is refused as well
    torch.save({cache.TAG: "dataclass", "type": "course_lib.lecture.Lab", "fields": {}}, path)
    with pytest.raises(cache.CacheError, match="not a @storable"):
        cache.load(path)


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="name"):
        cache.cached(tmp_path, "no/slash", lambda: 1, inputs={})
    with pytest.raises(TypeError, match="compute"):
        cache.cached(tmp_path, "demo", 3, inputs={})
    with pytest.raises(TypeError, match="inputs"):
        cache.cached(tmp_path, "demo", lambda: 1, inputs=[1])
    with pytest.raises(TypeError, match="code"):
        cache.cached(tmp_path, "demo", lambda: 1, inputs={}, code=[cache])
    with pytest.raises(TypeError, match="code must hold"):
        cache.code_version(3)
    with pytest.raises(TypeError, match=r"value\['x'\]: a object cannot be cached"):
        cache.to_plain({"x": object()})

    @dataclasses.dataclass
    class Unmarked:
        x: int

    with pytest.raises(TypeError, match="not marked @storable"):
        cache.to_plain(Unmarked(1))
    with pytest.raises(TypeError, match="dataclass"):
        cache.storable(int)
    assert not (tmp_path / "results").exists(), "nothing is written when the arguments are wrong"
