"""Defenses on real (small) Fashion-MNIST models, on two trigger families, plus a clean control.

The fixture trains five models on a 12,000-image subset for 2 epochs: BadNets with the
kit's 3x3 checkerboard (5% of the set relabeled to class 0), with a solid 3x3 square in
the top-left corner (5%, to class 2), with 3x3 squares in the four corners (5%, to class
3; Neural Cleanse's second family: four separate patches make a mask of four parts),
a checkerboard on 12% of the set (to class 5: more poison than real Sandals), and a clean
model. Every
detector and mitigation must hold on both backdoors, not only on the kit's own trigger;
the detection matrix (``bench matrix``) covers the other families and rates.
"""
import copy
import hashlib
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

from course_lib.data import ImageDataset
from course_lib.defenses import (InputDetector, LabelDetection, Mitigation, SampleDetection, activation_clustering,
                                 anomaly_index, chance_false_alarm_rate, detection_scores, extract_features,
                                 fine_prune, fit_strip, flag_small_outliers, isolation_forest_outliers,
                                 lecture_batch_noise_training, lecture_transform_sanitize, mitigation_scores,
                                 neural_cleanse, plot_activation_clusters, plot_anomaly_index, plot_comparison,
                                 plot_pruning_curve, plot_reversed_triggers, plot_strip_entropy, prune, pruning_curve,
                                 remove, retrain_without, spectral_signatures, strip_entropy, strip_rates,
                                 train_dp_sgd, unlearn)
from course_lib.defenses import compare, matrix
from course_lib.experiments import run_backdoor, run_clean
from course_lib.metrics import attack_success_rate, clean_accuracy
from course_lib.triggers import DistributedTrigger, PatchTrigger

pytestmark = pytest.mark.slow
FAMILIES = ("checkerboard", "square")


def fingerprint(*objects) -> str:
    """A hash of model parameters/buffers and tensors: equal before and after = nothing mutated."""
    digest = hashlib.sha256()
    for obj in objects:
        tensors = obj.state_dict().values() if isinstance(obj, nn.Module) else [obj]
        for tensor in tensors:
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@pytest.fixture(scope="session")
def lab(fmnist):
    """Two backdoored models (two trigger families) and a clean one, the defender's images, the eval images."""
    torch.set_num_threads(min(2, torch.get_num_threads()))
    train, test = fmnist
    subset, _ = train.split(12_000, seed=0)
    defender, evaluation = test.split(2_000, seed=0)
    evaluation = evaluation.subset(range(3_000))
    triggers = {"checkerboard": (PatchTrigger(size=3, pattern="checkerboard"), 0, 0.05),
                "square": (PatchTrigger(size=3, pattern="solid", location="top-left"), 2, 0.05),
                "corners": (DistributedTrigger(), 3, 0.05),
                "majority": (PatchTrigger(size=3, pattern="checkerboard"), 5, 0.12)}
    runs = {name: run_backdoor(subset, evaluation, trigger=t, target=target, rate=rate, epochs=2, progress=False)
            for name, (t, target, rate) in triggers.items()}
    for run in runs.values():
        assert run.asr > 0.9 and run.clean_acc > 0.8
    clean = run_clean(subset, evaluation, epochs=2, progress=False)
    features = {name: extract_features(run.model, run.poison.dataset.images, progress=False)
                for name, run in runs.items()}
    return {"runs": runs, "clean": clean, "train": subset, "defender": defender, "eval": evaluation,
            "features": features,
            "clean_features": extract_features(clean.model, subset.images, progress=False)}


def case_of(lab, family) -> compare.Case:
    run = lab["runs"][family]
    return compare.Case(run.model, run.poison.dataset, lab["defender"], lab["eval"], poisoned=run.poison.indices,
                        trigger=run.poison.trigger, target=run.poison.target, quick=True)


