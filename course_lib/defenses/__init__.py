"""Backdoor defenses of the Week 4 lecture, each one measured (``python -m course_lib bench defenses``
and, over many triggers, rates and clean models, ``python -m course_lib bench matrix``).

=============================  =====================================  ==============================
module                         what it does                           paper
=============================  =====================================  ==============================
:mod:`.base`                   the four kinds of defense and what
                               each returns (one interface per kind)
:mod:`.activation_clustering`  sample detector                        Chen et al. 2018
:mod:`.spectral_signatures`    sample detector                        Tran, Li & Madry 2018
:mod:`.sanitization`           sample detector (IsolationForest);     Liu, Ting & Zhou 2008; lecture
                               the lecture's transforms
:mod:`.neural_cleanse`         model detector; unlearning             Wang et al. 2019
:mod:`.strip`                  input detector (run time)              Gao et al. 2019
:mod:`.retraining`             mitigation: retrain without flagged
                               samples
:mod:`.fine_pruning`           mitigation: prune + fine-tune          Liu, Dolan-Gavitt & Garg 2018
:mod:`.dp_sgd`                 mitigation: DP-SGD with Opacus (and    Abadi et al. 2016
                               the lecture's batch noise, which
                               guarantees nothing)
:mod:`.scoring`                TPR/FPR/F1, mitigation score
:mod:`.compare`                one runner per defense: the table of
                               ``bench defenses`` and notebook 6
:mod:`.pipeline`               detect -> remove -> retrain -> STRIP,
                               end to end (``bench pipeline``)
:mod:`.matrix`                 the detection matrix
:mod:`.plots`                  every defense figure
=============================  =====================================  ==============================

No defense modifies the model or dataset it is given: mitigations return a repaired copy.
Their results can be cached on disk (:mod:`course_lib.cache`; ``run_defense(cache_dir=...)``).
Importing this package stays light: Opacus and matplotlib are loaded only when DP
training or a plot is first used (the grading code imports the package).
"""
from importlib import import_module

from .activation_clustering import ActivationClusteringResult, activation_clustering
from .activations import extract_features
from .base import InputDetector, LabelDetection, Mitigation, SampleDetection
from .fine_pruning import fine_prune, prune, pruning_curve, pruning_order
from .neural_cleanse import (NeuralCleanseResult, anomaly_index, chance_false_alarm_rate, flag_small_outliers,
                             neural_cleanse, unlearn, UNLEARN_LR)
from .retraining import remove, retrain_without
from .sanitization import isolation_forest_outliers, lecture_transform_sanitize, pixel_statistics
from .scoring import detection_scores, format_cell, mitigation_scores
from .spectral_signatures import SpectralSignaturesResult, spectral_signatures
from .strip import StripDetector, fit_strip, strip_entropy, strip_rates

_LAZY = {  # name -> module, imported on first use (heavy dependencies)
    "train_dp_sgd": ".dp_sgd", "lecture_batch_noise_training": ".dp_sgd",
    "plot_activation_clusters": ".plots", "plot_reversed_triggers": ".plots", "plot_anomaly_index": ".plots",
    "plot_pruning_curve": ".plots", "plot_strip_entropy": ".plots", "plot_comparison": ".plots",
    "plot_matrix": ".plots", "run_pipeline": ".pipeline",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "SampleDetection", "LabelDetection", "InputDetector", "Mitigation",
    "activation_clustering", "ActivationClusteringResult", "extract_features",
    "spectral_signatures", "SpectralSignaturesResult", "isolation_forest_outliers", "pixel_statistics",
    "neural_cleanse", "NeuralCleanseResult", "anomaly_index", "flag_small_outliers", "chance_false_alarm_rate",
    "fit_strip", "StripDetector", "strip_entropy", "strip_rates",
    "remove", "retrain_without", "unlearn", "UNLEARN_LR", "fine_prune", "prune", "pruning_order", "pruning_curve",
    "lecture_transform_sanitize", "detection_scores", "mitigation_scores", "format_cell", *_LAZY,
]
