"""Tests of course_lib.triggers: the common contract, then each trigger family."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from course_lib.triggers import (TRIGGER_NAMES, BlendTrigger, ColorShiftTrigger, DistributedTrigger,
                                 DynamicTrigger, PatchTrigger, PhysicalPatch, SampleSpecificTrigger,
                                 SIGTrigger, Trigger, WaNetTrigger, make_trigger)


def build(name, channels=3):
    """The default trigger called ``name``, adapted to grayscale where it has to be."""
    if name == "color_shift" and channels == 1:
        return make_trigger(name, channel=0)
    return make_trigger(name)


def images(n=4, channels=3, size=32, seed=0, dtype=torch.float32):
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed)).to(dtype)


def changed(before, after):
    """(H, W) mask of pixels that differ in any image or channel."""
    return (before != after).flatten(0, -3).any(dim=0)


# --- the contract every trigger keeps -------------------------------------------------------

def test_registry_names_and_classes():
    assert len(TRIGGER_NAMES) == len(set(TRIGGER_NAMES)) == 11
    for name in TRIGGER_NAMES:
        trigger = make_trigger(name)
        assert isinstance(trigger, Trigger)
        assert trigger.name == name
        assert repr(trigger).startswith(type(trigger).__name__ + "(")
        assert type(trigger).__doc__ and "20" in type(trigger).__doc__  # cites a year
    with pytest.raises(ValueError, match="name must be one of"):
        make_trigger("sunglasses")


@pytest.mark.parametrize("name", TRIGGER_NAMES)
@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32), (3, 28), (1, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_contract(name, channels, size, dtype):
    trigger = build(name, channels)
    x = images(5, channels, size, dtype=dtype)
    before = x.clone()
    y = trigger(x)
    assert torch.equal(x, before), "the input must not be modified"
    assert y.shape == x.shape and y.dtype == dtype
    assert y.min() >= 0 and y.max() <= 1
    assert not torch.equal(y, x), "the trigger must change the images"
    assert torch.equal(trigger(x), y), "triggers are deterministic"
    assert torch.equal(trigger(x[0]), y[0]), "one image gives the same result as in a batch"


@pytest.mark.parametrize("name", TRIGGER_NAMES)
def test_rejects_bad_images(name):
    trigger = build(name)
    with pytest.raises(TypeError, match="images must be a torch.Tensor"):
        trigger(np.zeros((3, 32, 32), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        trigger(torch.rand(32, 32))
    with pytest.raises(ValueError, match="float"):
        trigger(torch.zeros(3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="1 or 3 channels"):
        trigger(torch.rand(2, 4, 32, 32))


@pytest.mark.parametrize("name,kwargs,match", [
    ("patch", {"size": 33}, "size=33"),
    ("dynamic", {"size": 40}, "size=40"),
    ("sample_specific", {"size": 33}, "size=33"),
    ("physical", {"size": 33}, "size=33"),
    ("physical", {"size": 33, "location": "random"}, "size=33"),
    ("distributed", {"patch_size": 17}, "patch_size=17"),
    ("blur", {"kernel_size": 35}, "kernel_size=35"),
    ("wanet", {"k": 33}, "k=33"),
])
def test_trigger_larger_than_image_raises(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_trigger(name, **kwargs)(images(2, 3, 32))


@pytest.mark.parametrize("name,kwargs,match", [
    ("patch", {"size": 0}, "size"), ("patch", {"size": 2.5}, "size"),
    ("patch", {"pattern": "stripes"}, "pattern"), ("patch", {"location": "middle"}, "location"),
    ("patch", {"location": (-1, 3)}, "location"), ("patch", {"value": 1.5}, "value"),
    ("blend", {"alpha": 1.5}, r"alpha must be in \(0, 1\], got 1.5"), ("blend", {"alpha": 0}, "alpha"),
    ("blend", {"pattern": "kitty"}, "pattern"), ("blend", {"pattern": torch.rand(2, 8, 8)}, "pattern"),
    ("blend", {"pattern": torch.full((3, 8, 8), 2.0)}, "pattern"), ("blend", {"seed": -1}, "seed"),
    ("brightness", {"factor": 0}, "factor"), ("brightness", {"factor": 1.0}, "factor"),
    ("color_shift", {"shift": 0}, "shift"), ("color_shift", {"shift": 2}, "shift"),
    ("color_shift", {"channel": 3}, "channel"),
    ("blur", {"kernel_size": 4}, "kernel_size"), ("blur", {"kernel_size": 1}, "kernel_size"),
    ("blur", {"sigma": 0}, "sigma"),
    ("dynamic", {"size": 0}, "size"), ("dynamic", {"location": "left"}, "location"),
    ("distributed", {"patch_size": 0}, "patch_size"), ("distributed", {"num_patches": 5}, "num_patches"),
    ("sample_specific", {"key": -1}, "key"), ("sample_specific", {"key": 2**31}, "key"),
    ("sample_specific", {"size": 0}, "size"),
    ("physical", {"size": 0}, "size"), ("physical", {"location": "anywhere"}, "location"),
    ("sig", {"delta": 0}, "delta"), ("sig", {"delta": 1.5}, "delta"), ("sig", {"frequency": -2}, "frequency"),
    ("wanet", {"k": 1}, "k"), ("wanet", {"strength": 0}, "strength"), ("wanet", {"seed": "a"}, "seed"),
])
def test_bad_constructor_arguments_name_the_argument(name, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make_trigger(name, **kwargs)


# --- patches ----------------------------------------------------------------------------------

@pytest.mark.parametrize("location,top,left", [
    ("bottom-right", 29, 29), ("top-left", 0, 0), ("center", 14, 14), ("top-right", 0, 29),
    ("bottom-left", 29, 0), ((5, 10), 10, 5)])
@pytest.mark.parametrize("channels", [1, 3])
def test_patch_placement(location, top, left, channels):
    trigger = PatchTrigger(size=3, location=location)
    x = torch.full((2, channels, 32, 32), 0.5)
    y = trigger(x)
    expected = torch.zeros(32, 32, dtype=torch.bool)
    expected[top:top + 3, left:left + 3] = True
    assert torch.equal(changed(x, y), expected)
    assert torch.equal(trigger.footprint((channels, 32, 32)), expected)
    checker = torch.tensor([[1.0, 0, 1], [0, 1, 0], [1, 0, 1]])
    assert torch.equal(y[:, :, top:top + 3, left:left + 3], checker.expand(2, channels, 3, 3))


def test_patch_solid_value_and_odd_sizes():
    y = PatchTrigger(size=4, pattern="solid", location="center", value=0.25)(torch.ones(1, 28, 28))
    assert torch.equal(y[0, 12:16, 12:16], torch.full((4, 4), 0.25))
    assert (y == 0.25).sum() == 16
    assert PatchTrigger(size=5)(torch.zeros(3, 5, 5)).shape == (3, 5, 5)  # patch as large as the image


def test_location_outside_image_raises():
    with pytest.raises(ValueError, match="location"):
        PatchTrigger(size=3, location=(30, 0))(images(1, 3, 32))
    with pytest.raises(ValueError, match="image_shape"):
        PatchTrigger().footprint((32, 32))
    with pytest.raises(ValueError, match="size=5"):
        PatchTrigger(size=5).footprint((3, 4, 4))


def test_dynamic_trigger_adapts_to_brightness():
    trigger = DynamicTrigger(size=5)
    x = torch.stack([torch.full((3, 28, 28), v) for v in (0.1, 0.9, 0.5)])
    y = trigger(x)
    patch_values = y[:, 0, -1, -1]
    assert torch.allclose(patch_values, torch.tensor([1.0, 0.0, 0.5]))
    assert torch.equal(changed(x[:2], y[:2]), trigger.footprint((3, 28, 28)))


def test_distributed_trigger_fills_corners_alternately():
    y = DistributedTrigger(patch_size=3)(torch.full((1, 1, 28, 28), 0.5))[0, 0]
    assert (y[:3, :3] == 1).all() and (y[:3, -3:] == 0).all()
    assert (y[-3:, :3] == 1).all() and (y[-3:, -3:] == 0).all()
    assert (y == 0.5).sum() == 28 * 28 - 4 * 9
    two = DistributedTrigger(patch_size=3, num_patches=2)
    assert two.footprint((1, 28, 28)).sum() == 18


# --- blended, semantic, SIG, WaNet -------------------------------------------------------------

def test_blend_formula_and_lazy_noise():
    trigger = BlendTrigger(alpha=0.2, seed=3)
    x = images(3, 3, 32)
    noise = trigger.pattern_for((3, 32, 32))
    assert torch.allclose(trigger(x), 0.8 * x + 0.2 * noise)
    assert trigger.pattern_for((1, 28, 28)).shape == (1, 28, 28)
    assert torch.equal(BlendTrigger(seed=3).pattern_for((3, 32, 32)), noise)
    assert not torch.equal(BlendTrigger(seed=4).pattern_for((3, 32, 32)), noise)


def test_blend_tensor_pattern_must_match_images():
    trigger = BlendTrigger(alpha=0.5, pattern=torch.ones(3, 32, 32))
    assert torch.allclose(trigger(torch.zeros(3, 32, 32)), torch.full((3, 32, 32), 0.5))
    with pytest.raises(ValueError, match="3 channel"):
        trigger(torch.zeros(1, 32, 32))
    with pytest.raises(ValueError, match="32x32"):
        trigger(torch.zeros(3, 28, 28))


def test_semantic_triggers():
    x = images(2, 3, 28)
    assert torch.allclose(make_trigger("brightness", factor=1.3)(x), (x * 1.3).clamp(0, 1))
    shifted = make_trigger("color_shift", shift=-0.2, channel=2)(x)
    assert torch.equal(shifted[:, :2], x[:, :2])
    assert torch.allclose(shifted[:, 2], (x[:, 2] - 0.2).clamp(0, 1))
    with pytest.raises(ValueError, match="channel"):
        ColorShiftTrigger(channel=1)(images(1, 1, 28))
    blurred = make_trigger("blur")(x)
    assert blurred.std() < 0.5 * x.std()  # blurring averages the noise away
    assert torch.allclose(blurred.mean(), x.mean(), atol=0.01)


def test_sig_adds_a_horizontal_sine():
    y = SIGTrigger(delta=0.1, frequency=4)(torch.full((3, 28, 28), 0.5))
    wave = 0.1 * torch.sin(2 * math.pi * 4 * torch.arange(28) / 28)
    assert torch.allclose(y - 0.5, wave.expand(3, 28, 28), atol=1e-6)
    with pytest.raises(ValueError, match="frequency"):
        SIGTrigger(frequency=14)(torch.zeros(1, 28, 28))


def smooth_images(n, channels, size, seed=0):
    coarse = images(n, channels, 4, seed=seed)
    return nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=True)


def test_wanet_is_deterministic_and_subtle():
    x = smooth_images(8, 3, 32)
    y = WaNetTrigger(seed=1)(x)
    assert torch.equal(WaNetTrigger(seed=1)(x), y)
    assert not torch.equal(WaNetTrigger(seed=2)(x), y)
    linf = (y - x).abs().max()
    assert 0 < linf < 0.1
    assert WaNetTrigger(seed=1).grid(32, 28).shape == (1, 32, 28, 2)


# --- sample-specific ---------------------------------------------------------------------------

def test_sample_specific_patterns_are_keyed_and_distinct():
    trigger = SampleSpecificTrigger(key=7, size=5)
    patterns = trigger.patterns(torch.arange(500))
    assert patterns.shape == (500, 3, 5, 5)
    assert len({tuple(p.flatten().tolist()) for p in patterns}) == 500
    assert 0.45 < patterns.mean() < 0.55
    assert torch.equal(SampleSpecificTrigger(key=7, size=5).patterns([3, 9]), patterns[[3, 9]])
    assert not torch.equal(SampleSpecificTrigger(key=8, size=5).patterns([3]), patterns[[3]])


def test_sample_specific_applies_each_id_and_keeps_global_rng():
    torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()
    trigger = SampleSpecificTrigger(key=42, size=5)
    x = images(4, 3, 32)
    ids = torch.tensor([10, 11, 12, 10])
    y = trigger(x, sample_ids=ids)
    assert torch.equal(y[1], trigger(x[1], sample_ids=11))
    assert torch.equal(y[0, :, -5:, -5:], y[3, :, -5:, -5:])
    assert not torch.equal(y[0, :, -5:, -5:], y[1, :, -5:, -5:])
    assert torch.equal(trigger(x[:, :1], sample_ids=ids)[:, 0, -5:, -5:], y[:, 0, -5:, -5:])
    assert torch.equal(torch.get_rng_state(), torch_state)
    after = np.random.get_state()
    assert after[0] == numpy_state[0] and np.array_equal(after[1], numpy_state[1])
    with pytest.raises(ValueError, match="sample_ids"):
        trigger(x, sample_ids=[1, 2])
    with pytest.raises(ValueError, match="sample_ids"):
        trigger(x, sample_ids=[1.5, 2, 3, 4])
    with pytest.raises(ValueError, match="sample_ids"):
        trigger(x, sample_ids=["a", "b", "c", "d"])
    with pytest.raises(ValueError, match="sample_ids"):
        trigger(x, sample_ids=[0, 1, 2, -3])


# --- physical patch ----------------------------------------------------------------------------

class RedSpotNet(nn.Module):
    """Tiny translation-invariant classifier: class 2 wins when some 3x3 spot is red, not green.

    The response map (red minus green, summed over 3x3) is pooled by a smooth maximum
    (logsumexp), so a patch anywhere in the image receives gradient. The BatchNorm layer
    has running statistics that a careless optimizer would update.
    """

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 3, bias=False)
        self.norm = nn.BatchNorm2d(1)
        self.head = nn.Linear(1, 3)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[0, 0] = 1.0
            self.conv.weight[0, 1] = -1.0
            self.head.weight.copy_(torch.tensor([[0.0], [0.0], [1.0]]))
            self.head.bias.copy_(torch.tensor([0.0, 0.0, -8.0]))

    def forward(self, x):
        return self.head(self.norm(self.conv(x)).flatten(1).logsumexp(dim=1, keepdim=True))


def target_probability(model, x, target):
    with torch.no_grad():
        return model(x).softmax(dim=1)[:, target].mean().item()


def test_physical_patch_optimization_raises_target_probability():
    model = RedSpotNet().train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    data = images(64, 3, 32, seed=1)
    test = images(64, 3, 32, seed=2)
    patch = PhysicalPatch(size=6, location="random", seed=0)
    before = target_probability(model.eval(), patch(test), target=2)
    model.train()
    assert patch.optimize(model, data, target=2, steps=12, batch_size=16, lr=0.2, progress=False) is patch
    after = target_probability(model.eval(), patch(test), target=2)
    assert after > before + 0.2
    assert patch.patch.shape == (3, 6, 6)
    assert 0 <= patch.patch.min() and patch.patch.max() <= 1
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), f"optimize changed {key}"
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="3-channel"):
        patch(images(1, 1, 32))


def test_physical_patch_restores_training_flag_and_checks_target():
    model = RedSpotNet().train()
    PhysicalPatch(size=4).optimize(model, images(8, 3, 16), target=0, steps=2, batch_size=4, progress=False)
    assert model.training
    model.eval()
    PhysicalPatch(size=4).optimize(model, images(8, 3, 16), target=0, steps=2, batch_size=4, progress=False)
    assert not model.training
    with pytest.raises(ValueError, match="target"):
        PhysicalPatch(size=4).optimize(model, images(8, 3, 16), target=3, steps=1, progress=False)
    with pytest.raises(ValueError, match="steps"):
        PhysicalPatch(size=4).optimize(model, images(8, 3, 16), target=0, steps=0, progress=False)


def test_physical_patch_random_placement():
    patch = PhysicalPatch(size=4, seed=5)
    x = torch.full((50, 1, 20, 20), 0.5)
    y = patch(x, location="random", generator=torch.Generator().manual_seed(0))
    tops_lefts = set()
    for before, after in zip(x, y):
        rows, cols = changed(before[None], after[None]).nonzero(as_tuple=True)
        assert rows.max() - rows.min() < 4 and cols.max() - cols.min() < 4
        tops_lefts.add((rows.min().item(), cols.min().item()))
    assert len(tops_lefts) > 10
    assert patch.footprint((1, 20, 20)).sum() == 16  # default: bottom-right
    assert PhysicalPatch(location="random").footprint((1, 20, 20)).all()
    fixed = patch(x[:1], location=(2, 3))
    assert torch.equal(changed(x[:1], fixed).nonzero().min(dim=0).values, torch.tensor([3, 2]))
