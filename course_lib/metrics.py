"""How good is a backdoor? The lecture's three trigger-design criteria, measured.

- **Effectiveness**: :func:`attack_success_rate` (ASR), the fraction of triggered test
  inputs classified as the target, next to :func:`clean_accuracy` (CA), which a stealthy
  backdoor keeps high, and :func:`robust_accuracy`, the triggered inputs that still get
  their true label.
- **Stealthiness**: :func:`stealth` compares clean and triggered images with L2, L-inf,
  PSNR and SSIM (Wang et al. 2004) per image; :func:`stealth_summary` averages them.
- **Robustness**: :func:`robustness` re-measures the ASR after common image
  transformations (rotation, brightness, blur, crop, JPEG) of the triggered inputs.

Errata (see docs/DESIGN.md): the lecture counts ASR over *all* test images, including those
whose true label already is the target (erratum 1); a model without any backdoor then
scores about 10% on a 10-class test set. Its SSIM is one global formula with made-up
constants (erratum 8); here SSIM is the standard windowed one from torchmetrics. Its
transformation list crops 32-pixel CIFAR images to 28 pixels (erratum 9); here every
transformation keeps the image size.

Predictions go through :func:`course_lib.train.predict`, which batches and runs on the
model's device (a GPU when present).
"""
from __future__ import annotations

import warnings

import torch
from torch import nn
from torchvision.transforms.v2 import functional as TF

from .data import ImageDataset
from .poisoning import _check_class_index
from .train import check_model_and_data, predict

ROBUSTNESS_TRANSFORMS = ("none", "rotate+15", "rotate-15", "brightness+20%", "brightness-20%",
                         "gaussian_blur", "crop_resize", "jpeg75")
CROP_FRACTION = 0.875  # crop_resize keeps 87.5% of the height and width (24 of 28 pixels)


def clean_accuracy(model: nn.Module, data: ImageDataset, *, accept=None, batch_size: int | None = None,
                   device=None) -> float:
    """CA: the fraction of clean images classified correctly, in [0, 1].

    ``accept``: an optional run-time filter in front of the model (e.g. STRIP's
    ``lambda x: ~detector.rejects(x)``), a callable from images to a boolean (N,) mask; an
    input it refuses counts as not classified, so not correctly.
    """
    check_model_and_data(model, data)
    predictions = predict(model, data.images, batch_size=batch_size, device=device)
    return _fraction((predictions == data.labels) & _accepted(accept, data.images))


def attack_success_rate(model: nn.Module, data: ImageDataset, trigger, target: int, *,
                        exclude_target: bool = True, accept=None, batch_size: int | None = None, device=None) -> float:
    """ASR: the fraction of triggered test images that ``model`` classifies as ``target``.

    Only images whose true label is not ``target`` count: for the others "classified as
    the target" is just a correct prediction. ``exclude_target=False`` reproduces the
    lecture's count over every image, which inflates the ASR by roughly the target
    class's share of the test set (erratum 1); use it only to show the difference.
    ``accept``: a run-time filter, as for :func:`clean_accuracy`; a refused triggered input
    does not reach the target.
    """
    images, _ = _triggered_inputs(model, data, trigger, target, exclude_target=exclude_target)
    predictions = predict(model, images, batch_size=batch_size, device=device)
    return _fraction((predictions == target) & _accepted(accept, images))


def robust_accuracy(model: nn.Module, data: ImageDataset, trigger, target: int, *,
                    batch_size: int | None = None, device=None) -> float:
    """The fraction of triggered non-target images still classified as their *true* label.

    A backdoor defense aims for a low ASR *and* a high robust accuracy: refusing to
    follow the trigger is not enough, the model should still recognize the image.
    """
    images, labels = _triggered_inputs(model, data, trigger, target, exclude_target=True)
    predictions = predict(model, images, batch_size=batch_size, device=device)
    return _fraction(predictions == labels)