# --- sample detectors: scores, flagged samples, flagged classes --------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_activation_clustering_finds_the_poison_and_only_in_the_target_class(lab, family):
    run = lab["runs"][family]
    poison = run.poison
    before = fingerprint(run.model, poison.dataset.images)
    found = activation_clustering(run.model, poison.dataset, features=lab["features"][family],
                                  clean_data=lab["defender"], progress=False)
    assert fingerprint(run.model, poison.dataset.images) == before
    assert isinstance(found, SampleDetection) and found.paper == "Chen et al. 2018"
    assert found.scores.shape == (len(poison.dataset),)
    scores = detection_scores(found.flagged, poison.indices, len(poison.dataset))
    assert found.flagged_classes == [poison.target]
    assert scores["f1"] >= 0.9
    split = found.per_class[poison.target]
    # trusted clean images of the target class avoid the poison cluster and fill the other one
    assert split.trusted_share[1] <= 0.2 and split.trusted_share[0] >= 0.8 and split.suspect == 1
    assert found.scores[poison.indices].mean() > found.scores[split.cluster(0)].mean()
    assert plot_activation_clusters(found, poisoned=poison.indices, classes=poison.dataset.classes) is not None


def test_activation_clustering_leaves_the_clean_model_alone_and_reports_every_analysis(lab):
    found = activation_clustering(lab["clean"].model, lab["train"], features=lab["clean_features"],
                                  clean_data=lab["defender"], progress=False)
    assert found.flagged_classes == [] and len(found.flagged) == 0
    assert set(found.poisoned_by) == {"size", "silhouette", "trusted"}
    # every cluster of a clean class is populated by trusted images about as much as by training images
    assert min(min(s.trusted_share) for s in found.per_class) > 0.6
    # the lecture's rule flags the smaller cluster of every class: on a clean model, a third of the data or more
    assert sum(len(s.smaller) for s in found.per_class) > 0.2 * len(lab["train"])
    cheap = activation_clustering(lab["clean"].model, lab["train"].subset(range(3000)), analysis="size",
                                  reducer="ica", progress=False)
    assert cheap.per_class[0].trusted_share is None and set(cheap.poisoned_by) == {"size", "silhouette"}
    with pytest.raises(ValueError, match="clean_data"):  # the default analysis needs trusted images
        activation_clustering(lab["clean"].model, lab["train"], features=lab["clean_features"], progress=False)


def test_activation_clustering_finds_poison_that_is_the_larger_cluster(lab):
    """12% of the set relabeled to class 5: the poison outnumbers the real Sandals, so "the
    smaller cluster" is the clean one; the trusted-share analysis and Chen et al.'s
    exclusionary reclassification both test the two clusters and find it."""
    run = lab["runs"]["majority"]
    poison = run.poison
    found = activation_clustering(run.model, poison.dataset, clean_data=lab["defender"], also=("exclusionary",),
                                  progress=False)
    split = found.per_class[poison.target]
    assert split.suspect == 0 and len(split.cluster(0)) > len(split.smaller)
    assert found.flagged_classes == [poison.target]
    assert detection_scores(found.flagged, poison.indices, len(poison.dataset))["f1"] >= 0.9
    # exclusionary reclassification: a model trained without the larger cluster does not recognize it
    assert split.recognition[0] <= 0.2 < split.recognition[1]
    assert poison.target in found.classes_by("exclusionary") and split.suspect_for("exclusionary") == 0
    assert detection_scores(found.flagged_by("silhouette"), poison.indices, len(poison.dataset))["f1"] < 0.5


@pytest.mark.parametrize("family", FAMILIES)
def test_spectral_signatures_ranks_the_poison_first(lab, family):
    poison = lab["runs"][family].poison
    found = spectral_signatures(lab["runs"][family].model, poison.dataset, features=lab["features"][family],
                                clean_data=lab["defender"], progress=False)
    assert isinstance(found, SampleDetection) and found.flagged_classes == [poison.target]  # the kit's class test
    # the poison (5% of the set, a third of its class) projects beyond every trusted image of the target
    assert found.tail[poison.target] > 0.2 and found.tail.max() == found.tail[poison.target]
    assert detection_scores(found.flagged, poison.indices, len(poison.dataset))["tpr"] >= 0.95
    squared = spectral_signatures(lab["runs"][family].model, poison.dataset, score="squared",
                                  features=lab["features"][family], clean_data=lab["defender"], progress=False)
    assert set(squared.flagged_classes) == {poison.target}
    paper = spectral_signatures(lab["runs"][family].model, poison.dataset, features=lab["features"][family],
                                progress=False)
    assert paper.flagged_classes == list(range(10))  # the paper removes from every class
    in_target = (poison.dataset.labels == poison.target).nonzero().flatten()
    top = in_target[paper.scores[in_target].argsort(descending=True)[:len(poison.indices)]]
    assert torch.isin(top, poison.indices).float().mean() >= 0.9  # the poison sits on top of its class


