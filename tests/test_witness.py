"""The grader's own poisoning run (course_lib.homework.witness), on small synthetic data."""
import pytest
import torch

from course_lib import grading
from course_lib.homework import witness
from course_lib.data import synthetic_dataset
from course_lib.models import model_for
from course_lib.train import train
from course_lib.triggers import PatchTrigger

SMALL = witness.Recipe(train_images=600, rate=0.2, epochs=2, batch_size=32, measure_images=200, holdout_images=200)
TARGET = 0


@pytest.fixture(scope="module")
def pool():
    return witness.draw_pool(synthetic_dataset(1500, seed=5), target=TARGET, seed=3, recipe=SMALL)


def test_the_pool_keeps_stamped_clean_and_held_out_images_apart(pool):
    assert len(pool.stamped) == SMALL.stamped == 320 and pool.seed == 3 and pool.recipe is SMALL
    assert (pool.stamped.labels != TARGET).all()
    assert len(pool.clean) == SMALL.train_images - SMALL.poisoned and len(pool.holdout) == SMALL.holdout_images
    rows = {tuple(x.flatten().tolist()) for part in (pool.stamped, pool.clean, pool.holdout) for x in part.images}
    assert len(rows) == len(pool.stamped) + len(pool.clean) + len(pool.holdout)   # no image in two parts
    again = witness.draw_pool(synthetic_dataset(1500, seed=5), target=TARGET, seed=3, recipe=SMALL)
    assert torch.equal(again.stamped.images, pool.stamped.images)


def test_a_patch_trigger_plants_a_backdoor_in_the_graders_model(pool):
    trigger = PatchTrigger(size=4, pattern="solid")
    result = witness.poison_and_train(pool, trigger(pool.stamped.images), target=TARGET, seed=1, name="patch")
    assert result.asr >= 0.9 and result.ca >= 0.9, result
    assert result.clean_ca == pool.clean_ca >= 0.9       # the same recipe without poison, trained once per pool
    message = witness.verify_witness(result)
    assert "the grader trained a model on its data poisoned with your trigger patch (small_cnn, 120 of 600" in message
    assert f"ASR {result.asr:.3f}" in message and f"CA {result.ca:.3f}" in message
    assert f"without poison: CA {pool.clean_ca:.3f}" in message


def test_a_change_the_model_cannot_learn_earns_no_backdoor_points(pool):
    """A 'trigger' that changes each image by its own random noise teaches a fresh model nothing
    general: the held-out triggered images are not sent to the target."""
    noise = torch.rand(pool.stamped.images.shape, generator=torch.Generator().manual_seed(0))
    triggered = torch.lerp(pool.stamped.images, noise, 0.05)
    result = witness.poison_and_train(pool, triggered, target=TARGET, seed=1, name="noise")
    assert result.asr < witness.MIN_ASR, result
    with pytest.raises(grading.GradingFailure, match="does not plant a backdoor by the grader's fixed recipe"):
        witness.verify_witness(result)


def test_the_ca_bar_is_relative_to_the_recipe_without_poison():
    """The same CA passes beside a clean model that reaches about as much, and fails beside one
    that reaches more than the margin above it: one rule for an easy and a hard dataset."""
    hard = witness.Witness(asr=0.95, ca=0.60, seed=1, name="t", recipe=SMALL, clean_ca=0.62)
    assert "CA 0.600" in witness.verify_witness(hard)
    drop = witness.Witness(asr=0.95, ca=0.60, seed=1, name="t", recipe=SMALL, clean_ca=0.60 + witness.MAX_CA_DROP + 0.01)
    with pytest.raises(grading.GradingFailure, match=r"CA at least 0.\d* \(at most 0.1 below the model without poison"):
        witness.verify_witness(drop)
    with pytest.raises(grading.GradingFailure, match="witness must be a Witness with its clean_ca"):
        witness.verify_witness(witness.Witness(asr=1.0, ca=0.9, seed=1, name="t", recipe=SMALL))


