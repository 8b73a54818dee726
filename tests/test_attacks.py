"""Backdoor poisoning: BadNets, Turner et al.'s label-consistent attack, the lecture's variant."""
import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from course_lib.attacks import PoisonResult, badnets, label_consistent, lecture_clean_label
from course_lib.data import synthetic_dataset
from course_lib.models import model_for
from course_lib.train import train
from course_lib.triggers import PatchTrigger

TRIGGER = PatchTrigger(size=3, pattern="checkerboard", location="bottom-right")


@pytest.fixture(scope="module")
def surrogate(toy):
    """A small CNN trained for two epochs on the toy data (a second or two on a CPU)."""
    model = model_for(toy, seed=0)
    train(model, toy, epochs=2, seed=0, device="cpu", progress=False)
    return model


def snapshot(data):
    return data.images.clone(), data.labels.clone()


def assert_unchanged(data, snap):
    assert torch.equal(data.images, snap[0]) and torch.equal(data.labels, snap[1])


def assert_valid_indices(idx, n):
    assert idx.dtype == torch.int64
    assert torch.equal(idx, idx.unique())  # sorted, no repeats
    assert 0 <= idx.min() and idx.max() < n


def other_pixels(images):
    """The pixels outside the 3x3 bottom-right trigger."""
    return images[..., :-3, :].flatten(1), images[..., -3:, :-3].flatten(1)


# --- BadNets -----------------------------------------------------------------

def test_badnets_poisons_non_target_images_and_relabels_them(toy):
    snap = snapshot(toy)
    result = badnets(toy, trigger=TRIGGER, target=2, rate=0.1, seed=0)
    idx = result.indices
    assert isinstance(result, PoisonResult) and result.target == 2 and result.trigger is TRIGGER
    assert len(idx) == 60  # 10% of the whole training set
    assert_valid_indices(idx, len(toy))
    assert (toy.labels[idx] != 2).all()  # never a target-class image (its "relabelling" would change nothing)
    assert (result.dataset.labels[idx] == 2).all()
    assert torch.equal(result.dataset.images[idx], TRIGGER(toy.images[idx]))
    rest = torch.ones(len(toy), dtype=torch.bool)
    rest[idx] = False
    assert torch.equal(result.dataset.images[rest], toy.images[rest])
    assert torch.equal(result.dataset.labels[rest], toy.labels[rest])
    assert result.dataset.classes == toy.classes
    assert_unchanged(toy, snap)


def test_badnets_is_reproducible_and_leaves_the_global_rng_alone(toy):
    state = torch.get_rng_state()
    a = badnets(toy, trigger=TRIGGER, target=0, rate=0.05, seed=3)
    b = badnets(toy, trigger=TRIGGER, target=0, rate=0.05, seed=3)
    c = badnets(toy, trigger=TRIGGER, target=0, rate=0.05, seed=4)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.indices, b.indices) and not torch.equal(a.indices, c.indices)


def test_poison_result_is_frozen(toy):
    result = badnets(toy, trigger=TRIGGER, target=0, rate=0.05)
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.target = 1


def test_badnets_rate_larger_than_the_non_target_images_is_refused():
    data = synthetic_dataset(100, num_classes=10)  # 90 images outside each class
    assert len(badnets(data, trigger=TRIGGER, target=0, rate=0.9).indices) == 90
    with pytest.raises(ValueError, match="rate=0.95 asks for 95"):
        badnets(data, trigger=TRIGGER, target=0, rate=0.95)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(target=10), ValueError, "target"),
    (dict(target=-1), ValueError, "target"),
    (dict(target=True), ValueError, "target"),
    (dict(rate=0), ValueError, "rate"),
    (dict(rate=1.01), ValueError, "rate"),
    (dict(rate=0.0001), ValueError, "rate is too small"),
    (dict(trigger="patch"), TypeError, "trigger"),
])
def test_badnets_rejects_bad_arguments(toy, kwargs, error, match):
    args = dict(trigger=TRIGGER, target=0, rate=0.1) | kwargs
    with pytest.raises(error, match=match):
        badnets(toy, **args)


def test_badnets_wants_an_image_dataset(toy):
    with pytest.raises(TypeError, match="data"):
        badnets((toy.images, toy.labels), trigger=TRIGGER, target=0, rate=0.1)


# --- Label-consistent (Turner et al. 2019) -----------------------------------