def test_spectral_signatures_removal_and_retraining_removes_the_backdoor(lab):
    run = lab["runs"]["checkerboard"]
    found = spectral_signatures(run.model, run.poison.dataset, features=lab["features"]["checkerboard"],
                                clean_data=lab["defender"], progress=False)
    repaired = retrain_without(run.poison.dataset, found.flagged, progress=False)
    assert isinstance(repaired, Mitigation)
    assert attack_success_rate(repaired.model, lab["eval"], run.poison.trigger, run.poison.target) <= 0.1
    on_clean = spectral_signatures(lab["clean"].model, lab["train"], features=lab["clean_features"],
                                   clean_data=lab["defender"], progress=False)
    assert on_clean.flagged_classes == [] and len(on_clean.flagged) == 0
    everywhere = spectral_signatures(lab["clean"].model, lab["train"], features=lab["clean_features"],
                                     expected_fraction=0.1, progress=False)
    assert everywhere.flagged_classes == list(range(10))
    assert len(everywhere.flagged) == pytest.approx(0.15 * len(lab["train"]), rel=0.01)


@pytest.mark.parametrize("family", FAMILIES)
def test_isolation_forest_on_pixel_statistics_and_features(lab, family):
    run = lab["runs"][family]
    data = run.poison.dataset.subset(range(3000))
    poisoned = run.poison.indices[run.poison.indices < 3000]
    pixels = isolation_forest_outliers(data, features="pixel_stats", contamination=0.05)
    learned = isolation_forest_outliers(data, model=run.model, contamination=0.1, progress=False)
    assert isinstance(learned, SampleDetection) and learned.scores.shape == (3000,)
    assert len(pixels.flagged) == pytest.approx(150, abs=2) and len(learned.flagged) == pytest.approx(300, abs=2)
    # A 3x3 patch barely moves an image's pixel statistics; the learned features single it out.
    assert detection_scores(pixels.flagged, poisoned, 3000)["tpr"] < 0.15
    assert detection_scores(learned.flagged, poisoned, 3000)["tpr"] > 0.5


# --- Neural Cleanse: per-label statistics, flagged labels ---------------------------------------

def test_anomaly_index_is_signed_and_flags_exactly_the_small_outliers():
    # median of [2, 4, 6, 8, 10, 30] = 7; |x - 7| = [5, 3, 1, 1, 3, 23]; MAD = 3
    index = anomaly_index([2, 4, 6, 8, 10, 30])
    expected = torch.tensor([5, 3, 1, -1, -3, -23], dtype=torch.float64) / (1.4826 * 3)
    assert torch.allclose(index, expected)
    values = [1, 20, 21, 22, 23, 24, 100]  # 1 is far below the rest, 100 far above
    assert flag_small_outliers(values) == [0] == (anomaly_index(values) > 2).nonzero().flatten().tolist()
    batch = anomaly_index(torch.tensor([[2.0, 4, 6, 8, 10, 30], [1, 20, 21, 22, 23, 24]]))
    assert torch.allclose(batch[0], expected)


def test_chance_false_alarm_rate_of_the_mad_rule():
    rate = chance_false_alarm_rate(10, 2.0, trials=20_000)
    # far above the 2.3% of one normal value: ten labels, and a median and MAD estimated from them
    assert 0.15 < rate < 0.5
    assert chance_false_alarm_rate(10, 3.0, trials=20_000) < rate
    assert chance_false_alarm_rate(30, 2.0, trials=20_000) > rate


def test_the_neural_cleanse_runner_reports_every_labels_held_out_success(lab):
    # The bench, the matrix and notebook 6 read Neural Cleanse's row; it must carry the reversed
    # triggers' success on held-out images, label by label, as the result measured it.
    row, found = compare.run_defense("neural_cleanse", case_of(lab, "checkerboard"))
    found = found["backdoored"]
    assert row["heldout_success"] == [round(v, 4) for v in found.success.tolist()]
    assert len(row["heldout_success"]) == lab["defender"].num_classes
    assert row["heldout_success_min"] == min(row["heldout_success"]) >= 0.98
    assert row["flagged"] == found.flagged


