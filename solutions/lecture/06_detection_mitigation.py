# Reference answers to the exercises of notebooks/06_detection_mitigation.ipynb (instructor copy).
# Format: course_lib/exercises.py (load_solutions). The checks: course_lib/exercises.py (06-threshold) and
# course_lib/defenses/sketch_checks.py (the repairs).

# %% answer 06-threshold
# The chance rate falls as the threshold rises: take the first quarter-step at or below 5%.
threshold = next(t / 4 for t in range(1, 80)
                 if D.chance_false_alarm_rate(n_labels=lab.train.num_classes, threshold=t / 4) <= 0.05)

# %% wrong 06-threshold: too low
threshold = 2.0   # the rule's own threshold: section 2 printed its false-alarm rate

# %% written 06-threshold-target
# Compare the planted target's anomaly index (printed under section 2's figures) with the threshold chosen:
# if it is below, the stricter rule misses this run's backdoor: fewer false alarms cost detections. A good
# answer names both numbers and says which error the defender prefers here (a false alarm costs an
# unlearning fine-tune and some clean accuracy, section 2; a miss leaves the backdoor in place).

# %% answer 06-fp-rank
def rank_channels(activations):
    """Liu et al.: whole channels, by mean activation over images and positions, least active first."""
    return activations.mean(dim=(0, 2, 3)).argsort()

# %% wrong 06-fp-rank: positions (channel x row x column) are not channels
def rank_channels(activations):
    """The lecture's sketch, unrepaired: flattened positions."""
    flat_act = activations.mean(dim=0).flatten()
    _, indices = torch.topk(flat_act, len(flat_act), largest=False)
    return indices

# %% answer 06-dp-clip
def private_gradient(grads, max_grad_norm, noise_multiplier, generator):
    """DP-SGD's step (Abadi et al. 2016): per-example clipping, noise on the sum, then the mean."""
    norms = grads.norm(dim=1, keepdim=True)
    clipped = grads * (max_grad_norm / (norms + 1e-12)).clamp(max=1.0)
    noise = torch.randn(grads.shape[1], generator=generator) * noise_multiplier * max_grad_norm
    return (clipped.sum(dim=0) + noise) / len(grads)

# %% wrong 06-dp-clip: one example still dominates it
def private_gradient(grads, max_grad_norm, noise_multiplier, generator):
    """The lecture's sketch, unrepaired: clips the batch's mean gradient, noise on the mean."""
    mean = grads.mean(dim=0)
    mean = mean * min(1.0, max_grad_norm / (mean.norm().item() + 1e-12))
    return mean + torch.randn(mean.shape, generator=generator) * noise_multiplier * max_grad_norm
