"""Does a backdoor survive what happens to a model after training? The lecture's transferability claim.

The lecture lists "transferability: can survive model compression, fine-tuning" among the
properties that make backdoors dangerous. This module tests that claim on a trained model, each
change made to a copy (the model passed in is never modified):

- :func:`fine_tuned`: a defender trains the model further on clean images it trusts. Clean
  images never carry the trigger, so nothing in them asks the model to forget it; Fine-Pruning
  (Liu et al. 2018, notebook 6) prunes dormant channels first for exactly that reason;
- :func:`quantized_8bit`: every layer's weights rounded to 255 levels, as int8 storage keeps them
  (a common form of model compression);
- :func:`magnitude_pruned`: the smallest weights of the whole network set to zero (Han et al.
  2015's magnitude pruning, through ``torch.nn.utils.prune``);
- JPEG compression of the triggered *input* (:func:`course_lib.metrics.robustness`), the change an
  upload pipeline makes.

:func:`survival_table` measures clean accuracy and ASR after each; notebook 4 shows it.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.utils.prune as prune
from torch import nn

from .checks import check_float, check_int, check_model
from .data import ImageDataset
from .metrics import attack_success_rate, clean_accuracy, robustness
from .train import train

#: The layers whose weights compression changes.
_WEIGHTED = (nn.Conv2d, nn.Linear)


def _weighted_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, _WEIGHTED)]


def fine_tuned(model: nn.Module, trusted: ImageDataset, *, epochs: int = 5, lr: float = 0.05, seed: int = 0,
               device=None) -> nn.Module:
    """A copy of ``model`` trained ``epochs`` more epochs on the clean ``trusted`` images."""
    check_model(model)
    check_int("epochs", epochs)
    tuned = copy.deepcopy(model)
    train(tuned, trusted, epochs=epochs, lr=lr, seed=seed, device=device, progress=False)
    return tuned


def quantized_8bit(model: nn.Module) -> nn.Module:
    """A copy whose conv and linear weights are rounded to 255 levels per layer (symmetric int8)."""
    check_model(model)
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for layer in _weighted_layers(rounded):
            scale = max(layer.weight.abs().max().item() / 127, 1e-12)
            layer.weight.copy_(torch.fake_quantize_per_tensor_affine(layer.weight, scale, 0, -127, 127))
    return rounded


def magnitude_pruned(model: nn.Module, amount: float) -> nn.Module:
    """A copy with the smallest ``amount`` (a fraction) of all conv and linear weights set to zero."""
    check_model(model)
    check_float("amount", amount, 0, 1, high_open=True)
    # A model trained in channels_last layout has weights that torch's global pruning cannot
    # flatten with view(); the standard layout holds the same values.
    pruned = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    layers = [(layer, "weight") for layer in _weighted_layers(pruned)]
    prune.global_unstructured(layers, pruning_method=prune.L1Unstructured, amount=amount)
    for layer, name in layers:
        prune.remove(layer, name)
    return pruned


def survival_table(model: nn.Module, trusted: ImageDataset, test: ImageDataset, trigger, target: int, *,
                   seed: int = 0, jpeg_images: int = 2000, device=None) -> dict[str, dict]:
    """Clean accuracy and ASR of ``model`` as trained and after each change (module docstring).

    Returns ``{change: {"clean_acc": ..., "asr": ...}}``; for JPEG, which changes the inputs and
    not the model, ``clean_acc`` is None and the ASR is measured on the first ``jpeg_images``
    test images.
    """
    check_int("jpeg_images", jpeg_images)
    check_model(model)
    variants = {"as trained": model,
                f"fine-tuned on {len(trusted):,} clean images": fine_tuned(model, trusted, seed=seed, device=device),
                "weights rounded to 8 bits": quantized_8bit(model),
                "50% of weights pruned": magnitude_pruned(model, 0.5)}
    table = {name: {"clean_acc": clean_accuracy(m, test), "asr": attack_success_rate(m, test, trigger, target)}
             for name, m in variants.items()}
    jpeg = robustness(model, test.subset(range(min(jpeg_images, len(test)))), trigger, target, seed=seed)["jpeg75"]
    table["JPEG-compressed triggered inputs"] = {"clean_acc": None, "asr": jpeg}
    return table


__all__ = ["fine_tuned", "quantized_8bit", "magnitude_pruned", "survival_table"]
