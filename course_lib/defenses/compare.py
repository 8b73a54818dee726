"""One runner per defense: the rows of ``bench defenses``, of the detection matrix and of notebooks 6 and 6b.

The lecture ends with a table of stars that nobody measured (docs/DESIGN.md, erratum 11).
Here every defense has one *runner*, ``RUNNERS[name](case) -> (row, result, repaired model)``,
which runs it on one :class:`Case` (a model under test, its training data and the ground
truth) and scores it the same way every time. ``bench defenses`` (:func:`run_all`), the detection
matrix (:mod:`.matrix`) and notebooks 6 and 6b all call :func:`run_defense`, so their rows cannot
drift apart. A row (a dict) holds:

- ``tpr``, ``fpr``, ``f1`` for sample detectors, scored against the poisoned indices the
  attack returned (on a clean model, ``fpr`` is the share of its training set flagged);
  for STRIP, ``tpr`` is the share of triggered inputs rejected (1 - FAR) and ``fpr`` the
  share of clean inputs rejected (FRR), also given as ``far`` and ``frr``;
- ``flagged``: the classes (sample detectors) or labels (Neural Cleanse) accused, and
  ``flagged_on_clean_model`` the same on the clean control model, when one is given;
- ``anomaly_index``: Neural Cleanse's signed index per label;
- ``ca_before``/``ca_after``, ``asr_before``/``asr_after`` and the derived ``ca_drop``,
  ``asr_reduction`` and ``mitigation_score`` (see :mod:`.scoring`). "After" means: a fresh
  model retrained without the flagged samples (sample detectors; unchanged when nothing
  was flagged), the repaired copy (Neural Cleanse unlearning, Fine-Pruning), the model
  trained with the defense (sanitization, DP-SGD), or the model behind the STRIP filter,
  where a rejected input counts as not classified;
- ``seconds``: wall time of the defense including its mitigation, ``cpu_seconds`` the
  process's CPU time (wall time also counts other users of a shared machine).

The defender's trusted data (``Case.defender``: clean images the victim never saw) feed
Neural Cleanse, Fine-Pruning and STRIP; CA and ASR are measured on ``Case.eval``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field

import torch

from ..cache import cached, fingerprint
from ..checks import check_choice, check_dataset, check_model
from ..data import ImageDataset, load_splits
from ..experiments import run_backdoor, run_clean
from ..metrics import attack_success_rate, clean_accuracy
from ..train import pick_device
from .activation_clustering import MEASURED_ANALYSES, activation_clustering
from .activations import extract_features
from .fine_pruning import fine_prune, pruning_curve
from .neural_cleanse import anomaly_index, neural_cleanse, unlearn
from .retraining import retrain_without
from .sanitization import isolation_forest_outliers, lecture_transform_sanitize
from .scoring import detection_scores, format_cell, mitigation_scores
from .spectral_signatures import spectral_signatures
from .strip import fit_strip

DEFENDER_IMAGES = 5000  # clean test images the defender trusts (at most half); the rest measure CA and ASR
DP_QUICK_IMAGES = 10_000  # the quick budget's DP trainings (DP-SGD, the lecture's batch noise) use this many
STRIP_TEST_IMAGES = 1000  # STRIP blends every input 16 times: its rates are measured on this many eval images
SAMPLE_DETECTORS = ("activation_clustering", "spectral_signatures", "isolation_forest_features",
                    "isolation_forest_pixel_stats")
MODEL_DETECTORS = ("neural_cleanse",)
INPUT_DETECTORS = ("strip",)
MITIGATIONS = ("fine_pruning", "lecture_transform_sanitization", "dp_sgd", "lecture_batch_noise")
DEFENSES = SAMPLE_DETECTORS + MODEL_DETECTORS + ("fine_pruning",) + INPUT_DETECTORS + MITIGATIONS[1:]
PAPERS = {
    "activation_clustering": "Chen et al. 2018",
    "spectral_signatures": "Tran, Li & Madry 2018",
    "isolation_forest_features": "Liu, Ting & Zhou 2008 (on penultimate features)",
    "isolation_forest_pixel_stats": "lecture (IsolationForest on pixel statistics)",
    "neural_cleanse": "Wang et al. 2019",
    "fine_pruning": "Liu, Dolan-Gavitt & Garg 2018",
    "strip": "Gao et al. 2019",
    "lecture_transform_sanitization": "lecture (blur / rotation / brightness)",
    "dp_sgd": "Abadi et al. 2016 (Opacus)",
    "lecture_batch_noise": "lecture (batch-level noise, no guarantee)",
}
NAMES = {  # how a table or a printed line names each defense (the keys are the runners' identifiers)
    "activation_clustering": "Activation Clustering",
    "spectral_signatures": "Spectral Signatures",
    "isolation_forest_features": "IsolationForest (features)",
    "isolation_forest_pixel_stats": "IsolationForest (pixel stats)",
    "neural_cleanse": "Neural Cleanse",
    "fine_pruning": "Fine-Pruning",
    "strip": "STRIP",
    "lecture_transform_sanitization": "sanitization (lecture)",
    "dp_sgd": "DP-SGD",
    "lecture_batch_noise": "batch noise (lecture)",
}
# Neural Cleanse search budgets: the full one (Wang et al.'s scale) and a quick one for live runs.
# ``n_heldout``: trusted images that judge each kept reversed trigger (fewer when the defender
# has few). The full budget judges on 1,500: the smallest of many candidate masks that passes a
# small sample tends to pass it by luck, and with 600 the kept triggers' success on other images
# fell to 0.983-0.994 for the weakest label of a model (see neural_cleanse's docstring).
NC_SETTINGS = {"full": {"n_images": 700, "steps": 400, "n_heldout": 1500},
               "quick": {"n_images": 500, "steps": 200, "n_heldout": 600}}
#: The code a defense's result depends on (its cache key, :func:`course_lib.cache.code_version`):
#: every defense module, and the training, model, metric, data and attack code they call.
CODE = ("course_lib.defenses", "course_lib.train", "course_lib.models", "course_lib.metrics", "course_lib.data",
        "course_lib.attacks")


@dataclass
class Case:
    """One model under test, its training data and what the scoring needs.

    ``poisoned``: indices of the poisoned samples in ``train_data`` (empty for a clean
    model); ``trigger``/``target``: the planted backdoor (None for a clean model);
    ``defender``: trusted clean images; ``eval``: clean images that measure CA and ASR;
    ``epochs``/``arch``/``seed``/``device``: how the victim was trained (retraining repeats
    it); ``quick``: smaller search budgets, fewer fine-tuning epochs and DP trainings of one
    epoch on ``DP_QUICK_IMAGES`` samples, for live runs;
    ``nc_budget``: ``"full"`` or ``"quick"`` overrides ``quick`` for Neural Cleanse's search
    alone (the detection matrix keeps the full search: the quick one stopped before the
    clean labels' masks shrank, so it measured convergence, not backdoors);
    ``compare_analyses``: also compute the detectors' alternative rules on the same run
    (Activation Clustering's other analyses, which cost two more training runs), as the
    detection matrix does to choose the defaults.
    """

    model: torch.nn.Module
    train_data: ImageDataset
    defender: ImageDataset
    eval: ImageDataset
    poisoned: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    trigger: object = None
    target: int | None = None
    epochs: int = 2
    arch: str | None = None
    seed: int = 0
    device: object = None
    quick: bool = False
    nc_budget: str | None = None
    compare_analyses: bool = False
    progress: bool = False
    _features: torch.Tensor | None = field(default=None, repr=False)
    _before: tuple | None = field(default=None, repr=False)
    _fingerprint: str | None = field(default=None, repr=False)

    def __post_init__(self):
        check_model(self.model, "features")
        for name in ("train_data", "defender", "eval"):
            check_dataset(name, getattr(self, name))
        if self.nc_budget is not None:
            check_choice("nc_budget", self.nc_budget, tuple(NC_SETTINGS))
        if (self.trigger is None) != (self.target is None):
            raise ValueError("trigger and target must be given together (a backdoored model) or both be None")

    @property
    def backdoored(self) -> bool:
        return self.trigger is not None

    @property
    def features(self) -> torch.Tensor:
        """``model.features`` of the training set, computed once and shared by the detectors."""
        if self._features is None:
            self._features = extract_features(self.model, self.train_data.images, progress=self.progress)
        return self._features

    def fingerprint(self) -> str:
        """A short hash of everything a defense's result on this case depends on (its cache key,
        :func:`course_lib.cache.cached`), computed once: the model, the data sets, the poisoned
        indices, the trigger and the settings."""
        if self._fingerprint is None:
            self._fingerprint = fingerprint({
                "model": self.model, "train": self.train_data, "poisoned": torch.as_tensor(self.poisoned),
                "trigger": self.trigger, "target": self.target, "defender": self.defender, "eval": self.eval,
                "epochs": self.epochs, "arch": self.arch, "seed": self.seed, "device": str(pick_device(self.device)),
                "quick": self.quick, "nc_budget": self.nc_budget, "compare_analyses": self.compare_analyses})
        return self._fingerprint

    def measure(self, model) -> tuple[float, float | None]:
        """(CA, ASR) of ``model`` on ``eval`` (ASR None for a clean case)."""
        return clean_accuracy(model, self.eval), self.asr(model)

    def asr(self, model, accept=None) -> float | None:
        if not self.backdoored:
            return None
        return attack_success_rate(model, self.eval, self.trigger, self.target, accept=accept)

    @property
    def before(self) -> tuple[float, float | None]:
        """(CA, ASR) of the model under test, measured once."""
        if self._before is None:
            self._before = self.measure(self.model)
        return self._before


def _row(case: Case, name: str, start, *, detection=None, after=None, **fields) -> dict:
    """One result row (see the module docstring)."""
    ca, asr = case.before
    row = {"defense": name, "paper": PAPERS[name], "tpr": None, "fpr": None, "f1": None, "flagged": None,
           "flagged_on_clean_model": None, "ca_before": ca, "asr_before": asr, "ca_after": None,
           "asr_after": None, "ca_drop": None, "asr_reduction": None, "mitigation_score": None}
    if detection is not None:
        row.update({key: detection[key] for key in ("tpr", "fpr", "f1")})
    if after is not None:
        row.update(ca_after=after[0], asr_after=after[1])
        if asr is not None:
            row.update(mitigation_scores(ca_before=ca, ca_after=after[0], asr_before=asr, asr_after=after[1]))
    row.update(fields)
    row["seconds"] = round(time.perf_counter() - start[0], 1)
    row["cpu_seconds"] = round(time.process_time() - start[1], 1)
    return row


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _sample_detector(name: str, case: Case, detect) -> tuple[dict, object, object]:
    """Detect, score against the ground truth, retrain without the flagged samples."""
    start = _clock()
    found = detect(case)
    detection = detection_scores(found.flagged, case.poisoned, len(case.train_data))
    after = repaired = None
    if case.backdoored:
        repaired = case.model if len(found.flagged) == 0 else retrain_without(
            case.train_data, found.flagged, epochs=case.epochs, arch=case.arch, seed=case.seed,
            device=case.device, progress=case.progress).model
        after = case.before if repaired is case.model else case.measure(repaired)
    extra = {}
    if name == "activation_clustering":  # every analysis computed on the same clusters
        computed = [a for a in MEASURED_ANALYSES if set(a.split("+")) <= set(found.poisoned_by)]
        extra["f1_by_analysis"] = {a: detection_scores(found.flagged_by(a), case.poisoned, len(case.train_data))["f1"]
                                   for a in computed}
        extra["flagged_by_analysis"] = {a: found.classes_by(a) for a in computed}
        extra["splits"] = [_split_row(split, case.poisoned) for split in found.per_class]
    if name == "spectral_signatures":
        extra["tail"] = [round(v, 4) for v in found.tail.tolist()]
    return _row(case, name, start, detection=detection, after=after, flagged=found.flagged_classes,
                flagged_samples=len(found.flagged), **extra), found, repaired


def _split_row(split, poisoned: torch.Tensor) -> dict:
    """One class's Activation Clustering statistics and how much poison its clusters hold:
    enough to score any other threshold on the same clusters without rerunning."""
    def count(indices):
        return int(torch.isin(indices, poisoned).sum())

    return {"label": split.label, "relative_size": round(split.relative_size, 4),
            "silhouette": round(split.silhouette, 4),
            "trusted_share": _rounded(split.trusted_share), "recognition": _rounded(split.recognition),
            "suspect": split.suspect, "smaller": [len(split.smaller), count(split.smaller)],
            "larger": [len(split.cluster(0)), count(split.cluster(0))]}


def _rounded(pair):
    """A per-cluster statistic (larger, smaller) for a row: rounded, or None if not computed."""
    return None if pair is None else [round(v, 4) for v in pair]


def _activation_clustering(case: Case):
    # the matrix (``case.compare_analyses``) also scores Chen et al.'s analyses on the same clusters
    return _sample_detector("activation_clustering", case, lambda c: activation_clustering(
        c.model, c.train_data, features=c.features, clean_data=c.defender,
        also=MEASURED_ANALYSES if c.compare_analyses else (), epochs=c.epochs, arch=c.arch, device=c.device,
        seed=c.seed, progress=c.progress))


def _spectral_signatures(case: Case):
    row, found, repaired = _sample_detector("spectral_signatures", case, lambda c: spectral_signatures(
        c.model, c.train_data, clean_data=c.defender, features=c.features, progress=c.progress))
    # the paper's squared score, and the paper's removal from every class, beside the kit's default
    variants = {"squared": {"score": "squared", "clean_data": case.defender}, "every_class": {}}
    row["f1_by_score"] = {"one_sided": row["f1"]}
    for variant, options in variants.items():
        found_by = spectral_signatures(case.model, case.train_data, features=case.features, progress=False, **options)
        row["f1_by_score"][variant] = detection_scores(found_by.flagged, case.poisoned, len(case.train_data))["f1"]
    return row, found, repaired


def _isolation_forest(kind: str):
    name = "isolation_forest_features" if kind == "learned" else "isolation_forest_pixel_stats"
    # IsolationForest flags its ``contamination`` share of any data set by construction, so
    # its "false alarms" on a clean model are that input back (the row's fpr says so).
    return lambda case: _sample_detector(name, case, lambda c: isolation_forest_outliers(
        c.train_data, model=c.model, features=kind, seed=c.seed, progress=c.progress))


def _neural_cleanse(case: Case):
    start = _clock()
    settings = NC_SETTINGS[case.nc_budget or ("quick" if case.quick else "full")]
    n_images = min(settings["n_images"], len(case.defender) // 2)
    n_heldout = min(settings["n_heldout"], (len(case.defender) - n_images) // 2)  # the rest reports success
    found = neural_cleanse(case.model, case.defender, n_images=n_images, n_heldout=n_heldout,
                           steps=settings["steps"], seed=case.seed,
                           progress=case.progress)
    after = repaired = None
    if case.backdoored:
        repaired = case.model if not found.flagged else unlearn(
            case.model, found, case.defender, epochs=2 if case.quick else 5, seed=case.seed, device=case.device,
            progress=case.progress).model
        after = case.before if repaired is case.model else case.measure(repaired)
    linear = anomaly_index(found.norms)  # Wang et al.'s index, on the norms themselves, for comparison
    return _row(case, "neural_cleanse", start, after=after, flagged=found.flagged,
                anomaly_index=[round(v, 2) for v in found.anomaly_index.tolist()],
                flagged_linear=(linear > found.threshold).nonzero().flatten().tolist(),
                anomaly_index_linear=[round(v, 2) for v in linear.tolist()],
                mask_norms=[round(v, 1) for v in found.norms.tolist()],
                heldout_success_min=round(found.success.min().item(), 4),
                heldout_success=[round(v, 4) for v in found.success.tolist()],
                search_seconds=round(found.seconds, 1)), found, repaired


def _fine_pruning(case: Case):
    start = _clock()
    result = fine_prune(case.model, case.defender, epochs=2 if case.quick else 5, seed=case.seed,
                        device=case.device, progress=case.progress)
    row = _row(case, "fine_pruning", start, after=case.measure(result.model) if case.backdoored else None,
               pruned_fraction=round(result.fraction, 3), val_acc_before=round(result.val_acc_before, 4),
               val_acc_pruned=round(result.val_acc_pruned, 4), val_acc_after=round(result.val_acc_after, 4),
               tuned_images=result.tuned_images)
    return row, result, result.model


def strip_filter(case: Case, model=None) -> tuple[object, dict]:
    """Put ``model`` (default: the case's) behind a STRIP filter fitted on the defender's images.

    Returns the fitted detector and what it measured on ``STRIP_TEST_IMAGES`` eval images:
    ``frr`` (clean inputs rejected) and, for a backdoored case, ``far`` (triggered inputs let
    through) and ``after`` = (CA, ASR) behind the filter, where a rejected input counts as
    not classified. The STRIP runner and the defense pipeline (:mod:`.pipeline`) both use it.
    """
    model = case.model if model is None else model
    detector = fit_strip(model, case.defender, n_calibration=min(1000, len(case.defender) // 2), seed=case.seed)
    test = case.eval.subset(range(min(STRIP_TEST_IMAGES, len(case.eval))))
    rejected = detector.rejects(test.images)  # the filter's verdicts, computed once (16 blends per input)
    measured = {"frr": rejected.float().mean().item(), "far": None, "after": None}
    if case.backdoored:
        rejected_triggered = detector.rejects(case.trigger(test.images[test.labels != case.target]))
        measured["far"] = 1 - rejected_triggered.float().mean().item()
        # the metrics see the filter as ``accept``: given the same images, it answers the verdicts above
        measured["after"] = (clean_accuracy(model, test, accept=lambda images: ~rejected),
                             attack_success_rate(model, test, case.trigger, case.target,
                                                 accept=lambda images: ~rejected_triggered))
    return detector, measured


def _strip(case: Case):
    start = _clock()
    detector, measured = strip_filter(case)
    far, frr = measured["far"], measured["frr"]
    detection = {"tpr": None if far is None else 1 - far, "fpr": frr, "f1": None}
    return _row(case, "strip", start, detection=detection, after=measured["after"], far=far, frr=frr,
                frr_target=detector.frr), detector, None


def _trained_with(name: str, train_fn):
    """A mitigation that trains a new model on the (poisoned) training set."""
    def run(case: Case):
        start = _clock()
        result = train_fn(case)
        fields = {"train_images": len(dp_training_data(case))} if name in ("dp_sgd", "lecture_batch_noise") else {}
        if hasattr(result, "epsilon"):
            fields |= {"epsilon": None if result.epsilon is None else round(result.epsilon, 2),
                      "delta": result.delta, "noise_multiplier": result.noise_multiplier,
                      "max_grad_norm": result.max_grad_norm}
        return _row(case, name, start, after=case.measure(result.model), **fields), result, result.model
    return run


def _transform_sanitization(case: Case):
    sanitized = lecture_transform_sanitize(case.train_data, seed=case.seed)
    return retrain_without(sanitized, [], epochs=case.epochs, arch=case.arch, seed=case.seed, device=case.device,
                           progress=case.progress, paper=PAPERS["lecture_transform_sanitization"])


def dp_training_data(case: Case) -> ImageDataset:
    """The training set of the DP trainings: with ``quick``, its first ``DP_QUICK_IMAGES`` samples
    (per-example gradients make DP-SGD the slowest defense of a live run; the poisoned share
    stays that of the whole set, since the poison is spread at random)."""
    if not case.quick or len(case.train_data) <= DP_QUICK_IMAGES:
        return case.train_data
    return case.train_data.subset(range(DP_QUICK_IMAGES))


def _dp_sgd(case: Case):
    from .dp_sgd import train_dp_sgd  # Opacus loads only when DP-SGD runs
    return train_dp_sgd(dp_training_data(case), epochs=1 if case.quick else case.epochs, seed=case.seed,
                        progress=case.progress)


def _batch_noise(case: Case):
    from .dp_sgd import lecture_batch_noise_training
    return lecture_batch_noise_training(dp_training_data(case), epochs=1 if case.quick else case.epochs, seed=case.seed,
                                        progress=case.progress)


RUNNERS = {
    "activation_clustering": _activation_clustering,
    "spectral_signatures": _spectral_signatures,
    "isolation_forest_features": _isolation_forest("learned"),
    "isolation_forest_pixel_stats": _isolation_forest("pixel_stats"),
    "neural_cleanse": _neural_cleanse,
    "fine_pruning": _fine_pruning,
    "strip": _strip,
    "lecture_transform_sanitization": _trained_with("lecture_transform_sanitization", _transform_sanitization),
    "dp_sgd": _trained_with("dp_sgd", _dp_sgd),
    "lecture_batch_noise": _trained_with("lecture_batch_noise", _batch_noise),
}
CLASS_VERDICTS = SAMPLE_DETECTORS[:2] + MODEL_DETECTORS  # defenses whose verdict on a clean model means something


def run_defense(name: str, case: Case, clean_case: Case | None = None, *, cache_dir=None) -> tuple[dict, dict]:
    """Run defense ``name`` on ``case`` (and, for a detector with a class verdict, on the clean
    control ``clean_case``); return its row and ``{"backdoored": result, "clean": result,
    "repaired": model}``, where ``repaired`` is the model after the defense's mitigation (the
    retrained, unlearned, fine-pruned or DP-trained model; the model itself when a detector
    flagged nothing; None for STRIP, which repairs nothing, and for a clean case).

    With ``cache_dir``, a result computed before for the same models, data, settings and code
    is loaded instead (:mod:`course_lib.cache`); the row then says ``"cached": True`` and keeps the
    seconds measured when it was computed.
    """
    check_choice("name", name, DEFENSES)
    if clean_case is not None and not isinstance(clean_case, Case):
        raise TypeError(f"clean_case must be a Case or None, got {type(clean_case).__name__}")
    (row, result, repaired), hit = _run_cached(name, case, cache_dir)
    results = {"backdoored": result, "clean": None, "repaired": repaired}
    if clean_case is not None and name in CLASS_VERDICTS:
        (clean_row, results["clean"], _), clean_hit = _run_cached(name, clean_case, cache_dir)
        row = {**row, "flagged_on_clean_model": clean_row["flagged"],
               "seconds": round(row["seconds"] + clean_row["seconds"], 1),
               "cpu_seconds": round(row["cpu_seconds"] + clean_row["cpu_seconds"], 1)}
        hit = hit and clean_hit
    return ({**row, "cached": hit} if cache_dir is not None else row), results


def _run_cached(name: str, case: Case, cache_dir) -> tuple[tuple, bool]:
    """``RUNNERS[name](case)``, or its result from an earlier run with the same inputs and code."""
    return cached(cache_dir, name, lambda: RUNNERS[name](case), inputs={"case": case}, code=CODE)


def teaching_curve(case: Case, *, points: int = 9, eval_images: int | None = None, cache_dir=None):
    """Fine-Pruning's pruning curve on ``case``: CA and ASR as the last layer's channels are
    switched off, least active on the defender's images first, before any fine-tuning
    (:func:`.fine_pruning.pruning_curve`). It needs the trigger, which a defender does not
    have: it is for teaching, to show why pruning idle channels removes a backdoor. Measured
    on the first ``eval_images`` eval images (all by default); cached like a runner's result.
    """
    if not case.backdoored:
        raise ValueError("case must be a backdoored model: the curve measures its ASR")
    data = case.eval if eval_images is None else case.eval.subset(range(min(eval_images, len(case.eval))))
    curve, _ = cached(cache_dir, "pruning_curve", lambda: pruning_curve(
        case.model, case.defender, data, case.trigger, case.target, points=points),
        inputs={"case": case, "points": points, "eval_images": eval_images}, code=CODE)
    return curve


def setup_cases(train_data: ImageDataset | None = None, test_data: ImageDataset | None = None, *,
                fast: bool = False, epochs: int = 2, seed: int = 0, device=None, progress: bool = True
                ) -> tuple[Case, Case, dict]:
    """The models of ``bench defenses``: a BadNets model (the kit's checkerboard, 5% of the
    training set, target 0) and a clean model, as a :class:`Case` each, and a ``setup`` row.

    Data default to the offline Fashion-MNIST; ``fast`` trains on a 20,000-image subset. The
    defender trusts ``DEFENDER_IMAGES`` test images, the others measure CA and ASR.
    """
    if train_data is None or test_data is None:
        train_data, test_data = load_splits("fashion-mnist")
    if fast:
        train_data = train_data.split(min(20_000, len(train_data) - 1), seed=seed)[0]
    start = _clock()
    defender, evaluation = test_data.split(min(DEFENDER_IMAGES, len(test_data) // 2), seed=seed)
    backdoored = run_backdoor(train_data, evaluation, epochs=epochs, seed=seed, device=device, progress=progress)
    clean = run_clean(train_data, evaluation, epochs=epochs, seed=seed, device=device, progress=progress)
    common = dict(defender=defender, eval=evaluation, epochs=epochs, seed=seed, device=device, progress=progress)
    case = Case(backdoored.model, backdoored.poison.dataset, poisoned=backdoored.poison.indices,
                trigger=backdoored.poison.trigger, target=backdoored.poison.target, **common)
    clean_case = Case(clean.model, train_data, **common)
    setup = {"defense": "setup", "train_images": len(train_data), "poisoned": len(case.poisoned),
             "target": case.target, "ca_backdoored": case.before[0], "asr_backdoored": case.before[1],
             "ca_clean_model": clean_case.before[0],
             "asr_clean_model": attack_success_rate(clean.model, evaluation, case.trigger, case.target),
             "seconds": round(time.perf_counter() - start[0], 1),
             "cpu_seconds": round(time.process_time() - start[1], 1), "torch_threads": torch.get_num_threads()}
    return case, clean_case, setup


def run_all(train_data: ImageDataset | None = None, test_data: ImageDataset | None = None, *,
            fast: bool = False, defenses=DEFENSES, epochs: int = 2, seed: int = 0, device=None,
            progress: bool = True, on_row=None) -> list[dict]:
    """``bench defenses``: every defense on the models of :func:`setup_cases` (one BadNets,
    one clean); one row per defense, after the ``setup`` row.

    ``on_row(row)`` is called as soon as each row is ready (the CLI prints it).
    """
    for name in defenses:
        check_choice("defenses", name, DEFENSES)
    case, clean_case, setup = setup_cases(train_data, test_data, fast=fast, epochs=epochs, seed=seed,
                                          device=device, progress=progress)
    rows = [setup]
    if on_row:
        on_row(setup)
    for name in defenses:
        row, _ = run_defense(name, case, clean_case)
        if name == "fine_pruning":
            curve = teaching_curve(case)
            row["curve"] = {"fractions": [round(f, 3) for f in curve.fractions],
                            "clean_acc": [round(v, 4) for v in curve.clean_acc],
                            "asr": [round(v, 4) for v in curve.asr]}
        rows.append(row)
        if on_row:
            on_row(row)
    return rows


def to_markdown(results: list[dict]) -> str:
    """The comparison as a markdown table: rates in percent, flagged classes as their labels,
    the mitigation score to one decimal (notebook 7's appendix A.2 shows it to three places, to
    reproduce it), seconds of wall time."""
    def percent(value):
        return "-" if value is None else f"{100 * value:.1f}%"

    header = ("| Defense | Paper | TPR | FPR | F1 | Labels flagged (backdoored) | Labels flagged (clean model) | "
              "CA before -> after | ASR before -> after | Mitigation score | Seconds |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for row in results:
        if row["defense"] == "setup":
            continue
        lines.append(
            f"| {NAMES[row['defense']]} | {row['paper']} | {percent(row['tpr'])} | {percent(row['fpr'])} | "
            f"{format_cell(row['f1'])} | {format_cell(row['flagged'])} | "
            f"{format_cell(row['flagged_on_clean_model'])} | "
            f"{percent(row['ca_before'])} -> {percent(row['ca_after'])} | "
            f"{percent(row['asr_before'])} -> {percent(row['asr_after'])} | "
            f"{format_cell(row['mitigation_score'], 1)} | {row['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    """``bench defenses [--json] [--fast] [--seed N]``: run the comparison and print it."""
    parser = argparse.ArgumentParser(prog="python -m course_lib bench defenses",
                                     description="Run every backdoor defense on a BadNets and a clean model.")
    parser.add_argument("--json", action="store_true", help="print one JSON object per defense per line")
    parser.add_argument("--fast", action="store_true", help="train on a 20,000-image subset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--defenses", nargs="+", default=list(DEFENSES), choices=DEFENSES, metavar="NAME")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars (stderr)")
    args = parser.parse_args(argv)
    start = _clock()
    results = run_all(fast=args.fast, defenses=args.defenses, seed=args.seed, progress=not args.no_progress,
                      on_row=row_printer(args.json))
    total = {"defense": "total", "seconds": round(time.perf_counter() - start[0], 1),
             "cpu_seconds": round(time.process_time() - start[1], 1)}
    print_end(results, total, as_json=args.json, markdown=to_markdown)
    return 0


def row_printer(as_json: bool):
    """For ``--json``: print each row as one JSON line as soon as it is ready (else None)."""
    return (lambda row: print(json.dumps(row), flush=True)) if as_json else None


def print_end(rows: list[dict], total: dict, *, as_json: bool, markdown) -> None:
    """End a bench run: the total as a last JSON line (the rows are printed already), or the
    markdown table and the wall time."""
    if as_json:
        print(json.dumps(total), flush=True)
    else:
        print(markdown(rows))
        print(f"\ntotal wall time: {total['seconds']} s")


if __name__ == "__main__":
    sys.exit(main())
