import pytest
import torch

from course_lib.data import synthetic_dataset
from course_lib.models import build_model, model_for
from course_lib.train import History, evaluate, inference_batch, pick_device, predict, predict_logits, train


@pytest.mark.parametrize("arch,channels,size", [("small_cnn", 1, 28), ("resnet18", 3, 32), ("airbench", 3, 32)])
def test_models_share_one_interface(arch, channels, size):
    model = build_model(arch, in_channels=channels, num_classes=10, mean=[0.5] * channels, std=[0.25] * channels)
    x = torch.rand(2, channels, size, size)
    feats = model.features(x)
    assert feats.ndim == 2 and feats.shape[1] == model.head.in_features
    assert model(x).shape == (2, 10)
    assert model.channel_mask.mask.numel() > 0
    assert model.config["arch"] == arch


def test_model_normalizes_its_own_input():
    model = build_model("small_cnn", in_channels=1, num_classes=10, mean=[0.3], std=[0.2])
    x = torch.full((1, 1, 28, 28), 0.3)
    assert torch.allclose(model.normalize(x), torch.zeros_like(x))


def test_bad_model_arguments():
    with pytest.raises(ValueError, match="arch"):
        build_model("vgg", in_channels=1, num_classes=10, mean=[0.5], std=[0.5])
    with pytest.raises(ValueError, match="in_channels"):
        build_model("small_cnn", in_channels=2, num_classes=10, mean=[0.5] * 2, std=[0.5] * 2)
    with pytest.raises(ValueError, match="mean and std"):
        build_model("small_cnn", in_channels=1, num_classes=10, mean=[0.5, 0.5], std=[0.5])


def test_training_learns_and_is_reproducible():
    data = synthetic_dataset(400, seed=1)
    test = synthetic_dataset(200, seed=2)
    runs = []
    for _ in range(2):
        model = model_for(data, seed=0, width=8)
        history = train(model, data, epochs=2, batch_size=64, seed=5, progress=False, eval_data=test)
        runs.append((model, history))
    (m1, h1), (m2, h2) = runs
    assert isinstance(h1, History) and len(h1.loss) == 2 and h1.loss[1] < h1.loss[0]
    assert evaluate(m1, test) > 0.9
    assert h1.test_accuracy[-1] == pytest.approx(evaluate(m1, test))
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p1, p2)


def test_training_with_augmentation_runs_and_does_not_touch_data():
    data = synthetic_dataset(128, seed=1)
    before = data.images.clone()
    model = model_for(data, width=8)
    train(model, data, epochs=1, batch_size=32, augment="flip+crop", progress=False)
    assert torch.equal(before, data.images)
    with pytest.raises(ValueError, match="augment"):
        train(model, data, epochs=1, augment="rotate", progress=False)


def test_bad_training_arguments(toy):
    model = model_for(toy, width=8)
    with pytest.raises(ValueError, match="epochs"):
        train(model, toy, epochs=0, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        train(model, toy, batch_size=0, progress=False)
    with pytest.raises(TypeError, match="data"):
        train(model, toy.images, progress=False)
    with pytest.raises(ValueError, match="device"):
        pick_device("tpu:0")


def test_predict_restores_mode(toy):
    model = model_for(toy, width=8).train()
    logits = predict_logits(model, toy.images[:10])
    assert logits.shape == (10, 10) and model.training
    assert torch.equal(predict(model, toy.images[:10]), logits.argmax(1))
    with pytest.raises(ValueError, match="images"):
        predict(model, toy.images[0])


def test_prediction_batches_depend_on_the_device_and_not_the_result(toy):
    model = model_for(toy, width=8)
    assert inference_batch(torch.device("cpu")) == 128 and inference_batch(torch.device("cuda")) == 1024
    assert inference_batch(torch.device("cpu"), 7) == 7 and inference_batch("cpu") == 128
    with pytest.raises(ValueError, match="device"):
        inference_batch("tpu:0")
    assert torch.allclose(predict_logits(model, toy.images, batch_size=7), predict_logits(model, toy.images),
                          atol=1e-5)
    for bad in (0, -3, 2.5, True, "128"):
        with pytest.raises(ValueError, match="batch_size"):
            predict(model, toy.images[:4], batch_size=bad)
