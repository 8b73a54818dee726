"""Penultimate-layer activations: what Activation Clustering, Spectral Signatures and the
feature-space IsolationForest look at.

A backdoored network has to tell "target-class image" from "any image with the trigger"
somewhere inside; by the penultimate layer the two groups, although they get the same
label, sit in different places (Chen et al. 2018; Tran et al. 2018). Every kit model
exposes that layer as ``model.features(x)``, so no hook on a named layer is needed.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..train import inference_batch, model_device
from ..checks import check_images, check_model


@torch.no_grad()
def extract_features(model, images: torch.Tensor, *, batch_size: int | None = None, progress: bool = True
                     ) -> torch.Tensor:
    """``model.features`` of every image, in batches, as a float32 (N, D) CPU tensor.

    Runs in eval mode (BatchNorm uses its running statistics, so the result does not
    depend on the batch), in batches of :func:`course_lib.train.inference_batch` images, and
    restores the model's previous mode afterwards.
    """
    check_model(model, "features")
    check_images("images", images, min_count=0)
    device, was_training = model_device(model), model.training
    batch_size = inference_batch(device, batch_size)
    model.eval()
    chunks = []
    try:
        for start in tqdm(range(0, len(images), batch_size), desc="features", disable=not progress, leave=False):
            chunks.append(model.features(images[start:start + batch_size].to(device)).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(chunks) if chunks else torch.empty(0, 0)


def dataset_features(model, data, features: torch.Tensor | None = None, *, progress: bool = True) -> torch.Tensor:
    """``model.features`` of every image of ``data``, or the precomputed ``features`` after a
    shape check: lets several detectors share one (slow) pass over the training set."""
    if features is None:
        return extract_features(model, data.images, progress=progress)
    if not isinstance(features, torch.Tensor) or features.ndim != 2 or len(features) != len(data):
        raise ValueError(f"features must be a (len(data), D) = ({len(data)}, D) tensor, got "
                         f"{getattr(features, 'shape', type(features).__name__)}")
    return features