@pytest.mark.parametrize("family", ("checkerboard", "corners"))
def test_neural_cleanse_reverses_the_planted_trigger_with_triggers_that_hold_out(lab, family):
    run = lab["runs"][family]
    target = run.poison.target
    before = fingerprint(run.model, lab["defender"].images)
    result = neural_cleanse(run.model, lab["defender"], steps=300, progress=False)
    assert fingerprint(run.model, lab["defender"].images) == before
    assert isinstance(result, LabelDetection) and torch.equal(result.statistic, result.norms)
    # The reversed trigger of the target is the smallest mask, near the planted 3x3 patch's 9 pixels.
    # Whether the MAD rule flags it depends on how far the *other* labels' searches converged (their
    # spread sets the MAD); the detection matrix measures that rate, so it is not asserted here.
    assert result.norms.argmin().item() == target and result.norms[target] < 45
    assert result.anomaly_index.argmax().item() == target
    assert result.flagged == flag_small_outliers(result.norms.log())  # the MAD test on log norms
    # the kept triggers were selected on held-out images and succeed on others
    assert result.success.min() >= 0.98
    assert plot_reversed_triggers(result, classes=run.poison.dataset.classes) is not None
    assert plot_anomaly_index({"backdoored": result}, classes=run.poison.dataset.classes) is not None
    if family == "checkerboard":
        repaired = unlearn(run.model, result, lab["defender"], labels=[target], epochs=2, lr=0.05, progress=False)
        assert isinstance(repaired, Mitigation) and fingerprint(run.model, lab["defender"].images) == before
        assert attack_success_rate(repaired.model, lab["eval"], run.poison.trigger, target) < 0.2
        assert clean_accuracy(repaired.model, lab["eval"]) > run.clean_acc - 0.15


# --- mitigations: a repaired copy -----------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_fine_pruning_lowers_the_attack_success_rate_on_a_copy(lab, family):
    run = lab["runs"][family]
    before = fingerprint(run.model)
    result = fine_prune(run.model, lab["defender"], epochs=3, progress=False)
    assert fingerprint(run.model) == before and result.model is not run.model and isinstance(result, Mitigation)
    assert 0 < result.fraction < 1 and (result.model.channel_mask.mask == 0).sum() == len(result.pruned)
    assert result.val_acc_pruned >= result.val_acc_before - 0.10  # the stopping rule
    asr_after = attack_success_rate(result.model, lab["eval"], run.poison.trigger, run.poison.target)
    assert asr_after < run.asr - 0.3
    assert clean_accuracy(result.model, lab["eval"]) > run.clean_acc - 0.08


def test_pruning_curve_starts_at_the_unpruned_model(lab):
    run = lab["runs"]["checkerboard"]
    curve = pruning_curve(run.model, lab["defender"], lab["eval"], run.poison.trigger, run.poison.target, points=3)
    assert curve.fractions[0] == 0 and len(curve.asr) == 3 and curve.asr[0] == pytest.approx(run.asr)
    assert plot_pruning_curve(curve, chosen_fraction=0.5) is not None
    assert (prune(run.model, [0, 1]).channel_mask.mask == 0).sum() == 2 and run.model.channel_mask.mask.all()


# --- STRIP: a fitted input detector ---------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_strip_separates_triggered_from_clean_inputs(lab, family):
    poison, evaluation = lab["runs"][family].poison, lab["eval"]
    detector = fit_strip(lab["runs"][family].model, lab["defender"], frr=0.01, n_calibration=500)
    assert isinstance(detector, InputDetector) and detector.paper == "Gao et al. 2019"
    keep = evaluation.labels != poison.target
    triggered = poison.trigger(evaluation.images[keep][:500])
    rates = strip_rates(detector, evaluation.images[:500], triggered)
    assert rates["far"] <= 0.1 and rates["frr"] <= 0.05
    clean_entropy, triggered_entropy = detector.scores(evaluation.images[:200]), detector.scores(triggered[:200])
    assert triggered_entropy.median() < clean_entropy.median()
    assert plot_strip_entropy(clean_entropy, triggered_entropy, detector.threshold) is not None


# --- sanitization and differential privacy ----------------------------------------------------

def test_transform_sanitization_returns_a_new_dataset(lab):
    data = lab["runs"]["checkerboard"].poison.dataset.subset(range(600))
    before = fingerprint(data.images)
    sanitized = lecture_transform_sanitize(data, seed=0)
    assert fingerprint(data.images) == before
    assert sanitized.images.shape == data.images.shape and torch.equal(sanitized.labels, data.labels)
    assert 0 <= sanitized.images.min() and sanitized.images.max() <= 1
    assert not torch.equal(sanitized.images, data.images)


