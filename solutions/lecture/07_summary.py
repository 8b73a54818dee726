# Reference answers to the exercises of notebooks/07_summary.ipynb (instructor copy).
# Format: course_lib/exercises.py (load_solutions).

# %% answer 07-score
tpr, fpr = 950 / 1000, 450 / 19000
answer = tpr - fpr

# %% wrong 07-score: too low
answer = 950 / (950 + 450)   # the precision of the flags, not TPR - FPR

# %% answer 07-floor
import math
two_se = 2 * 100 * math.sqrt(2 * headline.clean_acc * (1 - headline.clean_acc) / 2000)   # in points: about 2.0
answer = math.ceil(two_se * 2) / 2    # 2.0 points: the lecture's one point is within the noise at n = 2,000

# %% wrong 07-floor: too low
import math
answer = math.ceil(2 * 100 * math.sqrt(headline.clean_acc * (1 - headline.clean_acc) / 2000) * 2) / 2  # one accuracy's noise

# %% written 07-plan
# 1. Prevention: provenance and label audits before training. Keep who uploaded each photo and when;
#    rate-limit and review new uploaders; re-label a random sample of the vendor's labels with a
#    trusted annotator and cross-check all labels with a model trained on trusted data. Cost: people
#    and time, no accuracy. What it misses: clean-label poisoning (every label correct, notebook 3),
#    and a poisoning rate as small as notebook 1's (a few dozen images among thousands).
# 2. Detection on the trained model and its data: Activation Clustering / Spectral Signatures over
#    the training set, Neural Cleanse on the model (notebook 6). Numbers: their TPR/FPR (appendix
#    A.2) and the detection matrix's misses (e.g. blend at 1% for AC, false alarms of Neural Cleanse
#    on clean models); their compute (seconds in notebook 6's table).
# 3. Mitigation when something is found: remove the flagged samples and retrain, and screen inputs
#    with STRIP at run time (notebook 6's pipeline). Numbers: the pipeline's clean-accuracy cost and
#    the ASR left after retraining and behind STRIP, and STRIP's false rejection rate (FRR) on clean
#    inputs, which every user pays.
# A good answer names the order's reason: each earlier line is cheaper and sees the attack before
# the model has learned it; the later ones catch what the earlier ones missed.
