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

# %% answer 04-quant
# Rounding to the nearest multiple of s moves a weight by at most s / 2 = max|w| / 254.
answer = backdoored.head.weight.abs().max().item() / 127 / 2

# %% wrong 04-quant: too high
answer = backdoored.head.weight.abs().max().item() / 127   # a whole step: rounding to the NEAREST level moves at most half
