"""The defense comparison table, built from runs: ``python -m course_lib bench defenses``.

The lecture ends with a table of stars that nobody measured (docs/DESIGN.md, erratum 11).
:func:`run_all` instead trains one BadNets model and one clean model on the offline
default dataset (Fashion-MNIST, the kit's default 3x3 checkerboard trigger, 5% of the
training set poisoned toward class 0) and runs every defense on them. Each defense
yields one row (a dict) with:

- ``tpr``, ``fpr``, ``f1`` for defenses that flag training samples, scored against the
  poisoned indices the attack returned; for STRIP, which flags test *inputs*, TPR is the
  share of triggered inputs rejected (1 - FAR) and FPR the share of clean inputs rejected;
- ``flagged``: the classes/labels a defense accuses on the backdoored model, and
  ``flagged_on_clean_model`` the same on the clean model (false alarms);
- ``ca_before``/``ca_after``, ``asr_before``/``asr_after`` and the derived ``ca_drop``,
  ``asr_reduction`` and ``mitigation_score`` (see :mod:`.scoring`). "After" means: the
  model retrained without the flagged samples (detectors of samples), the repaired copy
  (Neural Cleanse unlearning, Fine-Pruning), the model trained with the defense
  (sanitization, DP-SGD), or the model behind the STRIP filter, where a rejected input
  counts as not classified (neither correct nor the target);
- ``seconds``: wall time of the defense, including any retraining.

The clean half of the test set is the defender's trusted data (Neural Cleanse, Fine-
Pruning, STRIP); CA and ASR are measured on the other half.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import matplotlib.pyplot as plt
import numpy as np
import torch

from ..data import ImageDataset, load_splits
from ..experiments import run_backdoor, run_clean
from ..metrics import attack_success_rate, clean_accuracy
from ..models import model_for
from ..train import pick_device, predict, train
from .sanitization import isolation_forest_outliers, lecture_transform_sanitize, remove
from .activation_clustering import activation_clustering
from .activations import extract_features
from .dp_sgd import lecture_batch_noise_training, train_dp_sgd
from .fine_pruning import fine_prune, pruning_curve
from .neural_cleanse import neural_cleanse, unlearn
from .scoring import detection_scores, mitigation_scores
from .spectral_signatures import spectral_signatures
from .strip import fit_strip

DEFENSES = ("activation_clustering", "spectral_signatures", "isolation_forest_features",
            "isolation_forest_pixel_stats", "neural_cleanse", "fine_pruning", "strip",
            "lecture_transform_sanitization", "dp_sgd", "lecture_batch_noise")
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
DEFENDER_IMAGES = 5000  # clean test images the defender trusts (at most half); the rest measure CA and ASR


def _clock() -> tuple[float, float]:
    """Wall time and CPU time (all threads) now. On a shared machine wall time also counts
    the other users; CPU time does not, so rows carry both."""
    return time.perf_counter(), time.process_time()


class _Bench:
    """The shared state of one comparison: data, the two models, their features."""

    def __init__(self, train_data, test_data, *, epochs, seed, device, progress):
        self.seed, self.progress, self.epochs = seed, progress, epochs
        self.device = pick_device(device)
        self.defender, self.eval = test_data.split(min(DEFENDER_IMAGES, len(test_data) // 2), seed=seed)
        self.backdoored = run_backdoor(train_data, self.eval, epochs=epochs, seed=seed, device=self.device,
                                       progress=progress)
        self.clean = run_clean(train_data, self.eval, epochs=epochs, seed=seed, device=self.device,
                               progress=progress)
        self.poison = self.backdoored.poison
        self.clean_train = train_data
        self.features = extract_features(self.backdoored.model, self.poison.dataset.images, progress=progress)
        self.clean_features = extract_features(self.clean.model, train_data.images, progress=progress)

    def measure(self, model) -> tuple[float, float]:
        """(CA, ASR) of ``model`` on the evaluation half of the test set."""
        return (clean_accuracy(model, self.eval),
                attack_success_rate(model, self.eval, self.poison.trigger, self.poison.target))

    def retrain(self, data: ImageDataset):
        """A fresh model trained like the backdoored one, on ``data``."""
        model = model_for(data, seed=self.seed)
        train(model, data, epochs=self.epochs, seed=self.seed, device=self.device, progress=self.progress)
        return model

    def row(self, name, start, *, after=None, detection=None, **fields) -> dict:
        """Assemble one result row; ``after`` is (CA, ASR) after the defense, if it mitigates."""
        ca, asr = self.backdoored.clean_acc, self.backdoored.asr
        row = {"defense": name, "paper": PAPERS[name], "tpr": None, "fpr": None, "f1": None,
               "flagged": None, "flagged_on_clean_model": None, "ca_before": ca, "asr_before": asr,
               "ca_after": None, "asr_after": None, "ca_drop": None, "asr_reduction": None,
               "mitigation_score": None}
        if detection is not None:
            row.update({key: detection[key] for key in ("tpr", "fpr", "f1")})
        if after is not None:
            row.update(ca_after=after[0], asr_after=after[1])
            row.update(mitigation_scores(ca_before=ca, ca_after=after[0], asr_before=asr, asr_after=after[1]))
        row.update(fields)
        row["seconds"] = round(time.perf_counter() - start[0], 1)
        row["cpu_seconds"] = round(time.process_time() - start[1], 1)
        return row

    def sample_detector_row(self, name, start, flagged, flagged_clean, classes=None, classes_clean=None, **fields):
        """Score flagged training samples, retrain without them, and build the row.

        ``flagged_clean``: what the detector flags on the clean model's training set, or None
        for a detector whose flagged fraction is an input (then ``clean_model_fpr`` is None).
        """
        detection = detection_scores(flagged, self.poison.indices, len(self.poison.dataset))
        after = self.measure(self.retrain(remove(self.poison.dataset, flagged)))
        return self.row(name, start, after=after, detection=detection, flagged=classes,
                        flagged_on_clean_model=classes_clean,
                        clean_model_fpr=None if flagged_clean is None else len(flagged_clean) / len(self.clean_train),
                        **fields)


def _activation_clustering(b: _Bench) -> dict:
    start = _clock()
    found = activation_clustering(b.backdoored.model, b.poison.dataset, features=b.features, seed=b.seed,
                                  progress=b.progress)
    on_clean = activation_clustering(b.clean.model, b.clean_train, features=b.clean_features, seed=b.seed,
                                     progress=b.progress)
    return b.sample_detector_row("activation_clustering", start, found.suspicious, on_clean.suspicious,
                                 found.flagged_classes, on_clean.flagged_classes)


def _spectral_signatures(b: _Bench) -> dict:
    start = _clock()
    found = spectral_signatures(b.backdoored.model, b.poison.dataset, features=b.features, progress=b.progress)
    on_clean = spectral_signatures(b.clean.model, b.clean_train, features=b.clean_features, progress=b.progress)
    return b.sample_detector_row("spectral_signatures", start, found.suspicious, on_clean.suspicious,
                                 found.flagged_classes, on_clean.flagged_classes)


def _isolation_forest(b: _Bench, kind: str) -> dict:
    start = _clock()
    name = "isolation_forest_features" if kind == "learned" else "isolation_forest_pixel_stats"
    found = isolation_forest_outliers(b.poison.dataset, model=b.backdoored.model, features=kind,
                                      seed=b.seed, progress=b.progress)
    # No clean-model run: IsolationForest removes its ``contamination`` fraction of any data
    # set by construction, so its "false alarms on a clean model" would be that input back.
    return b.sample_detector_row(name, start, found, None)


def _neural_cleanse(b: _Bench) -> dict:
    start = _clock()
    n_images = min(1000, len(b.defender))
    found = neural_cleanse(b.backdoored.model, b.defender, n_images=n_images, seed=b.seed, progress=b.progress)
    on_clean = neural_cleanse(b.clean.model, b.defender, n_images=n_images, seed=b.seed, progress=b.progress)
    after = None
    if found.flagged:
        after = b.measure(unlearn(b.backdoored.model, found, b.defender, seed=b.seed,
                                  device=b.device, progress=b.progress))
    target = b.poison.target
    return b.row("neural_cleanse", start, after=after, flagged=found.flagged,
                 flagged_on_clean_model=on_clean.flagged,
                 target_anomaly_index=round(found.anomaly_index[target].item(), 2),
                 max_anomaly_index_clean_model=round(on_clean.anomaly_index.max().item(), 2),
                 search_seconds=[round(found.seconds, 1), round(on_clean.seconds, 1)],
                 mask_norms=[round(v, 1) for v in found.norms.tolist()],
                 mask_norms_clean_model=[round(v, 1) for v in on_clean.norms.tolist()])


def _fine_pruning(b: _Bench) -> dict:
    start = _clock()
    result = fine_prune(b.backdoored.model, b.defender, seed=b.seed, device=b.device, progress=b.progress)
    row = b.row("fine_pruning", start, after=b.measure(result.model), pruned_fraction=round(result.fraction, 3))
    curve = pruning_curve(b.backdoored.model, b.defender, b.eval, b.poison.trigger, b.poison.target, points=9)
    row["curve"] = {"fractions": [round(f, 3) for f in curve.fractions],
                    "clean_acc": [round(v, 4) for v in curve.clean_acc], "asr": [round(v, 4) for v in curve.asr]}
    return row


def _strip(b: _Bench) -> dict:
    start = _clock()
    n_calibration = min(1000, len(b.defender) // 2)
    detector = fit_strip(b.backdoored.model, b.defender, n_calibration=n_calibration, seed=b.seed)
    keep = b.eval.labels != b.poison.target
    triggered = b.poison.trigger(b.eval.images[keep])
    rejected_clean, rejected_triggered = detector.rejects(b.eval.images), detector.rejects(triggered)
    predicted_clean = predict(b.backdoored.model, b.eval.images)
    predicted_triggered = predict(b.backdoored.model, triggered)
    after = (((predicted_clean == b.eval.labels) & ~rejected_clean).float().mean().item(),
             ((predicted_triggered == b.poison.target) & ~rejected_triggered).float().mean().item())
    clean_detector = fit_strip(b.clean.model, b.defender, n_calibration=n_calibration, seed=b.seed)
    detection = {"tpr": rejected_triggered.float().mean().item(), "fpr": rejected_clean.float().mean().item(),
                 "f1": None}
    return b.row("strip", start, after=after, detection=detection, far=1 - detection["tpr"], frr_target=detector.frr,
                 clean_model_rejects_triggered=clean_detector.rejects(triggered).float().mean().item())


def _transform_sanitization(b: _Bench) -> dict:
    start = _clock()
    sanitized = lecture_transform_sanitize(b.poison.dataset, seed=b.seed)
    return b.row("lecture_transform_sanitization", start, after=b.measure(b.retrain(sanitized)))


def _dp_sgd(b: _Bench) -> dict:
    start = _clock()
    result = train_dp_sgd(b.poison.dataset, epochs=b.epochs, seed=b.seed, progress=b.progress)
    return b.row("dp_sgd", start, after=b.measure(result.model), epsilon=round(result.epsilon, 2),
                 delta=result.delta, noise_multiplier=result.noise_multiplier, max_grad_norm=result.max_grad_norm)


def _batch_noise(b: _Bench) -> dict:
    start = _clock()
    result = lecture_batch_noise_training(b.poison.dataset, epochs=b.epochs, seed=b.seed, progress=b.progress)
    return b.row("lecture_batch_noise", start, after=b.measure(result.model), epsilon=None,
                 noise_multiplier=result.noise_multiplier, max_grad_norm=result.max_grad_norm)


RUNNERS = {
    "activation_clustering": _activation_clustering,
    "spectral_signatures": _spectral_signatures,
    "isolation_forest_features": lambda b: _isolation_forest(b, "learned"),
    "isolation_forest_pixel_stats": lambda b: _isolation_forest(b, "pixel_stats"),
    "neural_cleanse": _neural_cleanse,
    "fine_pruning": _fine_pruning,
    "strip": _strip,
    "lecture_transform_sanitization": _transform_sanitization,
    "dp_sgd": _dp_sgd,
    "lecture_batch_noise": _batch_noise,
}


def run_all(train_data: ImageDataset | None = None, test_data: ImageDataset | None = None, *,
            fast: bool = False, defenses=DEFENSES, epochs: int = 2, seed: int = 0, device=None,
            progress: bool = True, on_row=None) -> list[dict]:
    """Run ``defenses`` on a BadNets model and a clean model; return one row per defense.

    Data default to the offline Fashion-MNIST. ``fast`` trains on a 20,000-image subset.
    ``on_row(row)`` is called as soon as each row is ready (the CLI prints it).
    """
    unknown = [d for d in defenses if d not in RUNNERS]
    if unknown:
        raise ValueError(f"defenses must be names from {DEFENSES}, got unknown {unknown}")
    if train_data is None or test_data is None:
        train_data, test_data = load_splits("fashion-mnist")
    if fast:
        train_data = train_data.split(min(20_000, len(train_data) - 1), seed=seed)[0]
    start = _clock()
    bench = _Bench(train_data, test_data, epochs=epochs, seed=seed, device=device, progress=progress)
    setup = {"defense": "setup", "train_images": len(train_data), "poisoned": len(bench.poison.indices),
             "target": bench.poison.target, "ca_backdoored": bench.backdoored.clean_acc,
             "asr_backdoored": bench.backdoored.asr, "ca_clean_model": bench.clean.clean_acc,
             "asr_clean_model": attack_success_rate(bench.clean.model, bench.eval, bench.poison.trigger,
                                                    bench.poison.target),
             "seconds": round(time.perf_counter() - start[0], 1),
             "cpu_seconds": round(time.process_time() - start[1], 1), "torch_threads": torch.get_num_threads()}
    rows = [setup]
    if on_row:
        on_row(setup)
    for name in defenses:
        rows.append(RUNNERS[name](bench))
        if on_row:
            on_row(rows[-1])
    return rows


def _cell(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, list):
        return "none" if not value else ", ".join(map(str, value))
    return str(value)


def to_markdown(results: list[dict]) -> str:
    """The comparison as a markdown table (rates as fractions, seconds of wall time)."""
    header = ("| Defense | Paper | TPR | FPR | F1 | Flagged (backdoored) | Flagged (clean model) | "
              "CA before -> after | ASR before -> after | Mitigation score | Seconds |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for row in results:
        if row["defense"] == "setup":
            continue
        lines.append(
            f"| {row['defense']} | {row['paper']} | {_cell(row['tpr'])} | {_cell(row['fpr'], 3)} | "
            f"{_cell(row['f1'])} | {_cell(row['flagged'])} | {_cell(row['flagged_on_clean_model'])} | "
            f"{_cell(row['ca_before'], 3)} -> {_cell(row['ca_after'], 3)} | "
            f"{_cell(row['asr_before'], 3)} -> {_cell(row['asr_after'], 3)} | "
            f"{_cell(row['mitigation_score'], 1)} | {row['seconds']:.0f} |")
    return "\n".join(lines)


def plot(results: list[dict]):
    """Bar chart of CA and ASR after each defense (dashed lines: before), and wall times."""
    rows = [r for r in results if r["defense"] != "setup"]
    names = [r["defense"].replace("_", " ") for r in rows]
    y = np.arange(len(rows))
    fig, (ax, ax_time) = plt.subplots(1, 2, figsize=(10, 0.45 * len(rows) + 1.5), sharey=True,
                                      gridspec_kw={"width_ratios": [3, 1]})
    ca = [np.nan if r["ca_after"] is None else r["ca_after"] for r in rows]
    asr = [np.nan if r["asr_after"] is None else r["asr_after"] for r in rows]
    ax.barh(y - 0.2, ca, height=0.4, label="clean accuracy after")
    ax.barh(y + 0.2, asr, height=0.4, label="attack success rate after")
    ax.axvline(rows[0]["ca_before"], color="C0", linestyle="--", label="CA before")
    ax.axvline(rows[0]["asr_before"], color="C1", linestyle="--", label="ASR before")
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.05)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("CA and ASR after each defense (none = detection only)", fontsize=9)
    ax_time.barh(y, [r["seconds"] for r in rows], color="gray")
    ax_time.set_xlabel("seconds", fontsize=8)
    ax_time.set_title("wall time", fontsize=9)
    fig.tight_layout()
    return fig


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
    printer = (lambda row: print(json.dumps(row), flush=True)) if args.json else None
    results = run_all(fast=args.fast, defenses=args.defenses, seed=args.seed, progress=not args.no_progress,
                      on_row=printer)
    total = round(time.perf_counter() - start[0], 1)
    if args.json:
        print(json.dumps({"defense": "total", "seconds": total,
                          "cpu_seconds": round(time.process_time() - start[1], 1)}), flush=True)
    else:
        print(to_markdown(results))
        print(f"\ntotal wall time: {total} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
