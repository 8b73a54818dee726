"""Training and evaluation on in-memory tensors.

The data already sits in memory as one tensor (see :mod:`course_lib.data`), so a batch
is a slice of a shuffled index, not a DataLoader worker round trip: on a 2-core laptop
that alone is several times faster than the lecture's per-sample ``Dataset`` loop.

Speed choices, each measured in ``python -m course_lib bench attack``:

- the device is picked automatically (CUDA, then Apple's MPS, then the CPU);
- the model and batches use ``channels_last`` memory layout (a model loaded from a
  checkpoint is put in it too: on a CPU the small CNN predicts 2-3x faster in it);
- predictions run in batches of :func:`inference_batch` images: small on a CPU, where
  they fit its caches, large on a GPU;
- mixed precision (bf16 autocast) is used on CUDA only: on CPUs without AVX-512 bf16
  is much *slower* than float32;
- a one-cycle learning-rate schedule (Smith & Topin 2019) reaches good accuracy in
  two or three epochs.

Training is seeded through a local ``torch.Generator`` (shuffling, augmentation), so two
runs with the same seed on the same machine give the same model.
"""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .data import ImageDataset

AUGMENTATIONS = ("flip", "crop")


@dataclass
class History:
    """What happened during training, one entry per epoch."""

    loss: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)       # on the (possibly poisoned) training data
    test_accuracy: list[float] = field(default_factory=list)  # on eval_data, when given
    seconds: float = 0.0


def pick_device(device=None) -> torch.device:
    """The named device, or the fastest one present: CUDA, then MPS, then the CPU."""
    if device is not None:
        try:
            return torch.device(device)
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"device must be a torch device name such as 'cpu' or 'cuda', got {device!r}") from err
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def model_device(model: nn.Module) -> torch.device:
    """The device the model's parameters (or buffers) live on; the CPU for a stateless module."""
    tensor = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def inference_batch(device, batch_size: int | None = None) -> int:
    """``batch_size`` if given (a positive int), else the default for predicting on ``device``
    (a torch device or its name; None: :func:`pick_device`'s):
    128 images on a CPU, 1024 on a GPU. On one or two CPU threads a batch of 128 runs the small
    CNN about twice as fast as 1,024, because its activations stay in the cache
    (``python -m course_lib bench predict``: 0.68 s against 1.14 s for Fashion-MNIST's 10,000
    test images on 2 threads, 0.87 s against 1.90 s on one; channels-last model)."""
    device = pick_device(device)
    if batch_size is None:
        return 128 if device.type == "cpu" else 1024
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return batch_size


def autocast(device: torch.device):
    """bf16 autocast on CUDA; a no-op elsewhere (bf16 is slow on most CPUs)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def _check_augment(augment) -> tuple[str, ...]:
    if augment in (False, None):
        return ()
    if augment is True:
        return AUGMENTATIONS
    names = tuple(augment.split("+")) if isinstance(augment, str) else tuple(augment)
    unknown = [a for a in names if a not in AUGMENTATIONS]
    if unknown:
        raise ValueError(f"augment must be False, True or a '+'-joined subset of {AUGMENTATIONS}, got {augment!r}")
    return names


def augment_batch(images: torch.Tensor, kinds: tuple[str, ...], generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flips and/or random 4-pixel translations (crop with padding), batched.

    Beware: a horizontal flip moves a bottom-right trigger to the bottom-left corner, so a
    model trained with flips learns the trigger in both corners.
    """
    n = len(images)
    if "flip" in kinds:
        flip = torch.rand(n, generator=generator) < 0.5
        images = torch.where(flip.view(-1, 1, 1, 1).to(images.device), images.flip(3), images)
    if "crop" in kinds:
        pad = 4
        h, w = images.shape[-2:]
        padded = F.pad(images, (pad, pad, pad, pad), mode="reflect")
        dx, dy = torch.randint(0, 2 * pad + 1, (2,), generator=generator).tolist()
        images = padded[:, :, dy:dy + h, dx:dx + w]  # one shift per batch: cheap, still regularizes
    return images


