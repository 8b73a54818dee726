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

# %% answer 03-fgsm
def fgsm_toward(model, images, target, eps):
    """One FGSM step that lowers the loss toward the target: subtract the gradient's sign."""
    x = images.clone().to(lab.device).requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(model(x), torch.full((len(x),), target, device=lab.device))
    loss.backward()
    return (x - eps * x.grad.sign()).clamp(0, 1).detach().cpu()

# %% wrong 03-fgsm: moves away from the target
def fgsm_toward(model, images, target, eps):
    """The lecture's sketch, unrepaired: adding the sign of the gradient raises the loss toward the target."""
    x = images.clone().to(lab.device).requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(model(x), torch.full((len(x),), target, device=lab.device))
    loss.backward()
    return (x + eps * x.grad.sign()).clamp(0, 1).detach().cpu()

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
