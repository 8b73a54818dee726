"""Effectiveness (CA, ASR, robust accuracy), stealthiness and robustness metrics.

The effectiveness tests use a hand-written "model" whose predictions follow a rule, so
every expected number below is counted by hand rather than measured.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from course_lib.data import ImageDataset, synthetic_dataset
from course_lib.metrics import (ROBUSTNESS_TRANSFORMS, attack_success_rate, clean_accuracy, robust_accuracy,
                                robustness, stealth, stealth_summary)
from course_lib.models import model_for
from course_lib.triggers import PatchTrigger

WHITE_PATCH = PatchTrigger(size=3, pattern="solid", value=1.0)
TARGET = 0


class RuleModel(nn.Module):
    """Predicts class round(10 * centre pixel). With ``backdoor_below`` set, a white 3x3
    bottom-right patch sends images whose centre pixel is below it to class 0."""

    def __init__(self, backdoor_below=None):
        super().__init__()
        self.offset = nn.Parameter(torch.zeros(()))  # predict() runs on the parameters' device
        self.backdoor_below = backdoor_below

    def forward(self, x):
        value = x[:, 0, x.shape[2] // 2, x.shape[3] // 2]
        predicted = (10 * value).round().long().clamp(0, 9)
        if self.backdoor_below is not None:
            patch = x[:, 0, -3:, -3:].mean(dim=(1, 2)) > 0.95
            predicted = torch.where(patch & (value < self.backdoor_below), TARGET, predicted)
        return F.one_hot(predicted, 10).float() + self.offset


@pytest.fixture(scope="module")
def flat():
    """10 images per class; every pixel of a class-k image is k/10 (so 0.0 ... 0.9)."""
    labels = torch.arange(100) % 10
    images = (labels / 10).view(-1, 1, 1, 1).expand(-1, 1, 28, 28).clone()
    return ImageDataset(images, labels, tuple(str(k) for k in range(10)), "flat")


def test_clean_accuracy(flat):
    assert clean_accuracy(RuleModel(), flat) == 1.0
    wrong = flat.replace(labels=(flat.labels + 1) % 10)
    assert clean_accuracy(RuleModel(), wrong) == 0.0


def test_asr_excludes_target_images_and_the_lecture_count_inflates_it(flat):
    clean_model = RuleModel()  # no backdoor at all
    assert attack_success_rate(clean_model, flat, WHITE_PATCH, TARGET) == 0.0
    # the lecture counts the 10 class-0 images, correctly classified as 0, as "successes"
    assert attack_success_rate(clean_model, flat, WHITE_PATCH, TARGET, exclude_target=False) == 0.1

    partial = RuleModel(backdoor_below=0.45)  # the trigger works on classes 0-4 only
    assert attack_success_rate(partial, flat, WHITE_PATCH, TARGET) == pytest.approx(40 / 90)
    assert attack_success_rate(partial, flat, WHITE_PATCH, TARGET, exclude_target=False) == 0.5

    full = RuleModel(backdoor_below=2.0)
    assert attack_success_rate(full, flat, WHITE_PATCH, TARGET) == 1.0
    assert clean_accuracy(full, flat) == 1.0  # a stealthy backdoor: clean inputs unaffected


def test_a_run_time_filter_counts_refused_inputs_as_not_classified(flat):
    """``accept``: the filter in front of the model (STRIP's use); one rule for CA and ASR behind it."""
    full = RuleModel(backdoor_below=2.0)
    refuse_patched = lambda x: x[:, 0, -3:, -3:].mean(dim=(1, 2)) <= 0.95  # noqa: E731  a perfect trigger filter
    assert attack_success_rate(full, flat, WHITE_PATCH, TARGET, accept=refuse_patched) == 0.0
    assert clean_accuracy(full, flat, accept=refuse_patched) == 1.0
    refuse_dark = lambda x: x[:, 0, 14, 14] >= 0.5  # noqa: E731  refuses classes 0-4: half the clean inputs
    assert clean_accuracy(full, flat, accept=refuse_dark) == 0.5
    with pytest.raises(TypeError, match="accept"):
        clean_accuracy(full, flat, accept=0.5)
    with pytest.raises(ValueError, match="accept"):
        clean_accuracy(full, flat, accept=lambda x: torch.ones(3, dtype=torch.bool))


def test_robust_accuracy(flat):
    assert robust_accuracy(RuleModel(), flat, WHITE_PATCH, TARGET) == 1.0
    assert robust_accuracy(RuleModel(backdoor_below=0.45), flat, WHITE_PATCH, TARGET) == pytest.approx(50 / 90)
    assert robust_accuracy(RuleModel(backdoor_below=2.0), flat, WHITE_PATCH, TARGET) == 0.0


def test_effectiveness_metrics_reject_bad_arguments(flat):
    with pytest.raises(ValueError, match="target"):
        attack_success_rate(RuleModel(), flat, WHITE_PATCH, 10)
    with pytest.raises(TypeError, match="trigger"):
        attack_success_rate(RuleModel(), flat, "patch", TARGET)
    with pytest.raises(TypeError, match="model"):
        robust_accuracy(lambda x: x, flat, WHITE_PATCH, TARGET)
    with pytest.raises(TypeError, match="data"):
        clean_accuracy(RuleModel(), flat.images)
    only_target = flat.subset(flat.labels == TARGET)
    with pytest.raises(ValueError, match="no images outside the target class"):
        attack_success_rate(RuleModel(), only_target, WHITE_PATCH, TARGET)


def test_metrics_do_not_modify_the_test_set(flat):
    before = flat.images.clone()
    attack_success_rate(RuleModel(2.0), flat, WHITE_PATCH, TARGET)
    robustness(RuleModel(2.0), flat, WHITE_PATCH, TARGET)
    assert torch.equal(flat.images, before)


# --- stealthiness ------------------------------------------------------------

def test_identical_images_are_perfectly_stealthy():
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    s = stealth(images, images.clone())
    assert set(s) == {"l2", "linf", "psnr", "ssim"}
    assert all(v.shape == (4,) for v in s.values())
    assert torch.equal(s["l2"], torch.zeros(4)) and torch.equal(s["linf"], torch.zeros(4))
    assert torch.allclose(s["ssim"], torch.ones(4))
    assert torch.isinf(s["psnr"]).all()  # no noise at all: infinite signal-to-noise ratio


def test_a_3x3_patch_on_a_gray_28x28_image_has_known_distances():
    gray = torch.full((2, 1, 28, 28), 0.5)
    s = stealth(gray, PatchTrigger(size=3, pattern="checkerboard")(gray))
    assert torch.allclose(s["l2"], torch.full((2,), 1.5))  # sqrt(9 pixels * 0.5**2)
    assert torch.allclose(s["linf"], torch.full((2,), 0.5))
    mse = 9 * 0.25 / 784
    assert torch.allclose(s["psnr"], torch.full((2,), 10 * math.log10(1 / mse)))
    assert (s["ssim"] < 1).all() and (s["ssim"] > 0.5).all()


def lecture_global_ssim(a, b):
    """The lecture's SSIM: one global formula with its constants 0.01 and 0.03."""
    ma, mb = a.mean(), b.mean()
    cov = ((a - ma) * (b - mb)).mean()
    return ((2 * ma * mb + 0.01) * (2 * cov + 0.03)
            / ((ma ** 2 + mb ** 2 + 0.01) * (a.var() + b.var() + 0.03))).item()


def test_ssim_is_windowed_not_the_lectures_global_formula():
    """Same smooth ramp, independent fine texture: globally alike, locally unrelated."""
    gen = torch.Generator().manual_seed(0)
    ramp = torch.linspace(0, 0.8, 28).expand(1, 1, 28, 28)
    a = ramp + 0.2 * torch.rand(1, 1, 28, 28, generator=gen)
    b = ramp + 0.2 * torch.rand(1, 1, 28, 28, generator=gen)
    windowed = stealth(a, b)["ssim"].item()
    assert lecture_global_ssim(a, b) > 0.9
    assert windowed < 0.6


def test_stealth_handles_single_images_and_small_images():
    image = torch.rand(3, 32, 32)
    assert stealth(image, image)["ssim"].shape == (1,)
    tiny = torch.rand(2, 1, 5, 5)
    assert torch.allclose(stealth(tiny, tiny)["ssim"], torch.ones(2))
    assert (stealth(tiny, tiny * 0.5)["ssim"] < 1).all()


def test_stealth_rejects_bad_inputs():
    with pytest.raises(ValueError, match="same shape"):
        stealth(torch.rand(2, 1, 28, 28), torch.rand(2, 1, 28, 27))
    with pytest.raises(ValueError, match="triggered"):
        stealth(torch.rand(2, 1, 28, 28), torch.rand(28, 28))
    with pytest.raises(ValueError, match="3x3"):
        stealth(torch.rand(1, 1, 2, 2), torch.rand(1, 1, 2, 2))


def test_stealth_summary_is_the_mean_as_floats():
    clean = torch.rand(5, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    triggered = WHITE_PATCH(clean)
    summary = stealth_summary(clean, triggered)
    per_image = stealth(clean, triggered)
    assert all(isinstance(v, float) for v in summary.values())
    for name, values in per_image.items():
        assert summary[name] == pytest.approx(values.mean().item())


# --- robustness --------------------------------------------------------------

def test_robustness_reports_every_transform(flat):
    full = RuleModel(backdoor_below=2.0)  # fires when the bottom-right 3x3 mean is > 0.95
    result = robustness(full, flat, WHITE_PATCH, TARGET)
    assert tuple(result) == ROBUSTNESS_TRANSFORMS
    assert all(isinstance(v, float) and 0 <= v <= 1 for v in result.values())
    assert result["none"] == attack_success_rate(full, flat, WHITE_PATCH, TARGET) == 1.0
    assert result["brightness+20%"] == 1.0  # white stays white (clamped at 1)
    assert result["brightness-20%"] == 0.0  # white becomes 0.8
    assert result["rotate+15"] == result["rotate-15"] == 0.0  # the corner turns out of the frame
    assert result == robustness(full, flat, WHITE_PATCH, TARGET)  # deterministic for a seed


def test_robustness_runs_on_color_images_with_a_real_model():
    data = synthetic_dataset(20, channels=3, size=32, num_classes=4, seed=0)
    result = robustness(model_for(data, arch="small_cnn", seed=0), data, WHITE_PATCH, 3, seed=1)
    assert tuple(result) == ROBUSTNESS_TRANSFORMS
    assert all(0 <= v <= 1 for v in result.values())
