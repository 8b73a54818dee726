# Reference answers to the exercises of notebooks/06_detection_mitigation.ipynb (instructor copy).
# Format: course_lib/exercises.py (load_solutions). The checks: course_lib/defenses/sketch_checks.py.

# %% answer 06-ac-rule
def suspicious(clusters):
    """Chen et al.'s relative-size analysis: the smaller cluster is poisoned only if it is at most 35% of the class."""
    cluster_sizes = [np.sum(clusters == 0), np.sum(clusters == 1)]
    suspicious_cluster = 0 if cluster_sizes[0] < cluster_sizes[1] else 1
    if cluster_sizes[suspicious_cluster] > 0.35 * len(clusters):
        return np.array([], dtype=int)   # a balanced split is how a clean class looks
    return np.flatnonzero(clusters == suspicious_cluster)

# %% wrong 06-ac-rule: a split that balanced is how a clean class looks
def suspicious(clusters):
    """The lecture's sketch, unrepaired: always the smaller cluster."""
    cluster_sizes = [np.sum(clusters == 0), np.sum(clusters == 1)]
    suspicious_cluster = 0 if cluster_sizes[0] < cluster_sizes[1] else 1
    return np.flatnonzero(clusters == suspicious_cluster)

# %% answer 06-nc-mad
def flag(norms):
    """The kit's MAD rule: signed anomaly index on the log mask norms, flagged above 2."""
    x = np.log(np.asarray(norms, dtype=float))
    median = np.median(x)
    mad = np.median(np.abs(x - median))
    return [i for i, v in enumerate(x) if (median - v) / (1.4826 * mad) > 2]

# %% wrong 06-nc-mad: a MAD is not a standard deviation until multiplied by 1.4826
def flag(norms):
    """Logarithms, but the lecture's comparison with 2 MADs (no consistency constant)."""
    x = np.log(np.asarray(norms, dtype=float))
    median = np.median(x)
    mad = np.median(np.abs(x - median))
    return [i for i, v in enumerate(x) if median - v > 2 * mad]

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
