"""STRIP: catch triggered inputs at run time by how stubborn the prediction is.

Gao et al. (2019), "STRIP: A Defence Against Trojan Attacks on Deep Neural Networks"
(ACSAC). Idea: superimpose an incoming image on a handful of random clean images. For a
clean input the blends are ambiguous and the predictions scatter over the classes: high
entropy. For a triggered input the trigger survives the blending and keeps winning: every
blend goes to the target class, low entropy. An input whose mean prediction entropy over
the blends is below a threshold is rejected as trojaned.

The threshold comes from clean inputs only (the defender has no triggered examples): it
is the ``frr`` quantile of the entropies of held-out clean images, so that a share
``frr`` of clean inputs is falsely rejected (false rejection rate, FRR). The price of a
low FRR is the false acceptance rate (FAR): the share of triggered inputs let through.

Superimposition follows Gao et al.: the two images are added pixel by pixel and clipped
to the valid range, so a bright trigger on a dark corner is left intact.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..cache import storable
from ..checks import check_dataset, check_float, check_images, check_int, check_model
from ..data import ImageDataset
from ..train import predict_logits
from .base import InputDetector

PAPER = "Gao et al. 2019"


def strip_entropy(model, images: torch.Tensor, overlays: torch.Tensor, *, n_overlays: int = 16,
                  seed: int = 0, chunk: int = 256) -> torch.Tensor:
    """Mean Shannon entropy (nats) of the predictions on ``n_overlays`` blends of each image, (N,).

    Each image is blended with ``n_overlays`` images drawn (with ``seed``) from ``overlays``.
    """
    check_model(model, "forward")
    check_images("images", images)
    check_images("overlays", overlays)
    if images.shape[1:] != overlays.shape[1:]:
        raise ValueError(f"overlays must have the images' shape (C, H, W) = {tuple(images.shape[1:])}, "
                         f"got {tuple(overlays.shape[1:])}")
    check_int("n_overlays", n_overlays)
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(overlays), (len(images), n_overlays), generator=gen)
    entropies = []
    for start in range(0, len(images), chunk):  # chunks keep the N * n_overlays blends out of memory
        blends = (images[start:start + chunk].unsqueeze(1) + overlays[picks[start:start + chunk]]).clamp(0, 1)
        probs = predict_logits(model, blends.flatten(0, 1)).softmax(1)   # (chunk * n, K)
        entropy = torch.distributions.Categorical(probs=probs).entropy()
        entropies.append(entropy.view(-1, n_overlays).mean(1))
    return torch.cat(entropies)


@storable
@dataclass
class StripDetector(InputDetector):
    """A fitted STRIP detector (an :class:`~.base.InputDetector`): its score is the STRIP
    entropy, and inputs scoring below ``threshold`` are rejected."""

    model: torch.nn.Module
    overlays: torch.Tensor
    threshold: float
    frr: float
    calibration_entropy: torch.Tensor
    n_overlays: int
    seed: int
    paper: str = PAPER

    def scores(self, images: torch.Tensor) -> torch.Tensor:
        """STRIP entropy of each image, (N,): low = the prediction survives blending = suspicious."""
        return strip_entropy(self.model, images, self.overlays, n_overlays=self.n_overlays, seed=self.seed + 1)


def fit_strip(model, clean_data: ImageDataset, *, frr: float = 0.01, n_calibration: int = 1000,
              n_overlays: int = 16, seed: int = 0) -> StripDetector:
    """Calibrate STRIP on ``clean_data``: ``n_calibration`` images set the threshold at the
    ``frr`` quantile of their entropy; the rest serve as the pool of overlay images."""
    check_model(model, "forward")
    check_dataset("clean_data", clean_data, min_size=2)
    check_float("frr", frr, 0.0, 1.0, low_open=True, high_open=True)
    check_int("n_calibration", n_calibration, 1, len(clean_data) - 1)  # keep at least one overlay image
    order = torch.randperm(len(clean_data), generator=torch.Generator().manual_seed(seed))
    calibration, overlays = clean_data.images[order[:n_calibration]], clean_data.images[order[n_calibration:]]
    entropy = strip_entropy(model, calibration, overlays, n_overlays=n_overlays, seed=seed)
    threshold = torch.quantile(entropy, frr).item()
    return StripDetector(model, overlays, threshold, frr, entropy, n_overlays, seed)


def strip_rates(detector: StripDetector, clean_images: torch.Tensor, triggered_images: torch.Tensor
                ) -> dict[str, float]:
    """FRR on held-out clean inputs and FAR (triggered inputs accepted) on triggered ones."""
    return {"frr": detector.rejects(clean_images).float().mean().item(),
            "far": 1.0 - detector.rejects(triggered_images).float().mean().item()}