def test_dp_sgd_reports_a_finite_epsilon(lab):
    data = lab["runs"]["checkerboard"].poison.dataset.subset(range(2000))
    result = train_dp_sgd(data, epochs=1, batch_size=200, progress=False)
    assert isinstance(result, Mitigation) and result.paper.startswith("Abadi")
    assert math.isfinite(result.epsilon) and result.epsilon > 0 and result.delta == 1e-5
    assert not any(isinstance(m, nn.BatchNorm2d) for m in result.model.modules())
    assert clean_accuracy(result.model, lab["eval"]) > 0.4  # measured 0.56 after one epoch on 2,000 images
    more_noise = train_dp_sgd(data, epochs=1, batch_size=200, noise_multiplier=2.0, progress=False)
    assert more_noise.epsilon < result.epsilon  # more noise, more privacy
    assert lecture_batch_noise_training(data, epochs=1, batch_size=200, progress=False).epsilon is None


def test_dp_sgd_without_noise_states_no_guarantee_and_no_warning(lab):
    """Notebook 6's control (sigma = 0): epsilon is infinite, and the accountant's warning stays out of the output."""
    data = lab["runs"]["checkerboard"].poison.dataset.subset(range(1000))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = train_dp_sgd(data, epochs=1, batch_size=200, noise_multiplier=0.0, progress=False)
    assert result.epsilon == math.inf and clean_accuracy(result.model, lab["eval"]) > 0.2


# --- scoring, the runners, the comparison table -------------------------------------------------

def test_detection_scores_count_against_the_poisoned_indices():
    scores = detection_scores(torch.tensor([0, 1, 5]), torch.tensor([0, 1, 2, 3]), n=10)
    assert scores["tpr"] == 0.5 and scores["fpr"] == pytest.approx(1 / 6)
    assert scores["precision"] == pytest.approx(2 / 3) and scores["f1"] == pytest.approx(4 / 7)
    assert detection_scores([], [], n=5)["tpr"] is None


def test_mitigation_score_survives_a_zero_or_negative_accuracy_drop():
    no_drop = mitigation_scores(ca_before=0.9, ca_after=0.9, asr_before=1.0, asr_after=0.1)
    gain = mitigation_scores(ca_before=0.9, ca_after=0.92, asr_before=1.0, asr_after=0.1)
    assert no_drop["mitigation_score"] == pytest.approx(90) and gain["mitigation_score"] == pytest.approx(90)
    costly = mitigation_scores(ca_before=0.9, ca_after=0.8, asr_before=1.0, asr_after=0.1)
    assert costly["mitigation_score"] == pytest.approx(9)


def test_the_strip_runner_measures_through_the_filter(lab):
    case = case_of(lab, "square")
    row, results = compare.run_defense("strip", case)
    assert row["far"] <= 0.1 and row["frr"] <= 0.05 and row["tpr"] == pytest.approx(1 - row["far"])
    assert row["asr_after"] <= row["far"] + 1e-9 and row["ca_after"] <= row["ca_before"]
    assert isinstance(results["backdoored"], InputDetector) and results["clean"] is None


def test_matrix_cells_format_rates_as_percent_and_name_bad_arguments():
    rows = [{**dict.fromkeys(matrix.FIELDS), "trigger": "blend", "rate": 0.05, "target": 4, "seed": 0,
             "defense": "strip", "far": 0.125, "asr_after": 0.04},
            {**dict.fromkeys(matrix.FIELDS), "trigger": "blend", "rate": 0.05, "target": 4, "seed": 0,
             "defense": "neural_cleanse", "flagged": [4]}]
    columns = {"STRIP FAR": ("strip", "far"), "NC flagged": ("neural_cleanse", "flagged")}
    row, = matrix.cells(rows, ["blend 5%"], columns, percent=("STRIP FAR",))
    assert row["model"] == "blend 5%" and row["STRIP FAR"] == "12.5%" and row["NC flagged"] != "12.5%"
    assert matrix.cells(rows, ["blend 5%"], columns)[0]["STRIP FAR"] != "12.5%"   # a fraction without percent=
    with pytest.raises(ValueError, match="models must"):
        matrix.cells(rows, ["sig 5%"], columns)
    with pytest.raises(ValueError, match="percent must .*ASR"):
        matrix.cells(rows, ["blend 5%"], columns, percent=("ASR",))