def test_label_consistent_perturbs_only_target_images_within_eps(toy, surrogate):
    snap = snapshot(toy)
    eps = 8 / 255
    result = label_consistent(toy, trigger=TRIGGER, target=4, rate=0.5, surrogate=surrogate,
                              eps=eps, steps=5, device="cpu", progress=False)
    idx, poisoned = result.indices, result.dataset.images
    n_target = (toy.labels == 4).sum().item()
    assert len(idx) == round(0.5 * n_target)
    assert_valid_indices(idx, len(toy))
    assert (toy.labels[idx] == 4).all()
    assert torch.equal(result.dataset.labels, toy.labels)  # labels stay correct
    rest = torch.ones(len(toy), dtype=torch.bool)
    rest[idx] = False
    assert torch.equal(poisoned[rest], toy.images[rest])
    assert torch.equal(poisoned[idx, :, -3:, -3:], TRIGGER(toy.images[idx])[:, :, -3:, -3:])
    for new, old in zip(other_pixels(poisoned[idx]), other_pixels(toy.images[idx])):
        change = (new - old).abs()
        assert change.max() <= eps + 1e-6 and change.max() > eps / 2
    assert poisoned.min() >= 0 and poisoned.max() <= 1
    assert_unchanged(toy, snap)


def test_label_consistent_makes_target_images_hard_for_the_surrogate(toy, surrogate):
    """PGD within the budget fools the surrogate; random noise of the same size does not."""
    eps = 0.2  # the toy classes differ by a 0.6-bright stripe, so they need a big budget
    result = label_consistent(toy, trigger=TRIGGER, target=4, rate=1.0, surrogate=surrogate,
                              eps=eps, steps=5, device="cpu", progress=False)
    idx, labels = result.indices, toy.labels[result.indices]
    signs = torch.randint(0, 2, toy.images[idx].shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    noisy = TRIGGER((toy.images[idx] + eps * signs).clamp(0, 1))
    with torch.no_grad():
        pgd_logits, noise_logits = surrogate(result.dataset.images[idx]), surrogate(noisy)
    assert (noise_logits.argmax(1) == labels).float().mean() > 0.9
    assert (pgd_logits.argmax(1) == labels).float().mean() < 0.5
    assert F.cross_entropy(pgd_logits, labels) > 3 * F.cross_entropy(noise_logits, labels)


def test_label_consistent_leaves_the_surrogate_alone(toy, surrogate):
    model = copy.deepcopy(surrogate).train()  # in training mode, BatchNorm would update its stats
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    label_consistent(toy, trigger=TRIGGER, target=1, rate=0.2, surrogate=model, steps=2,
                     device="cpu", progress=False)
    assert model.training
    assert all(p.requires_grad for p in model.parameters())
    for p, g in zip(model.parameters(), grads):
        assert (p.grad is None and g is None) or torch.equal(p.grad, g)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(eps=0), ValueError, "eps"),
    (dict(eps=2.0), ValueError, "eps"),
    (dict(steps=0), ValueError, "steps"),
    (dict(step_size=-0.1), ValueError, "step_size"),
    (dict(batch_size=0), ValueError, "batch_size"),
    (dict(surrogate="resnet"), TypeError, "surrogate"),
    (dict(rate=0), ValueError, "rate"),
    (dict(target=12), ValueError, "target"),
])
def test_label_consistent_rejects_bad_arguments(toy, surrogate, kwargs, error, match):
    args = dict(trigger=TRIGGER, target=0, rate=0.1, surrogate=surrogate, progress=False) | kwargs
    with pytest.raises(error, match=match):
        label_consistent(toy, **args)


# --- The lecture's clean-label variant ---------------------------------------

def test_lecture_clean_label_moves_base_images_toward_the_target(toy, surrogate):
    snap = snapshot(toy)
    weights = {k: v.clone() for k, v in surrogate.state_dict().items()}
    result = lecture_clean_label(toy, model=surrogate, trigger=TRIGGER, base_class=3, target=5,
                                 rate=1.0, eps=0.1, device="cpu", progress=False)
    idx = result.indices
    assert torch.equal(idx, (toy.labels == 3).nonzero().flatten())
    assert torch.equal(result.dataset.labels, toy.labels)  # the base label is kept
    assert result.target == 5
    for new, old in zip(other_pixels(result.dataset.images[idx]), other_pixels(toy.images[idx])):
        assert (new - old).abs().max() <= 0.1 + 1e-6
    to_target = torch.full((len(idx),), 5)
    with torch.no_grad():
        before = F.cross_entropy(surrogate(TRIGGER(toy.images[idx])), to_target)
        after = F.cross_entropy(surrogate(result.dataset.images[idx]), to_target)
    assert after < before
    assert all(torch.equal(v, weights[k]) for k, v in surrogate.state_dict().items())
    assert_unchanged(toy, snap)


def test_lecture_clean_label_rejects_bad_arguments(toy, surrogate):
    with pytest.raises(ValueError, match="base_class and target"):
        lecture_clean_label(toy, model=surrogate, trigger=TRIGGER, base_class=5, target=5, rate=0.1)
    with pytest.raises(ValueError, match="base_class"):
        lecture_clean_label(toy, model=surrogate, trigger=TRIGGER, base_class=10, target=5, rate=0.1)
    with pytest.raises(TypeError, match="model"):
        lecture_clean_label(toy, model=None, trigger=TRIGGER, base_class=1, target=5, rate=0.1)