def train(model: nn.Module, data: ImageDataset, *, epochs: int = 2, batch_size: int = 128,
          lr: float = 0.05, momentum: float = 0.9, weight_decay: float = 5e-4,
          label_smoothing: float = 0.0, seed: int = 0, augment=False, device=None,
          progress: bool = True, eval_data: ImageDataset | None = None) -> History:
    """Train ``model`` in place on ``data`` with SGD + Nesterov and a one-cycle schedule.

    The model is moved to ``device`` (default: :func:`pick_device`) and left there.
    ``augment`` is False, True (flip + crop) or "flip", "crop", "flip+crop".
    Returns a :class:`History` with the loss and accuracy of each epoch.
    """
    _check_train_args(model, data, epochs, batch_size, lr)
    kinds = _check_augment(augment)
    device = pick_device(device)
    model.to(device=device, memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(data) / batch_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, nesterov=True,
                                weight_decay=weight_decay)
    schedule = _one_cycle(optimizer, lr, epochs * steps_per_epoch)
    history, start = History(), time.perf_counter()
    images, labels = data.images.to(device), data.labels.to(device)
    bar = tqdm(total=epochs * steps_per_epoch, desc="train", disable=not progress, leave=False)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(data), generator=gen).to(device)
        total_loss, correct = torch.zeros((), device=device), torch.zeros((), device=device)
        for step in range(steps_per_epoch):
            idx = order[step * batch_size:(step + 1) * batch_size]
            x = augment_batch(images[idx], kinds, gen) if kinds else images[idx]
            x = x.contiguous(memory_format=torch.channels_last)
            y = labels[idx]
            with autocast(device):
                logits = model(x)
                loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total_loss += loss.detach() * len(y)
            correct += (logits.argmax(1) == y).sum()
            bar.update()
        history.loss.append(total_loss.item() / len(data))
        history.accuracy.append(correct.item() / len(data))
        if eval_data is not None:
            history.test_accuracy.append(evaluate(model, eval_data))
            model.train()
        bar.set_postfix(loss=f"{history.loss[-1]:.3f}", acc=f"{history.accuracy[-1]:.3f}")
    bar.close()
    optimizer.zero_grad(set_to_none=True)  # leave no stale gradients on the trained model
    model.eval()
    history.seconds = time.perf_counter() - start
    return history


def _one_cycle(optimizer, lr: float, total_steps: int):
    """One-cycle schedule: warm up over the first quarter, then anneal (at least 2 warm-up steps)."""
    if total_steps < 4:  # too short to warm up and anneal: keep the rate constant
        return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0)
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total_steps,
                                               pct_start=max(0.25, 2 / total_steps))


def check_model_and_data(model, data) -> None:
    """Raise a clear error unless ``model`` is an ``nn.Module`` and ``data`` a non-empty ImageDataset."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(data, ImageDataset):
        raise TypeError(f"data must be a course_lib.data.ImageDataset, got {type(data).__name__}")
    if len(data) == 0:
        raise ValueError("data must hold at least one image")


def _check_train_args(model, data, epochs, batch_size, lr):
    check_model_and_data(model, data)
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, *, batch_size: int | None = None,
                   device=None) -> torch.Tensor:
    """Logits of ``model`` on ``images`` (N, C, H, W), as float32 on the CPU.

    Runs in eval mode, in batches of :func:`inference_batch` images (``batch_size`` to choose),
    and restores the model's previous train/eval mode afterwards.
    """
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise ValueError(f"images must be a 4-D tensor (N, C, H, W), got "
                         f"{getattr(images, 'shape', type(images).__name__)}")
    device = model_device(model) if device is None else pick_device(device)
    batch_size = inference_batch(device, batch_size)
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(images), batch_size):
            x = images[start:start + batch_size].to(device).contiguous(memory_format=torch.channels_last)
            with autocast(device):
                out.append(model(x).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


def predict(model: nn.Module, images: torch.Tensor, **kwargs) -> torch.Tensor:
    """Predicted class of each image, int64 (N,)."""
    return predict_logits(model, images, **kwargs).argmax(1)


def evaluate(model: nn.Module, data: ImageDataset, **kwargs) -> float:
    """Accuracy of ``model`` on ``data``, in [0, 1]."""
    if not isinstance(data, ImageDataset):
        raise TypeError(f"data must be a course_lib.data.ImageDataset, got {type(data).__name__}")
    if len(data) == 0:
        raise ValueError("data must hold at least one image")
    return (predict(model, data.images, **kwargs) == data.labels).float().mean().item()
