# Reference answers to the exercises of notebooks/03_clean_vs_dirty_label.ipynb (instructor copy).
# Format: course_lib/exercises.py (load_solutions).

# %% answer 03-noops
def choose_poison(labels, rate, target, seed):
    """Draw round(rate * N) images among those whose label is not the target (what attacks.badnets does)."""
    rng = np.random.default_rng(seed)
    candidates = (labels != target).nonzero().flatten().numpy()
    return rng.choice(candidates, round(rate * len(labels)), replace=False)

# %% wrong 03-noops: already in the target class
def choose_poison(labels, rate, target, seed):
    """The lecture's sketch, unrepaired."""
    rng = np.random.default_rng(seed)
    return rng.choice(len(labels), round(rate * len(labels)), replace=False)

# %% answer 03-bound
# Every pixel moves by at most EPS, so MSE <= EPS ** 2 and PSNR = 10 log10(1 / MSE) >= 10 log10(1 / EPS ** 2)
# (about 18 dB for 32/255). The poisoned images break the bound: the trigger is stamped on top of the PGD
# perturbation, outside the budget, and changes its pixels by up to 1.
bound = 10 * np.log10(1 / EPS ** 2)
answer = (bound, stealth_summary(lab.train.images[idx], consistent.dataset.images[idx])["psnr"] >= bound)

# %% wrong 03-bound: the bound: too low
answer = (10 * np.log10(1 / EPS), True)   # PSNR from eps instead of eps squared (MSE is a mean of SQUARED changes)

# %% written 03-budget
# Hold fixed: the trigger (this notebook's 5x5 checkerboard), the victim's training (data, epochs,
# seed), the target class, and the NUMBER of poisoned training images (not the rate of different
# pools: BadNets draws from every non-target image, the label-consistent attack only from the
# target class, which holds about a tenth of the data).
# Try, e.g., 50, 100, 200, 500 and 1,000 poisoned images for both attacks (1,000 is half of the
# target class here, the label-consistent attack's largest sensible budget), a few seeds each.
# Plot the ASR (non-target test images) against the number of poisoned images, one curve per
# attack, and report the clean accuracy beside it.
# Expect the label-consistent attack to need more images for the same ASR: its poisoned images
# are correctly labelled target-class images, which the network can also explain by their content,
# so the trigger is a weaker signal than in BadNets, where the wrong label can only be explained
# by the trigger. Its gain is stealth: no label is wrong, so a label audit by eye finds nothing.