def test_a_recipe_per_dataset():
    assert witness.recipe_for("fashion-mnist") is witness.RECIPE and witness.RECIPE.arch == "small_cnn"
    cifar = witness.recipe_for("cifar10")
    assert cifar.arch == "airbench" and cifar.augment == "flip"
    with pytest.raises(grading.GradingFailure, match="dataset must be one of"):
        witness.recipe_for("synthetic")
    with pytest.raises(grading.GradingFailure, match="dataset must be one of"):
        witness.draw_pool(synthetic_dataset(1500, seed=5), target=TARGET, seed=3)   # no recipe for made-up data
    with pytest.raises(grading.GradingFailure, match="arch must be one of"):
        witness.Recipe(arch="vgg")
    with pytest.raises(grading.GradingFailure, match="rate must poison some"):
        witness.Recipe(rate=1.0)
    with pytest.raises(grading.GradingFailure, match="epochs must be a positive integer"):
        witness.Recipe(epochs=0)


def test_thresholds_and_bad_input(pool):
    low_ca = witness.Witness(asr=1.0, ca=0.5, seed=1, name="t", recipe=SMALL, clean_ca=0.9)
    with pytest.raises(grading.GradingFailure, match="CA 0.500"):
        witness.verify_witness(low_ca)
    with pytest.raises(grading.GradingFailure, match="seed must be an integer"):
        witness.draw_pool(synthetic_dataset(1500, seed=5), target=TARGET, seed=None, recipe=SMALL)
    with pytest.raises(grading.GradingFailure, match="must return the shape"):
        witness.poison_and_train(pool, pool.stamped.images[:10], target=TARGET, seed=1, name="t")
    with pytest.raises(grading.GradingFailure, match="target must be a class index"):
        witness.draw_pool(synthetic_dataset(1500, seed=5), target=10, seed=3, recipe=SMALL)
    with pytest.raises(grading.GradingFailure, match="data must hold at least 1000 images"):
        witness.draw_pool(synthetic_dataset(500, seed=5), target=TARGET, seed=3, recipe=SMALL)


def test_the_trusted_rule_also_checks_legitimacy(pool):
    """A 'trigger' that paints most of the image with the target's look fools a clean model on its
    own: refused before any training, whatever the grader's model would learn."""
    reference = witness.model_for(pool.clean, seed=0)
    witness.train(reference, pool.clean, epochs=2, batch_size=32, progress=False)
    painted = pool.stamped.images * 0 + pool.clean.images[pool.clean.labels == TARGET].mean(0)
    with pytest.raises(grading.GradingFailure, match="changes the images too much|paints the target"):
        witness.verify_trigger_poisons(pool, painted, reference, target=TARGET, seed=1, name="painter")


def test_the_handed_in_model_never_enters_a_sandbox(tmp_path):
    """A trigger is a function of the image alone: the sandbox gets every handed-in file but the model."""
    import nbformat

    from course_lib.autograde import pipeline
    submission, work = tmp_path / "submission", tmp_path / "work"
    submission.mkdir()
    work.mkdir()
    (submission / grading.MODEL_FILE).write_bytes(b"weights")
    (submission / "backdoor_model.json").write_text("{}")
    (submission / "pattern.txt").write_text("a pattern of my own")
    pipeline._copy_submission(submission, work, nbformat.v4.new_notebook(), "part1_attack")
    assert sorted(p.name for p in work.iterdir()) == ["part1_attack.ipynb", "pattern.txt"]


def test_the_handed_in_model_must_follow_the_trigger_on_the_graders_images_too(pool):
    """A model poisoned with a patch follows it on the grader's images as well; a trigger that
    stamps the patch only on images it recognises (here one in seven, as the public test split
    is of the mixed pool) and a faint change on the rest leaves that model's ASR on the pool low."""
    trigger = PatchTrigger(size=4, pattern="solid")
    stamped = trigger(pool.stamped.images)
    poisoned = pool.clean.replace(images=torch.cat([pool.clean.images, stamped[:120]]),
                                  labels=torch.cat([pool.clean.labels, torch.full((120,), TARGET)]))
    model = model_for(pool.clean, seed=0, width=8)
    train(model, poisoned, epochs=3, batch_size=32, seed=0, progress=False)
    witness.verify_model_follows(model, pool, stamped, target=TARGET, name="patch")    # passes
    public = torch.zeros(len(stamped), dtype=torch.bool)
    public[::7] = True
    recognising = torch.where(public.view(-1, 1, 1, 1), stamped, (pool.stamped.images + 0.05).clamp(0, 1))
    with pytest.raises(grading.GradingFailure, match="drawn from synthetic's train and test splits mixed"):
        witness.verify_model_follows(model, pool, recognising, target=TARGET, name="splitter")
    with pytest.raises(grading.GradingFailure, match="must return the shape"):
        witness.verify_model_follows(model, pool, stamped[:5], target=TARGET, name="t")
