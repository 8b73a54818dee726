"""The classifiers the course attacks and defends.

Three architectures, all built the same way so that every defense works on every one:

- ``small_cnn``: a three-block CNN for 28x28 grayscale images (Fashion-MNIST, MNIST)
  that trains to about 90% on Fashion-MNIST in two epochs on a laptop CPU;
- ``resnet18``: torchvision's ResNet-18 with the 32x32 stem used for CIFAR-10 (3x3 first
  convolution, no max-pool), the model of the lecture;
- ``airbench``: a small, wide VGG-style network for GPUs in the spirit of Keller Jordan's
  airbench (2024), whose author reports 94% on CIFAR-10 in a few seconds of A100 time;
  ``python -m course_lib bench throughput`` measures this version on your hardware.

Shared structure (:class:`CourseModel`):

- the first layer is :class:`Normalize`, so inputs stay in pixel space [0, 1];
- ``features(x)`` returns the penultimate activations (what Activation Clustering and
  Spectral Signatures look at) and ``head`` is the final linear layer;
- ``channel_mask`` sits right after the last convolutional block: Fine-Pruning switches
  channels off there, and hooking its input gives the last conv layer's activations.
"""
from __future__ import annotations

import torch
import torchvision
from torch import nn

from .data import ImageDataset, dataset_info


