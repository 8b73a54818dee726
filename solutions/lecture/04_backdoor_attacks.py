# Reference answers to the exercises of notebooks/04_backdoor_attacks.ipynb (instructor copy).
# Format: course_lib/exercises.py (load_solutions).

# %% answer 04-asr
def lecture_asr(model, images, labels, trigger, target):
    """Count only images whose true class is not the target: for the others a hit is a correct prediction."""
    keep = labels != target
    predictions = predict(model, trigger(images[keep]))
    return (predictions == target).float().mean().item()

# %% wrong 04-asr: it still counts the test images whose true class is already the target
def lecture_asr(model, images, labels, trigger, target):
    """The lecture's sketch, unrepaired."""
    predictions = predict(model, trigger(images))
    return (predictions == target).float().mean().item()

# %% answer 04-patch-loss
def patch_loss(logits, targets):
    """Cross-entropy toward the target: minimizing it raises the target's probability."""
    return F.cross_entropy(logits, targets)

# %% wrong 04-patch-loss: less* likely
def patch_loss(logits, targets):
    """The lecture's sketch, unrepaired."""
    return -F.cross_entropy(logits, targets)

# %% answer 04-survive
answer = True

# %% wrong 04-survive: not what this run shows
answer = False

# %% written 04-survive
# (Predict-then-run; the check says which is right for the run.) One epoch on 500 clean images
# changes the weights far less than section 5's 5 epochs on 2,000, and none of those images carries
# the trigger, so nothing pushes the model to unlearn "trigger -> target": expect the backdoor to
# survive. Notebook 6 shows what it takes to remove it (pruning the dormant channels first, or
# unlearning a reversed trigger).
