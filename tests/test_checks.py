"""The one argument-check module of the library (course_lib.checks): wrong type -> TypeError,
impossible value -> ValueError, and the message names the argument. The triggers and the
defenses use it, so a bad argument reads the same everywhere."""
import pytest
import torch
from torch import nn

from course_lib import checks
from course_lib.data import synthetic_dataset
from course_lib.defenses import activation_clustering, detection_scores, fit_strip, neural_cleanse, remove
from course_lib.triggers import BlendTrigger, PatchTrigger


@pytest.mark.parametrize("value, error", [(2.5, TypeError), ("3", TypeError), (True, TypeError), (0, ValueError),
                                          (11, ValueError)])
def test_check_int(value, error):
    with pytest.raises(error, match="^size must be an integer in \\[1, 10\\]"):
        checks.check_int("size", value, 1, 10)
    assert checks.check_int("size", 4, 1, 10) == 4


@pytest.mark.parametrize("value, error", [("0.5", TypeError), (None, TypeError), (False, TypeError),
                                          (0.0, ValueError), (1.5, ValueError), (float("nan"), ValueError)])
def test_check_float(value, error):
    with pytest.raises(error, match="^alpha must be"):
        checks.check_float("alpha", value, 0.0, 1.0, low_open=True)
    assert checks.check_float("alpha", 1, 0.0, 1.0, low_open=True) == 1.0


def test_check_choice_model_dataset_images_and_indices():
    with pytest.raises(ValueError, match="^reducer must be one of"):
        checks.check_choice("reducer", "tsne", ("pca", "ica"))
    with pytest.raises(TypeError, match="^reducer"):
        checks.check_choice("reducer", 3, ("pca", "ica"))
    with pytest.raises(TypeError, match="^model must be a torch.nn.Module"):
        checks.check_model("not a model")
    with pytest.raises(TypeError, match=r"^model must have \.features"):
        checks.check_model(nn.Linear(2, 2), "features")
    with pytest.raises(TypeError, match="^data must be a course_lib.data.ImageDataset"):
        checks.check_dataset("data", torch.zeros(3, 1, 28, 28))
    with pytest.raises(ValueError, match="^data must hold at least 50"):
        checks.check_dataset("data", synthetic_dataset(10), min_size=50)
    with pytest.raises(TypeError, match="^images"):
        checks.check_images("images", [[0.0]])
    with pytest.raises(ValueError, match="^images"):
        checks.check_images("images", torch.zeros(2, 28, 28))
    with pytest.raises(TypeError, match="^flagged"):   # 0.7 is no index: it must not become 0
        checks.check_indices("flagged", torch.tensor([0.7]), 5)
    with pytest.raises(ValueError, match="^flagged"):
        checks.check_indices("flagged", [5], 5)
    with pytest.raises(ValueError, match="^flagged"):
        checks.check_indices("flagged", torch.ones(4, dtype=torch.bool), 5)
    assert checks.check_indices("flagged", [0, 3], 5).tolist() == [True, False, False, True, False]
    data = synthetic_dataset(10)
    with pytest.raises(TypeError, match="^n_images"):
        checks.check_budget("n_images", 2.0, data, "clean_data")
    with pytest.raises(ValueError, match=r"^n_images must be an integer in \[1, 10\]"):
        checks.check_budget("n_images", 11, data, "clean_data")


def test_triggers_and_defenses_answer_in_the_same_words():
    """The same wrong argument gets the same kind of error from a trigger and from a defense."""
    data = synthetic_dataset(60)
    with pytest.raises(TypeError, match="^size must be an integer >= 1, got 2.5"):
        PatchTrigger(size=2.5)
    with pytest.raises(ValueError, match=r"^alpha must be in \(0, 1\]"):
        BlendTrigger(alpha=1.5)
    model = nn.Conv2d(1, 1, 3)
    with pytest.raises(TypeError, match="^model must have .features"):
        activation_clustering(model, data, progress=False)
    with pytest.raises(TypeError, match="^data must be"):
        remove(data.images, [0])
    with pytest.raises(TypeError, match="^flagged"):
        detection_scores(torch.tensor([0.5]), [1], 5)
    with pytest.raises(ValueError, match="^analysis must be one of"):
        activation_clustering(model, data, analysis="size+magic", progress=False)
    with pytest.raises(TypeError, match="^frr"):
        fit_strip(nn.Linear(2, 2), data, frr="1%")
    with pytest.raises(TypeError, match="^n_images"):
        neural_cleanse(nn.Linear(2, 2), data, n_images=10.0, progress=False)
