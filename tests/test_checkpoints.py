import json
import pickle

import pytest
import torch

from course_lib.checkpoints import CheckpointError, load_checkpoint, save_checkpoint, sidecar_path
from course_lib.models import model_for


@pytest.fixture
def saved(tmp_path, toy):
    model = model_for(toy, width=8)
    path = save_checkpoint(model, tmp_path / "m.safetensors", dataset="synthetic", classes=toy.classes,
                           extra={"target": 3})
    return model, path


def test_round_trip(saved, toy):
    model, path = saved
    loaded, meta = load_checkpoint(path, expected_arch="small_cnn")
    assert meta["extra"] == {"target": 3} and meta["classes"] == list(toy.classes)
    x = toy.images[:4]
    assert torch.allclose(loaded(x), model.eval()(x))
    conv = [m for m in loaded.modules() if isinstance(m, torch.nn.Conv2d)][-1]   # in_channels > 1
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)   # the layout training leaves


def test_wrong_architecture(saved):
    _, path = saved
    with pytest.raises(CheckpointError, match="expected_arch"):
        load_checkpoint(path, expected_arch="resnet18")
    meta = json.loads(sidecar_path(path).read_text())
    meta["config"]["width"] = 16  # the weights were saved for width 8
    sidecar_path(path).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="do not match"):
        load_checkpoint(path)


def test_corrupt_and_missing_files(saved, tmp_path):
    _, path = saved
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.safetensors")
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="not a valid safetensors"):
        load_checkpoint(path)
    sidecar_path(path).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(path)


class _Payload:
    def __reduce__(self):
        import pathlib
        return (pathlib.Path.touch, (pathlib.Path(self.target),))


def test_pickle_payload_is_never_executed(saved, tmp_path):
    _, path = saved
    payload = _Payload()
    payload.target = str(tmp_path / "pwned")
    path.write_bytes(pickle.dumps({"w": payload}))
    with pytest.raises(CheckpointError, match="not a valid safetensors"):
        load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


def test_nan_weights_and_size_limit(saved):
    model, path = saved
    with torch.no_grad():
        model.head.weight[0, 0] = float("nan")
    save_checkpoint(model, path, dataset="synthetic", classes=[f"c{i}" for i in range(10)])
    with pytest.raises(CheckpointError, match="NaN"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="max_bytes"):
        load_checkpoint(path, max_bytes=10)


def test_a_sidecar_describing_a_huge_model_is_refused_before_it_is_built(saved):
    _, path = saved
    meta = json.loads(sidecar_path(path).read_text())
    meta["config"]["width"] = 100_000  # about 3.6 TB of weights: building it would exhaust memory
    sidecar_path(path).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="describes a model of"):
        load_checkpoint(path)
