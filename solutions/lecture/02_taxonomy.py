# Reference answers to the exercises of notebooks/02_taxonomy.ipynb (instructor copy).
# Format: course_lib/exercises.py (load_solutions).

# %% answer 02-flip
def flip_labels(labels, rate, seed):
    """Random label flipping that always changes the label: add 1..9 to it, modulo 10."""
    rng = np.random.default_rng(seed)
    poisoned = labels.numpy().copy()
    chosen = rng.choice(len(poisoned), round(rate * len(poisoned)), replace=False)
    poisoned[chosen] = (poisoned[chosen] + rng.integers(1, 10, len(chosen))) % 10
    return poisoned

# %% wrong 02-flip: it keeps some chosen labels
def flip_labels(labels, rate, seed):
    """The lecture's sketch, unrepaired."""
    rng = np.random.default_rng(seed)
    poisoned = labels.numpy().copy()
    chosen = rng.choice(len(poisoned), round(rate * len(poisoned)), replace=False)
    for idx in chosen:
        poisoned[idx] = rng.integers(0, 10)
    return poisoned

# %% answer 02-alarm
clean_per_class = per_class_accuracy(clean.model)

def largest_drop(model):
    """The largest fall of one class's accuracy below the clean model's, in points."""
    return max(100 * (c - a) for c, a in zip(clean_per_class, per_class_accuracy(model)))

t = int(np.ceil(max(0.0, largest_drop(flipped[0.2].model)) - 1e-9))   # silent on honest noise, and no higher
answer = (t, {rate: largest_drop(targeted[rate].model) > t for rate in TARGETED_RATES})

# %% wrong 02-alarm: too low
t = int(np.ceil(points(clean.clean_acc, flipped[0.2].clean_acc)))     # the OVERALL drop: a class falls further
answer = (t, {rate: True for rate in TARGETED_RATES})

# %% written 02-detect
# Not necessarily: a 1.5-point drop is within what a change of data or of training can cause, so
# look before you conclude. Next steps with this notebook's tools:
# - the per-class accuracies and the confusion matrix of the new model against the old one: random
#   flipping lowers many classes a little (unevenly); targeted flipping takes a large share of ONE
#   source class and sends it to ONE target class, a single bright off-diagonal cell;
# - the new labels themselves: cross-check them with the old model (how many labels does it
#   disagree with, and are the disagreements spread over all pairs of classes or concentrated on
#   one source -> target pair?);
# - the size of the drop against the flipping curve of section 1: a 1.5-point drop matches about
#   20% random flips, or a targeted attack on roughly half of one class (the overall drop is about
#   a tenth of the source class's drop).
# A concentration on one (source, target) pair in both the confusion matrix and the label
# disagreements points to targeted flipping; an honest change of data usually shifts several
# classes without one dominant pair.
