"""Differentially private training (DP-SGD) as a backdoor defense, with Opacus.

Abadi et al., "Deep Learning with Differential Privacy" (CCS 2016); the defense idea,
that bounding each example's influence also bounds what a few poisoned examples can
teach, is studied by Ma, Zhu & Hsu, "Data Poisoning against Differentially-Private
Learners" (IJCAI 2019) and Hong et al. (2020), "On the Effectiveness of Mitigating Data
Poisoning Attacks with Gradient Shaping".

DP-SGD clips the gradient of *each example* to norm ``max_grad_norm`` and adds Gaussian
noise of scale ``noise_multiplier * max_grad_norm`` to the sum; a privacy accountant then
states the guarantee (epsilon, delta). Opacus does both. Its per-sample gradients cannot
go through BatchNorm (which mixes the examples of a batch), so the model's BatchNorm
layers are replaced by GroupNorm (``ModuleValidator.fix``) before training.

Erratum 7: the lecture's ``DifferentialPrivacyDefense`` clips the gradient of the whole
*batch* once and adds noise: one poisoned example can still dominate the batch gradient,
and no epsilon can be stated. :func:`lecture_batch_noise_training` reproduces it for
comparison; it gives no privacy guarantee.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from ..cache import storable
from ..checks import check_dataset, check_float, check_int
from ..data import ImageDataset
from ..models import model_for
from .base import Mitigation


@storable
@dataclass
class DPResult(Mitigation):
    """A privately trained model (a :class:`~.base.Mitigation`) and its privacy guarantee."""

    epsilon: float | None = None   # None for the lecture's batch-noise variant: no guarantee exists
    delta: float | None = None
    noise_multiplier: float = 0.0
    max_grad_norm: float = 0.0
    loss: list[float] = field(default_factory=list)


def _check_dp_args(data, epochs, batch_size, lr, noise_multiplier, max_grad_norm):
    check_dataset("data", data)
    check_int("epochs", epochs)
    check_int("batch_size", batch_size, 1, len(data))
    check_float("lr", lr, 0.0, 10.0, low_open=True)
    check_float("noise_multiplier", noise_multiplier, 0.0, 100.0)
    check_float("max_grad_norm", max_grad_norm, 0.0, 1e6, low_open=True)


def train_dp_sgd(data: ImageDataset, *, epochs: int = 2, batch_size: int = 256, lr: float = 0.5,
                 noise_multiplier: float = 1.0, max_grad_norm: float = 1.0, delta: float = 1e-5,
                 arch: str | None = None, seed: int = 0, progress: bool = True) -> DPResult:
    """Train a fresh model on ``data`` (poisoned or not) with DP-SGD; report (epsilon, delta).

    Batches are drawn by Poisson sampling (the assumption behind the accountant), with a
    seeded generator. Runs on the CPU: the models are small and Opacus's per-sample
    gradients are simplest there.
    """
    from opacus import PrivacyEngine

    _check_dp_args(data, epochs, batch_size, lr, noise_multiplier, max_grad_norm)
    check_float("delta", delta, 0.0, 1.0, low_open=True, high_open=True)
    model = model_for(data, arch=arch, seed=seed, private=True)  # Opacus-ready (see build_model)
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(TensorDataset(data.images, data.labels), batch_size=batch_size, shuffle=True,
                        generator=gen)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    with warnings.catch_warnings():  # Opacus warns that secure_mode is off: fine for teaching
        warnings.simplefilter("ignore")
        engine = PrivacyEngine(accountant="rdp")
        model, optimizer, loader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm, noise_generator=torch.Generator().manual_seed(seed + 1))
    result = DPResult("Abadi et al. 2016 (Opacus)", model, 0.0, None, delta, noise_multiplier, max_grad_norm)
    start = time.perf_counter()
    model.train()
    with warnings.catch_warnings():  # PyTorch notes that the input images need no gradient: true
        warnings.filterwarnings("ignore", message="Full backward hook")
        for _ in tqdm(range(epochs), desc="DP-SGD", disable=not progress, leave=False):
            total, seen = 0.0, 0
            for x, y in loader:
                if len(y) == 0:  # Poisson sampling can draw an empty batch
                    continue
                optimizer.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                optimizer.step()
                total, seen = total + loss.item() * len(y), seen + len(y)
            result.loss.append(total / max(seen, 1))
    result.seconds = time.perf_counter() - start
    # without noise there is no guarantee: epsilon is infinite (the accountant would only warn and say so)
    result.epsilon = float(engine.get_epsilon(delta)) if noise_multiplier > 0 else float("inf")
    result.model = model._module.eval()  # the plain model, without Opacus's wrapper
    return result


def lecture_batch_noise_training(data: ImageDataset, *, epochs: int = 2, batch_size: int = 256,
                                 lr: float = 0.05, noise_multiplier: float = 1.0, max_grad_norm: float = 1.0,
                                 arch: str | None = None, seed: int = 0, progress: bool = True) -> DPResult:
    """The lecture's "differential privacy": clip the *batch* gradient, add noise once per batch.

    Kept for comparison only (erratum 7). Clipping the summed gradient bounds the batch,
    not any one example, so there is no (epsilon, delta) to report: ``epsilon`` is None.
    The noise, as in the lecture, is ``noise_multiplier * max_grad_norm`` added to the
    *mean* gradient; DP-SGD adds the same noise to the *sum* of clipped per-example
    gradients and then divides by the batch size. At equal settings the lecture's
    version is therefore ``batch_size`` times noisier, which is what wrecks its accuracy.
    """
    _check_dp_args(data, epochs, batch_size, lr, noise_multiplier, max_grad_norm)
    model = model_for(data, arch=arch, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    result = DPResult("lecture (batch-level noise, no guarantee)", model, 0.0, None, None, noise_multiplier,
                      max_grad_norm)
    start = time.perf_counter()
    model.train()
    for _ in tqdm(range(epochs), desc="batch noise", disable=not progress, leave=False):
        order, total = torch.randperm(len(data), generator=gen), 0.0
        for begin in range(0, len(data), batch_size):
            idx = order[begin:begin + batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(data.images[idx]), data.labels[idx])
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            for p in model.parameters():
                p.grad += torch.randn(p.grad.shape, generator=gen) * noise_multiplier * max_grad_norm
            optimizer.step()
            total += loss.item() * len(idx)
        result.loss.append(total / len(data))
    result.seconds = time.perf_counter() - start
    result.model = model.eval()
    return result
