"""The transferability tests of notebook 4 (course_lib.persistence) on a real backdoored model."""
import pytest
import torch

from course_lib import persistence
from course_lib.experiments import default_trigger, run_backdoor


@pytest.fixture(scope="module")
def backdoored(fmnist):
    train, test = fmnist
    run = run_backdoor(train.subset(range(6000)), test.subset(range(2000)), trigger=default_trigger(),
                       target=0, rate=0.1, epochs=2, seed=0, progress=False)
    assert run.asr > 0.9, "the fixture's backdoor must take for the tests below to mean anything"
    return run, train, test.subset(range(2000))


def _weights(model):
    return [m.weight for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]


def test_compression_changes_a_copy_as_it_says(backdoored):
    run, _, _ = backdoored
    before = [w.detach().clone() for w in _weights(run.model)]
    pruned = persistence.magnitude_pruned(run.model, 0.5)   # a freshly trained model is channels_last
    zeros = sum((w == 0).sum().item() for w in _weights(pruned)) / sum(w.numel() for w in _weights(pruned))
    assert 0.49 <= zeros <= 0.51
    rounded = persistence.quantized_8bit(run.model)
    assert all(torch.unique(w).numel() <= 255 for w in _weights(rounded))
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(run.model))), "the model passed in changed"


def test_survival_table_measures_every_change(backdoored):
    run, train, test = backdoored
    table = persistence.survival_table(run.model, train.subset(range(50_000, 51_000)), test, default_trigger(),
                                       0, jpeg_images=500)
    assert list(table) == ["as trained", "fine-tuned on 1,000 clean images", "weights rounded to 8 bits",
                           "50% of weights pruned", "JPEG-compressed triggered inputs"]
    assert table["as trained"]["asr"] == pytest.approx(run.asr)
    assert table["JPEG-compressed triggered inputs"]["clean_acc"] is None
    assert all(0 <= row["asr"] <= 1 for row in table.values())
    # rounding to 8 bits changes a trained model's predictions on very few images
    assert abs(table["weights rounded to 8 bits"]["clean_acc"] - table["as trained"]["clean_acc"]) < 0.02


def test_bad_arguments_are_named(backdoored):
    run, _, _ = backdoored
    with pytest.raises(ValueError, match="amount"):
        persistence.magnitude_pruned(run.model, 1.5)
    with pytest.raises(TypeError, match="model"):
        persistence.quantized_8bit("not a model")