class Normalize(nn.Module):
    """Subtract the dataset mean and divide by its std, per channel, inside the model."""

    def __init__(self, mean, std):
        super().__init__()
        mean = torch.as_tensor(mean, dtype=torch.float32, device="cpu")  # checked on the CPU, also when
        std = torch.as_tensor(std, dtype=torch.float32, device="cpu")    # a model is sized on "meta"
        if mean.ndim != 1 or mean.shape != std.shape or (std <= 0).any():
            raise ValueError(f"mean and std must be equal-length sequences with std > 0, got {mean}, {std}")
        self.register_buffer("mean", mean.view(1, -1, 1, 1))
        self.register_buffer("std", std.view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


class ChannelMask(nn.Module):
    """Multiply each channel by 0 or 1: the switch Fine-Pruning (Liu et al. 2018) turns off.

    The mask is a buffer, so a pruned model saves and loads like any other.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("mask", torch.ones(channels))

    def forward(self, x):
        return x * self.mask.view(1, -1, 1, 1).to(x.dtype)


class CourseModel(nn.Module):
    """Base class: ``forward(x) = head(features(x))``; ``config`` rebuilds the model."""

    config: dict
    head: nn.Linear
    channel_mask: ChannelMask

    def features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallCNN(CourseModel):
    """conv-pool x3, then a 128-unit hidden layer (the penultimate features) and the head.

    ``width`` sets the channels of the first block (doubled in each next block); 16 is
    enough for ~90% on Fashion-MNIST and keeps a CPU epoch around 10 seconds.
    """

    def __init__(self, in_channels=1, num_classes=10, mean=(0.5,), std=(0.5,), width=16,
                 hidden=128, image_size=28):
        super().__init__()
        w = width
        self.normalize = Normalize(mean, std)
        self.body = nn.Sequential(
            _conv_bn(in_channels, w), nn.MaxPool2d(2),
            _conv_bn(w, 2 * w), nn.MaxPool2d(2),
            _conv_bn(2 * w, 4 * w))
        self.channel_mask = ChannelMask(4 * w)
        side = image_size // 4
        self.neck = nn.Sequential(nn.Flatten(), nn.Linear(4 * w * side * side, hidden), nn.ReLU(inplace=True))
        self.head = nn.Linear(hidden, num_classes)

    def features(self, x):
        return self.neck(self.channel_mask(self.body(self.normalize(x))))


class ResNet18(CourseModel):
    """torchvision's ResNet-18 with the CIFAR stem: 3x3 stride-1 first conv, no max-pool.

    The ImageNet stem (7x7 stride 2 + max-pool) would shrink a 32x32 image to 8x8 before
    the first residual block; the CIFAR stem keeps the resolution (He et al. 2016, Sec. 4.2).
    """

    def __init__(self, in_channels=3, num_classes=10, mean=(0.5,) * 3, std=(0.5,) * 3):
        super().__init__()
        net = torchvision.models.resnet18(num_classes=num_classes)
        net.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
        self.normalize = Normalize(mean, std)
        self.body = nn.Sequential(net.conv1, net.bn1, net.relu, net.layer1, net.layer2,
                                  net.layer3, net.layer4)
        self.channel_mask = ChannelMask(512)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = net.fc

    def features(self, x):
        return self.pool(self.channel_mask(self.body(self.normalize(x))))


class AirbenchNet(CourseModel):
    """A fast CIFAR-10 network in the spirit of airbench (Jordan 2024).

    A 3x3 stem, then three blocks of (conv, pool, BN, GELU, conv, BN, GELU) with widths
    64/256/256, global max-pooling and a linear head scaled down at the output. Meant for
    a GPU with bf16 autocast and channels_last, where it trains in seconds per epoch.
    """

    def __init__(self, in_channels=3, num_classes=10, mean=(0.5,) * 3, std=(0.5,) * 3,
                 widths=(64, 256, 256)):
        super().__init__()
        self.normalize = Normalize(mean, std)
        layers = [nn.Conv2d(in_channels, 24, 3, padding=1, bias=False), nn.BatchNorm2d(24), nn.GELU()]
        cin = 24
        for w in widths:
            layers += [nn.Conv2d(cin, w, 3, padding=1, bias=False), nn.MaxPool2d(2),
                       nn.BatchNorm2d(w), nn.GELU(),
                       nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.GELU()]
            cin = w
        self.body = nn.Sequential(*layers)
        self.channel_mask = ChannelMask(cin)
        self.pool = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten())
        self.head = nn.Linear(cin, num_classes, bias=False)
        self.scale = 1 / 9  # airbench's output temperature: keeps early logits small

    def features(self, x):
        return self.pool(self.channel_mask(self.body(self.normalize(x))))

    def forward(self, x):
        return self.head(self.features(x)) * self.scale


ARCHITECTURES = {"small_cnn": SmallCNN, "resnet18": ResNet18, "airbench": AirbenchNet}
DEFAULT_ARCH = {"fashion-mnist": "small_cnn", "mnist": "small_cnn", "cifar10": "resnet18"}


def build_model(arch: str, *, in_channels: int, num_classes: int, mean, std, private: bool = False,
                **kwargs) -> CourseModel:
    """Build an architecture by name; ``model.config`` records every argument for reloading.

    ``private=True`` builds the variant DP-SGD trains (:mod:`course_lib.defenses.dp_sgd`):
    Opacus's per-sample gradients need GroupNorm instead of BatchNorm and no in-place ReLU.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {sorted(ARCHITECTURES)}, got {arch!r}")
    if in_channels not in (1, 3):
        raise ValueError(f"in_channels must be 1 or 3, got {in_channels}")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if len(mean) != in_channels or len(std) != in_channels:
        raise ValueError(f"mean and std need one value per channel ({in_channels}), got {mean}, {std}")
    model = ARCHITECTURES[arch](in_channels=in_channels, num_classes=num_classes,
                                mean=tuple(mean), std=tuple(std), **kwargs)
    if private:
        model = _private(model)
    model.config = {"arch": arch, "in_channels": in_channels, "num_classes": num_classes,
                    "mean": list(map(float, mean)), "std": list(map(float, std)), **kwargs,
                    **({"private": True} if private else {})}
    return model


def _private(model: CourseModel) -> CourseModel:
    """``model`` as Opacus can train it: BatchNorm replaced by GroupNorm (Opacus's fixer), ReLUs not in place."""
    from opacus.validators import ModuleValidator  # Opacus is heavy: imported only for a private model

    fixed = ModuleValidator.fix(model)
    for module in fixed.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
    return fixed


def model_for(dataset: ImageDataset | str, arch: str | None = None, seed: int = 0, **kwargs) -> CourseModel:
    """A freshly initialized model that fits ``dataset`` (its channels, size, classes, statistics).

    ``seed`` makes the initial weights reproducible without touching the global RNG state.
    """
    name = dataset if isinstance(dataset, str) else dataset.name
    if name in DEFAULT_ARCH:
        info = dataset_info(name)
        channels, size, num_classes, mean, std = info.channels, info.size, len(info.classes), info.mean, info.std
    elif isinstance(dataset, ImageDataset):  # a synthetic or custom dataset: measure it
        channels, size = dataset.image_shape[0], dataset.image_shape[1]
        num_classes = dataset.num_classes
        mean = dataset.images.mean(dim=(0, 2, 3)).tolist()
        std = dataset.images.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()
    else:
        raise ValueError(f"dataset must be an ImageDataset or one of {sorted(DEFAULT_ARCH)}, got {name!r}")
    arch = arch or (DEFAULT_ARCH.get(name) or ("small_cnn" if size <= 28 else "resnet18"))
    if arch == "small_cnn" and size != 28:
        kwargs.setdefault("image_size", size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(arch, in_channels=channels, num_classes=num_classes, mean=mean, std=std, **kwargs)