def stealth(clean: torch.Tensor, triggered: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image distances between clean and triggered images (both (N, C, H, W) or (C, H, W)).

    Returns a dict of (N,) tensors:

    - ``"l2"``: Euclidean norm of the difference (lower = stealthier);
    - ``"linf"``: largest change of any pixel (lower = stealthier);
    - ``"psnr"``: peak signal-to-noise ratio in dB with peak 1.0 (higher = stealthier;
      the lecture's rule of thumb is > 30 dB). An unchanged image has PSNR = inf;
    - ``"ssim"``: structural similarity (Wang et al. 2004), 1 for identical images. It
      compares local means, variances and covariances in an 11x11 Gaussian window
      (sigma 1.5) and averages over the image; the window shrinks to fit images smaller
      than 11 pixels.
    """
    # torchmetrics imports matplotlib.pyplot when it loads: only load it when stealth is measured
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    clean, triggered = _check_image_pair(clean, triggered)
    diff = (triggered - clean).flatten(1)
    side = min(clean.shape[-2:])
    kernel = min(11, side if side % 2 else side - 1)
    return {
        "l2": diff.norm(dim=1),
        "linf": diff.abs().amax(dim=1),
        "psnr": peak_signal_noise_ratio(triggered, clean, data_range=1.0, reduction="none", dim=(1, 2, 3)),
        "ssim": structural_similarity_index_measure(
            triggered, clean, data_range=1.0, reduction="none", kernel_size=kernel, sigma=1.5 * kernel / 11),
    }


def stealth_summary(clean: torch.Tensor, triggered: torch.Tensor) -> dict[str, float]:
    """The mean of each :func:`stealth` metric over the images, as floats.

    The mean PSNR is inf when any image was left unchanged.
    """
    return {name: values.mean().item() for name, values in stealth(clean, triggered).items()}


def robustness(model: nn.Module, data: ImageDataset, trigger, target: int, *, seed: int = 0,
               batch_size: int | None = None, device=None) -> dict[str, float]:
    """ASR (over non-target images) after each transformation of the *triggered* images.

    The keys are :data:`ROBUSTNESS_TRANSFORMS`: no change, rotation by +-15 degrees,
    brightness x1.2 and x0.8, a 3x3 Gaussian blur (sigma 1), a random crop of 87.5% of
    each side resized back, and JPEG compression at quality 75. They mimic what a
    photo, a screenshot or an upload pipeline does to a trigger; ``seed`` places the crops.
    """
    images, _ = _triggered_inputs(model, data, trigger, target, exclude_target=True)
    gen = torch.Generator().manual_seed(seed)
    transforms = {
        "none": lambda x: x,
        "rotate+15": lambda x: TF.rotate(x, 15.0, interpolation=TF.InterpolationMode.BILINEAR),
        "rotate-15": lambda x: TF.rotate(x, -15.0, interpolation=TF.InterpolationMode.BILINEAR),
        "brightness+20%": lambda x: TF.adjust_brightness(x, 1.2),
        "brightness-20%": lambda x: TF.adjust_brightness(x, 0.8),
        "gaussian_blur": lambda x: TF.gaussian_blur(x, kernel_size=[3, 3], sigma=[1.0, 1.0]),
        "crop_resize": lambda x: _random_crop_resize(x, CROP_FRACTION, gen),
        "jpeg75": _jpeg75,
    }
    return {name: _fraction(predict(model, transform(images), batch_size=batch_size, device=device) == target)
            for name, transform in transforms.items()}


def _accepted(accept, images: torch.Tensor) -> torch.Tensor:
    """The filter's boolean verdict on ``images`` (all True without a filter)."""
    if accept is None:
        return torch.ones(len(images), dtype=torch.bool)
    if not callable(accept):
        raise TypeError(f"accept must be a callable from images to a boolean mask, got {type(accept).__name__}")
    mask = torch.as_tensor(accept(images))
    if mask.dtype != torch.bool or mask.shape != (len(images),):
        raise ValueError(f"accept must return a boolean mask of shape ({len(images)},), got "
                         f"{mask.dtype} {tuple(mask.shape)}")
    return mask


def _fraction(hits: torch.Tensor) -> float:
    """The share of True entries, counted exactly (successes / total)."""
    return hits.sum().item() / len(hits)


def _random_crop_resize(images: torch.Tensor, fraction: float, gen: torch.Generator) -> torch.Tensor:
    """Crop each image at a random place to ``fraction`` of its size, then resize it back.

    Images that drew the same crop box are processed together in one batched call.
    """
    height, width = images.shape[-2:]
    crop_h, crop_w = max(1, round(fraction * height)), max(1, round(fraction * width))
    tops = torch.randint(0, height - crop_h + 1, (len(images),), generator=gen)
    lefts = torch.randint(0, width - crop_w + 1, (len(images),), generator=gen)
    out = torch.empty_like(images)
    for top, left in set(zip(tops.tolist(), lefts.tolist())):
        same_box = (tops == top) & (lefts == left)
        out[same_box] = TF.resized_crop(images[same_box], top, left, crop_h, crop_w,
                                        [height, width], antialias=True)
    return out


def _jpeg75(images: torch.Tensor) -> torch.Tensor:
    """JPEG-compress at quality 75 (on 8-bit pixels, as a real file would be) and decode."""
    with warnings.catch_warnings():  # torchvision 0.29 deprecates its JPEG codec in favour of TorchCodec
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision")
        encoded = TF.jpeg(TF.to_dtype(images, torch.uint8, scale=True), quality=75)
    return TF.to_dtype(encoded, torch.float32, scale=True)


def _triggered_inputs(model, data, trigger, target, *, exclude_target):
    """The triggered test images that count for the ASR, and their true labels."""
    check_model_and_data(model, data)
    if not callable(trigger):
        raise TypeError(f"trigger must be callable (a course_lib.triggers.Trigger), got {type(trigger).__name__}")
    _check_class_index("target", target, data.num_classes)
    keep = data.labels != target if exclude_target else torch.ones(len(data), dtype=torch.bool)
    if not keep.any():
        raise ValueError(f"data has no images outside the target class {target}: the ASR is undefined")
    return trigger(data.images[keep]), data.labels[keep]


def _check_image_pair(clean, triggered) -> tuple[torch.Tensor, torch.Tensor]:
    """Both images as float (N, C, H, W) batches of the same shape, at least 3x3 pixels."""
    for name, images in (("clean", clean), ("triggered", triggered)):
        if not isinstance(images, torch.Tensor) or images.ndim not in (3, 4) or not images.is_floating_point():
            raise ValueError(f"{name} must be a float tensor of shape (N, C, H, W) or (C, H, W), got "
                             f"{getattr(images, 'shape', type(images).__name__)}")
    if clean.shape != triggered.shape:
        raise ValueError(f"clean and triggered must have the same shape, got {tuple(clean.shape)} "
                         f"and {tuple(triggered.shape)}")
    if clean.ndim == 4 and len(clean) == 0:
        raise ValueError("clean and triggered must hold at least one image")
    if min(clean.shape[-2:]) < 3:
        raise ValueError(f"clean and triggered must be at least 3x3 pixels for SSIM, got {tuple(clean.shape)}")
    if clean.ndim == 3:
        clean, triggered = clean.unsqueeze(0), triggered.unsqueeze(0)
    return clean.float(), triggered.float()