def test_matrix_rows_have_the_issue_fields_and_render(lab):
    rows = [{**dict.fromkeys(matrix.FIELDS), "trigger": "clean", "rate": 0.0, "seed": s, "defense": d,
             "flagged": [1] if s == 0 else [], "ca_before": 0.9, "ca_after": None}
            for s in range(2) for d in ("activation_clustering", "neural_cleanse")]
    rows.append({**dict.fromkeys(matrix.FIELDS), "trigger": "blend", "rate": 0.05, "target": 4, "seed": 0,
                 "defense": "neural_cleanse", "flagged": [4], "asr_before": 1.0, "asr_after": 0.1,
                 "ca_before": 0.9, "ca_after": 0.88})
    assert matrix.false_alarm_rates(rows) == {"activation_clustering": 0.5, "neural_cleanse": 0.5}
    assert matrix.detection_value(rows[-1]) == 1.0
    table = matrix.to_markdown(rows)
    assert "| blend 5% |" in table and "4 (4)" in table and "clean (seed 1)" in table
    assert len(matrix.plan(fast=False)) == 7 * 3 + 5 and len(matrix.plan(fast=True)) == 5
    # the full matrix keeps Neural Cleanse's full search; the live --fast one the quick search
    assert {s["nc_budget"] for s in matrix.plan()} == {"full"} and {s["nc_budget"] for s in matrix.plan(True)} == {"quick"}
    with pytest.raises(ValueError, match="nc_budget"):
        compare.Case(lab["clean"].model, lab["train"], lab["defender"], lab["eval"], nc_budget="slow")
    assert all(len(figure.axes) == 2 for figure in matrix.plot(rows))  # the heat map and its colorbar


def test_run_all_builds_the_table_from_the_runners(fmnist):
    """The function behind ``bench defenses`` and the README table, on a small real run."""
    train, test = fmnist
    small_train, _ = train.split(8_000, seed=0)
    small_test, _ = test.split(2_000, seed=1)
    printed = []
    rows = run_all_rows = compare.run_all(small_train, small_test, defenses=("activation_clustering", "strip",
                                                                             "fine_pruning"),
                                          progress=False, on_row=printed.append)
    assert [r["defense"] for r in rows] == ["setup", "activation_clustering", "strip", "fine_pruning"]
    assert printed == run_all_rows  # every row reached the caller as soon as it was ready
    setup, ac, strip, fp = rows
    assert setup["poisoned"] == 400 and setup["asr_backdoored"] > 0.9
    assert ac["flagged"] == [setup["target"]] and ac["f1"] > 0.8 and ac["flagged_on_clean_model"] == []
    # bench defenses runs the default analysis only; the matrix compares Chen et al.'s on the same clusters
    assert ac["asr_after"] < 0.2 and set(ac["f1_by_analysis"]) == {"size", "silhouette", "trusted"}
    assert strip["tpr"] > 0.8 and strip["asr_after"] < 0.2
    assert fp["asr_after"] < fp["asr_before"] and all(r["seconds"] > 0 for r in rows[1:])
    table = compare.to_markdown(rows)
    assert [line.split("|")[1].strip() for line in table.splitlines()[2:]] == [
        compare.NAMES[name] for name in ("activation_clustering", "strip", "fine_pruning")]
    assert plot_comparison(rows[1:]) is not None
    with pytest.raises(ValueError, match="defenses"):
        compare.run_all(small_train, small_test, defenses=("activation_clustering", "magic"), progress=False)


# --- bad input --------------------------------------------------------------------------------

