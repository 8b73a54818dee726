"""Backdoor defenses of the Week 4 lecture, each one measured (``python -m course_lib bench defenses``).

=============================  =====================================  ==============================
module                         what it does                           paper
=============================  =====================================  ==============================
:mod:`.activation_clustering`  flags poisoned training samples        Chen et al. 2018
:mod:`.spectral_signatures`    flags poisoned training samples        Tran, Li & Madry 2018
:mod:`.neural_cleanse`         flags backdoored labels; unlearning    Wang et al. 2019
:mod:`.fine_pruning`           repairs a model: prune + fine-tune     Liu, Dolan-Gavitt & Garg 2018
:mod:`.strip`                  rejects triggered inputs at run time   Gao et al. 2019
:mod:`.sanitization`           the lecture's transforms; outliers     Liu, Ting & Zhou 2008
:mod:`.dp_sgd`                 DP-SGD with Opacus (and the lecture's  Abadi et al. 2016
                               batch noise, which guarantees nothing)
:mod:`.scoring`                TPR/FPR/F1, mitigation score
:mod:`.compare`                runs them all: table, figure, CLI
=============================  =====================================  ==============================

No defense modifies the model or dataset it is given: mitigations return a repaired copy.
"""
from .activation_clustering import ActivationClusteringResult, activation_clustering, plot_activation_clusters
from .activations import extract_features
from .dp_sgd import lecture_batch_noise_training, train_dp_sgd
from .fine_pruning import fine_prune, plot_pruning_curve, prune, pruning_curve, pruning_order
from .neural_cleanse import (NeuralCleanseResult, anomaly_index, flag_small_outliers, neural_cleanse,
                             plot_reversed_triggers, unlearn)
from .sanitization import isolation_forest_outliers, lecture_transform_sanitize, pixel_statistics, remove
from .scoring import detection_scores, mitigation_scores
from .spectral_signatures import SpectralSignaturesResult, spectral_signatures
from .strip import StripDetector, fit_strip, plot_strip_entropy, strip_entropy, strip_rates

__all__ = [
    "activation_clustering", "ActivationClusteringResult", "plot_activation_clusters", "extract_features",
    "spectral_signatures", "SpectralSignaturesResult", "neural_cleanse", "NeuralCleanseResult", "anomaly_index",
    "flag_small_outliers", "unlearn", "plot_reversed_triggers", "fine_prune", "prune", "pruning_order",
    "pruning_curve", "plot_pruning_curve", "fit_strip", "StripDetector", "strip_entropy", "strip_rates",
    "plot_strip_entropy", "lecture_transform_sanitize", "isolation_forest_outliers", "pixel_statistics", "remove",
    "train_dp_sgd", "lecture_batch_noise_training", "detection_scores", "mitigation_scores",
]
