"""What the homework notebooks import: ``from course_lib import grading``.

This module holds no code of its own. It gathers, under one stable name, the homework's
checks and rules that notebooks, the autograder and the instructor's scripts call:
``grading.check_trigger(...)`` in a test cell, ``grading.MODEL_FILE``, ``grading.GradingFailure``.
The code lives in :mod:`course_lib.homework`, one job per module (its docstring has the
table): the rules and thresholds (:mod:`~course_lib.homework.rules`), the grading files
(:mod:`~course_lib.homework.files`), Part 1 (:mod:`~course_lib.homework.part1`), the grader's
own poisoning run (:mod:`~course_lib.homework.witness`), Part 2
(:mod:`~course_lib.homework.part2`) and the checks run in the student's kernel
(:mod:`~course_lib.homework.kernel`). Nothing in :mod:`course_lib.homework` imports this module.
"""
from __future__ import annotations

from .homework.files import GradingFiles, evaluation_data, grading_dir, grading_files
from .homework.kernel import (check_activations, check_attack_success, check_clean_accuracy, check_detector_on_planted,
                              check_distinct_triggers, check_poisoning, check_trigger, check_trigger_poisons,
                              check_zoo_fpr, check_zoo_tpr, check_zoo_verdicts, detector_report, student_function)
from .homework.part1 import (grader_trigger, legitimacy_images, load_student_model, recorded_trigger,
                             verify_attack_success, verify_backdoor_trigger, verify_clean_accuracy, verify_distinct,
                             verify_poisoning, verify_trigger_contract, verify_triggered)
from .homework.part2 import (activation_probe, planted_activations, verify_activations, verify_flags, verify_planted,
                             verify_zoo_fpr, verify_zoo_tpr, verify_zoo_verdicts, zoo_report)
from .homework.rules import (ARCHITECTURES, DISTINCT_IMAGES, FEEDBACK_WIDTH, GRADING_DIR_ENV, GRADING_SUBDIR,
                             LEGITIMACY_IMAGES, MAX_CA_DROP, MAX_MODEL_BYTES, MAX_REFERENCE_TARGET_RATE,
                             MAX_TRIGGER_COSINE, MAX_TRIGGER_RMS, MAX_ZOO_FPR, MIN_ASR, MIN_ATTACK_SUCCESS,
                             MIN_CLEAN_ACCURACY, MIN_ZOO_FOUND, MIN_ZOO_TPR, MODEL_FILE, TRIGGER_FUNCTIONS,
                             GradingFailure, Problems, all_problems, failure_lines)
from .homework.witness import recipe_for

__all__ = ["GradingFiles", "evaluation_data", "grading_dir", "grading_files", "check_activations",
           "check_attack_success", "check_clean_accuracy", "check_detector_on_planted", "check_distinct_triggers",
           "check_poisoning", "check_trigger", "check_trigger_poisons", "check_zoo_fpr", "check_zoo_tpr",
           "check_zoo_verdicts", "detector_report", "student_function", "grader_trigger", "legitimacy_images",
           "load_student_model", "recorded_trigger", "verify_attack_success", "verify_backdoor_trigger",
           "verify_clean_accuracy", "verify_distinct", "verify_poisoning", "verify_trigger_contract",
           "verify_triggered", "activation_probe", "planted_activations", "verify_activations", "verify_flags",
           "verify_planted", "verify_zoo_fpr", "verify_zoo_tpr", "verify_zoo_verdicts", "zoo_report",
           "ARCHITECTURES", "DISTINCT_IMAGES", "FEEDBACK_WIDTH", "GRADING_DIR_ENV", "GRADING_SUBDIR",
           "LEGITIMACY_IMAGES", "MAX_CA_DROP", "MAX_MODEL_BYTES", "MAX_REFERENCE_TARGET_RATE", "MAX_TRIGGER_COSINE",
           "MAX_TRIGGER_RMS", "MAX_ZOO_FPR", "MIN_ASR", "MIN_ATTACK_SUCCESS", "MIN_CLEAN_ACCURACY", "MIN_ZOO_FOUND",
           "MIN_ZOO_TPR", "MODEL_FILE", "TRIGGER_FUNCTIONS", "GradingFailure", "Problems", "all_problems",
           "failure_lines", "recipe_for"]