def test_bad_inputs_raise_errors_naming_the_argument(lab):
    run = lab["runs"]["checkerboard"]
    model, data, defender = run.model, run.poison.dataset, lab["defender"]
    with pytest.raises(TypeError, match="model"):
        activation_clustering(nn.Linear(3, 2), data.subset(range(100)), progress=False)
    with pytest.raises(TypeError, match="model"):
        fine_prune(nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), defender, progress=False)
    with pytest.raises(ValueError, match="n_images"):
        neural_cleanse(model, defender.subset(range(50)), n_images=100, progress=False)
    with pytest.raises(ValueError, match="n_heldout"):
        neural_cleanse(model, defender.subset(range(500)), n_images=300, n_heldout=300, progress=False)
    with pytest.raises(ValueError, match="frr"):
        fit_strip(model, defender, frr=1.5)
    with pytest.raises(ValueError, match="n_calibration"):
        fit_strip(model, defender.subset(range(100)), n_calibration=500)
    with pytest.raises(ValueError, match="threshold"):
        neural_cleanse(model, defender, threshold=-1, progress=False)
    with pytest.raises(TypeError, match="log_norms must be True or False"):
        neural_cleanse(model, defender, log_norms="yes", progress=False)
    with pytest.raises(ValueError, match="silhouette_threshold"):
        activation_clustering(model, data.subset(range(100)), silhouette_threshold=2.0, progress=False)
    with pytest.raises(ValueError, match="n_components"):  # class 3 has no images: an empty class
        no_class_3 = data.subset((data.labels != 3).nonzero().flatten()[:500])
        activation_clustering(model, no_class_3, clean_data=defender, progress=False)
    with pytest.raises(ValueError, match="clean_data must hold images like data's"):  # trusted images of another kind
        colour = ImageDataset(torch.zeros(10, 3, 32, 32), torch.arange(10), data.classes)
        activation_clustering(model, data.subset(range(100)), clean_data=colour, progress=False)
    with pytest.raises(ValueError, match="contamination"):
        isolation_forest_outliers(data, features="pixel_stats", contamination=0.7)
    with pytest.raises(ValueError, match="model"):
        isolation_forest_outliers(data, features="learned")
    with pytest.raises(ValueError, match="features"):
        spectral_signatures(model, data, features=torch.zeros(3, 128))
    with pytest.raises(ValueError, match="score"):
        spectral_signatures(model, data, score="cubed")
    with pytest.raises(ValueError, match="clean_data must hold at least 40 trusted images of every class"):
        spectral_signatures(model, data, clean_data=defender.subset(range(100)), progress=False)
    with pytest.raises(ValueError, match="clean_data must hold at least 50 trusted images of every class"):
        activation_clustering(model, data, clean_data=defender.subset(range(300)), progress=False)
    with pytest.raises(ValueError, match="^also must be one of"):
        activation_clustering(model, data, clean_data=defender, also=("magic",), progress=False)
    with pytest.raises(TypeError, match="also must be a tuple"):
        activation_clustering(model, data, clean_data=defender, also="exclusionary", progress=False)
    with pytest.raises(ValueError, match="trusted_threshold"):
        activation_clustering(model, data, clean_data=defender, trusted_threshold=-0.5, progress=False)
    with pytest.raises(ValueError, match="labels"):
        unlearn(model, neural_cleanse(copy.deepcopy(model), defender, steps=5, n_images=50, progress=False),
                defender, labels=[11], progress=False)
    with pytest.raises(TypeError, match="indices"):  # 0.7 must not silently become index 0
        remove(data, torch.tensor([0.7]))
    with pytest.raises(ValueError, match="indices"):
        remove(data, torch.tensor([len(data)]))
    with pytest.raises(TypeError, match="channels"):
        prune(model, [0.7])
    with pytest.raises(ValueError, match="overlays"):
        strip_entropy(model, defender.images[:4], torch.zeros(4, 3, 28, 28))
    with pytest.raises(ValueError, match="clean_data"):
        two_classes = defender.subset(range(50))
        two_classes = ImageDataset(two_classes.images, two_classes.labels % 2, ("a", "b"), "two")
        neural_cleanse(model, two_classes, n_images=20, steps=5, progress=False)
    with pytest.raises(ValueError, match="trigger and target"):
        compare.Case(model, data, defender, lab["eval"], trigger=run.poison.trigger)
    with pytest.raises(ValueError, match="name"):
        compare.run_defense("magic", case_of(lab, "checkerboard"))
    with pytest.raises(ValueError, match="accept"):
        clean_accuracy(model, lab["eval"], accept=lambda images: torch.ones(3, dtype=torch.bool))


def test_removal_takes_a_boolean_mask_as_a_mask(lab):
    data = lab["runs"]["checkerboard"].poison.dataset.subset(range(100))
    mask = torch.zeros(100, dtype=torch.bool)
    mask[[3, 50, 99]] = True
    assert len(remove(data, mask)) == 97
    assert torch.equal(remove(data, mask).images, data.images[~mask])


@pytest.mark.parametrize("module", ["course_lib.grading", "course_lib.defenses", "course_lib.defenses.compare"])
def test_importing_grading_or_defenses_stays_light(module):
    """Opacus and pyplot load only when DP training or a plot is used (a fresh interpreter)."""
    code = (f"import sys, {module}; heavy = [m for m in ('opacus', 'matplotlib.pyplot') if m in sys.modules]; "
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "MPLBACKEND": "Agg"})
    assert out.stdout.strip() == "", f"importing {module} loaded {out.stdout.strip()}"


