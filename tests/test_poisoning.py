"""Label flipping: availability (random) and targeted (source -> target) poisoning."""
import pytest
import torch

from course_lib.poisoning import flip_labels_random, flip_labels_targeted

LABELS = torch.arange(1000) % 10  # 100 samples per class


def test_random_flip_always_changes_the_label():
    new, idx = flip_labels_random(LABELS, 0.3, num_classes=10, seed=1)
    assert len(idx) == 300
    assert (new[idx] != LABELS[idx]).all()
    untouched = torch.ones(len(LABELS), dtype=torch.bool)
    untouched[idx] = False
    assert torch.equal(new[untouched], LABELS[untouched])
    assert ((new >= 0) & (new < 10)).all()


def test_random_flip_at_rate_one_changes_every_label_to_every_other_class():
    new, idx = flip_labels_random(LABELS, 1.0, num_classes=10)
    assert torch.equal(idx, torch.arange(1000))
    assert (new != LABELS).all()  # the lecture's randint(0, 10) keeps about 10% unchanged
    for k in range(10):  # class k is sent to all 9 other classes
        assert set(new[LABELS == k].tolist()) == set(range(10)) - {k}


def test_random_flip_with_two_classes_swaps_them():
    labels = torch.tensor([0, 1] * 50)
    new, idx = flip_labels_random(labels, 0.5, num_classes=2, seed=3)
    assert torch.equal(new[idx], 1 - labels[idx])


@pytest.mark.parametrize("rate", [0.0, 0.01, 0.1, 0.29, 0.5, 0.999])
def test_random_flip_rate_is_exact(rate):
    new, idx = flip_labels_random(LABELS, rate, num_classes=10)
    assert len(idx) == round(rate * 1000)
    assert (new != LABELS).sum() == len(idx)


def test_indices_are_sorted_unique_int64_and_input_is_untouched():
    labels = LABELS.clone()
    _, idx = flip_labels_random(labels, 0.2, num_classes=10, seed=5)
    assert idx.dtype == torch.int64
    assert torch.equal(idx, idx.unique())  # unique() sorts
    assert torch.equal(labels, LABELS)


def test_seed_is_local_and_reproducible():
    state = torch.get_rng_state()
    a = flip_labels_random(LABELS, 0.2, num_classes=10, seed=7)
    b = flip_labels_random(LABELS, 0.2, num_classes=10, seed=7)
    c = flip_labels_random(LABELS, 0.2, num_classes=10, seed=8)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_targeted_flip_only_touches_the_source_class():
    new, idx = flip_labels_targeted(LABELS, source=3, target=7, rate=0.25, seed=2)
    assert len(idx) == 25  # 25% of the 100 source samples
    assert (LABELS[idx] == 3).all()
    assert (new[idx] == 7).all()
    changed = (new != LABELS).nonzero().flatten()
    assert torch.equal(changed, idx)
    assert torch.equal(idx, idx.unique())


def test_targeted_flip_at_rate_one_moves_the_whole_source_class():
    new, idx = flip_labels_targeted(LABELS, source=0, target=1, rate=1.0)
    assert torch.equal(idx, (LABELS == 0).nonzero().flatten())
    assert not (new == 0).any()
    assert (new == 1).sum() == 200


@pytest.mark.parametrize("kwargs, match", [
    (dict(rate=1.5), "rate"),
    (dict(rate=-0.1), "rate"),
    (dict(rate="0.1"), "rate"),
    (dict(num_classes=1), "num_classes"),
    (dict(num_classes=5), "num_classes"),  # labels go up to 9
])
def test_random_flip_rejects_bad_arguments(kwargs, match):
    args = dict(rate=0.1, num_classes=10) | kwargs
    with pytest.raises(ValueError, match=match):
        flip_labels_random(LABELS, args.pop("rate"), **args)


def test_labels_must_be_an_integer_vector():
    with pytest.raises(ValueError, match="labels"):
        flip_labels_random(LABELS.float(), 0.1, num_classes=10)
    with pytest.raises(ValueError, match="labels"):
        flip_labels_random(LABELS.view(10, 100), 0.1, num_classes=10)
    with pytest.raises(TypeError, match="labels"):
        flip_labels_targeted([0, 1, 2], source=0, target=1, rate=0.5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(source=3, target=3), "source and target"),
    (dict(source=-1), "source"),
    (dict(target=2.0), "target"),
    (dict(rate=0.0, source=42), "source class 42"),
    (dict(rate=2), "rate"),
])
def test_targeted_flip_rejects_bad_arguments(kwargs, match):
    args = dict(source=3, target=7, rate=0.1) | kwargs
    with pytest.raises(ValueError, match=match):
        flip_labels_targeted(LABELS, **args)