@pytest.mark.parametrize("family", FAMILIES)
def test_the_defense_pipeline_removes_the_backdoor_then_filters_at_run_time(lab, family, tmp_path):
    from course_lib.defenses import run_pipeline

    case = case_of(lab, family)
    before = fingerprint(case.model)
    row, parts = run_pipeline(case, cache_dir=tmp_path)
    assert fingerprint(case.model) == before, "the pipeline repairs a copy"
    # detect -> remove -> retrain: the poison found and the backdoor gone, at little cost in clean accuracy
    assert row["asr_before"] > 0.9 and row["f1"] >= 0.9 and row["flagged"] == [case.target]
    assert row["asr_retrained"] <= 0.1 and row["ca_retrained"] >= row["ca_before"] - 0.03
    assert parts["repaired"] is not case.model and row["flagged_samples"] == len(parts["detection"].flagged)
    # STRIP in front of the retrained model: a rejected input is not classified, so the ASR behind it
    # is at most what the filter lets through; it was fitted to reject 1% of clean inputs
    assert row["asr_filtered"] <= row["far"] + 1e-9 and row["frr"] <= 0.05
    assert row["seconds"] == pytest.approx(row["seconds_retrain"] + row["seconds_strip"], abs=0.11)
    assert not row["cached"] and not row["cached_retrain"] and not row["cached_strip"]
    # the same run again is loaded from the cache: same numbers, nothing recomputed
    again, _ = run_pipeline(case, cache_dir=tmp_path)
    assert again["cached"] and again["cached_retrain"] and again["cached_strip"]
    assert {k: v for k, v in again.items() if not k.startswith("cached")} == \
        {k: v for k, v in row.items() if not k.startswith("cached")}


def test_defense_results_are_cached_by_inputs_and_code(lab, tmp_path, monkeypatch):
    """A runner's result is read back equal (its result object included); another model, other data or
    edited defense code is computed afresh (course_lib.cache, tests/test_cache.py for the rules)."""
    from course_lib import cache

    case = compare.Case(lab["clean"].model, lab["train"], lab["defender"], lab["eval"], seed=0)
    row, found = compare.run_defense("isolation_forest_pixel_stats", case, cache_dir=tmp_path)
    again, found_again = compare.run_defense("isolation_forest_pixel_stats", case, cache_dir=tmp_path)
    assert (row["cached"], again["cached"]) == (False, True)
    assert {k: v for k, v in again.items() if k != "cached"} == {k: v for k, v in row.items() if k != "cached"}
    first, second = found["backdoored"], found_again["backdoored"]
    assert isinstance(second, SampleDetection) and torch.equal(second.scores, first.scores)
    assert torch.equal(second.flagged, first.flagged) and second.flagged_classes == first.flagged_classes
    # a case's key follows the model's weights and the data
    other = copy.deepcopy(lab["clean"].model)
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)
    assert compare.Case(other, lab["train"], lab["defender"], lab["eval"]).fingerprint() != case.fingerprint()
    fewer = lab["train"].subset(range(len(lab["train"]) - 1))
    assert compare.Case(lab["clean"].model, fewer, lab["defender"], lab["eval"]).fingerprint() != case.fingerprint()
    # editing the defense code changes the key: the result is computed again
    assert "course_lib.defenses" in compare.CODE
    monkeypatch.setattr(compare, "CODE", compare.CODE + ("course_lib.plots",))
    edited, _ = compare.run_defense("isolation_forest_pixel_stats", case, cache_dir=tmp_path)
    assert not edited["cached"] and len(list((tmp_path / "results").glob("isolation_forest_pixel_stats-*.pt"))) == 2


def test_the_pipeline_refuses_a_clean_model_and_unknown_detectors(lab):
    from course_lib.defenses import run_pipeline

    clean_case = compare.Case(lab["clean"].model, lab["train"], lab["defender"], lab["eval"], quick=True)
    with pytest.raises(ValueError, match="case"):
        run_pipeline(clean_case)
    with pytest.raises(ValueError, match="detector"):
        run_pipeline(case_of(lab, "checkerboard"), detector="neural_cleanse")
    with pytest.raises(TypeError, match="case"):
        run_pipeline("model")
