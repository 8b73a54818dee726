"""Datasets held in memory as tensors in pixel space.

Every image in the kit is a float32 tensor in [0, 1] of shape (N, C, H, W): triggers,
perturbation budgets and image-quality metrics are all defined in that space, and each
model normalizes its own input (see :mod:`course_lib.models`). Keeping the whole dataset
in memory turns "poison 5% of the training set" into a couple of tensor operations
instead of a Python loop over 50,000 images.

Files are read by ``torchvision.datasets``. They are looked up, in order, in:

1. the ``root`` argument;
2. the ``COURSE_DATA`` environment variable;
3. the system copy installed by Debian's ``dataset-fashion-mnist`` package
   (``/usr/share/datasets/fashion-mnist``), for Fashion-MNIST;
4. a torchvision download into ``~/.cache/course_lib`` (needs a network once).
"""
from __future__ import annotations

import gzip
import hashlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torchvision

SYSTEM_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "course_lib"


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset: image shape, statistics, class names."""

    channels: int
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]
    torchvision_class: str = field(repr=False)


DATASETS: dict[str, DatasetInfo] = {
    "fashion-mnist": DatasetInfo(
        1, 28, (0.2860,), (0.3530,),
        ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
        "FashionMNIST"),
    "mnist": DatasetInfo(
        1, 28, (0.1307,), (0.3081,), tuple(str(d) for d in range(10)), "MNIST"),
    "cifar10": DatasetInfo(
        3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
        ("airplane", "automobile", "bird", "cat", "deer",
         "dog", "frog", "horse", "ship", "truck"),
        "CIFAR10"),
}


class DataNotFoundError(FileNotFoundError):
    """The dataset files are nowhere on disk and could not be downloaded."""


@dataclass(frozen=True)
class ImageDataset:
    """A labelled image set in memory: ``images`` (N, C, H, W) in [0, 1], ``labels`` (N,).

    The object is immutable: :meth:`subset` and :meth:`replace` return new datasets, so
    an attack can never change the clean data it was given behind the caller's back.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]
    name: str = "custom"

    def __post_init__(self):
        if not isinstance(self.images, torch.Tensor) or self.images.ndim != 4:
            raise ValueError(f"images must be a 4-D tensor (N, C, H, W), got "
                             f"{getattr(self.images, 'shape', type(self.images).__name__)}")
        if not self.images.is_floating_point():
            raise ValueError(f"images must be a float tensor in [0, 1], got dtype {self.images.dtype}")
        if not isinstance(self.labels, torch.Tensor) or self.labels.shape != (len(self.images),):
            raise ValueError(f"labels must be a 1-D tensor with one label per image "
                             f"({len(self.images)}), got {getattr(self.labels, 'shape', None)}")
        if self.labels.dtype != torch.int64:
            raise ValueError(f"labels must be int64, got {self.labels.dtype}")
        if len(self.classes) < 2:
            raise ValueError(f"classes must name at least two classes, got {self.classes!r}")
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.classes)):
            raise ValueError(f"labels must lie in [0, {len(self.classes) - 1}] (one per class name)")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def subset(self, indices) -> ImageDataset:
        """The images at ``indices`` (a list, array, index tensor or boolean mask)."""
        idx = torch.as_tensor(indices)
        if idx.dtype == torch.bool:
            if idx.shape != (len(self),):
                raise ValueError(f"a boolean indices mask must have length {len(self)}, got {tuple(idx.shape)}")
            idx = idx.nonzero().flatten()
        idx = idx.long()
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise ValueError(f"indices must lie in [0, {len(self) - 1}]")
        return ImageDataset(self.images[idx], self.labels[idx], self.classes, self.name)

    def replace(self, *, images: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> ImageDataset:
        """A new dataset with the same classes and name but other images and/or labels."""
        return ImageDataset(self.images if images is None else images,
                            self.labels if labels is None else labels,
                            self.classes, self.name)

    def split(self, n_first: int, seed: int = 0) -> tuple[ImageDataset, ImageDataset]:
        """Shuffle with ``seed`` and cut into ``n_first`` images and the rest."""
        if not 0 < n_first < len(self):
            raise ValueError(f"n_first must be in [1, {len(self) - 1}], got {n_first}")
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        return self.subset(order[:n_first]), self.subset(order[n_first:])

    def fingerprint(self) -> str:
        """A short hash of the labels and images: tells cached results of different data apart."""
        digest = hashlib.sha256(self.labels.numpy().tobytes())
        digest.update(self.images.contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    def class_counts(self) -> torch.Tensor:
        """Number of images per class, shape (num_classes,)."""
        return torch.bincount(self.labels, minlength=self.num_classes)


def dataset_info(name: str) -> DatasetInfo:
    """Shape, statistics and class names of a named dataset."""
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {sorted(DATASETS)}, got {name!r}")
    return DATASETS[name]


def _system_copy_as_torchvision_root(name: str) -> Path | None:
    """Expose Debian's Fashion-MNIST files in the layout torchvision expects.

    The package ships the four original ``*-ubyte.gz`` files; torchvision reads them
    uncompressed from ``<root>/FashionMNIST/raw``. We decompress them once into the
    cache (about 55 MB) and hand torchvision that root.
    """
    if name != "fashion-mnist" or not (SYSTEM_FASHION_MNIST / "train-images-idx3-ubyte.gz").exists():
        return None
    raw = CACHE_DIR / "system" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for gz in SYSTEM_FASHION_MNIST.glob("*-ubyte.gz"):
        target = raw / gz.name[:-3]
        if not target.exists():
            tmp = target.with_suffix(".part")
            with gzip.open(gz, "rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
            tmp.rename(target)
    return raw.parent.parent


def _candidate_roots(name: str, root) -> list[Path]:
    roots = []
    if root is not None:
        roots.append(Path(root))
    if os.environ.get("COURSE_DATA"):
        roots.append(Path(os.environ["COURSE_DATA"]))
    system = _system_copy_as_torchvision_root(name)
    if system is not None:
        roots.append(system)
    roots.append(CACHE_DIR)
    return roots


def to_pixel_tensor(array) -> torch.Tensor:
    """uint8 (N, H, W) or (N, H, W, C) -> float32 (N, C, H, W) in [0, 1]."""
    images = torch.as_tensor(np.asarray(array))
    if images.ndim == 3:
        images = images.unsqueeze(1)
    else:
        images = images.permute(0, 3, 1, 2)
    return images.contiguous().float().div_(255.0)


def _read(name: str, train: bool, root: Path, download: bool):
    cls = getattr(torchvision.datasets, dataset_info(name).torchvision_class)
    return cls(root=str(root), train=train, download=download)


def load_dataset(name: str, split: str = "train", root=None, download: bool = True) -> ImageDataset:
    """Load ``name`` ("fashion-mnist", "mnist" or "cifar10") as an in-memory ImageDataset.

    ``split`` is "train" or "test". Raises :class:`DataNotFoundError` listing every
    place it looked when the files are missing and cannot be downloaded.
    """
    info = dataset_info(name)
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    roots = _candidate_roots(name, root)
    for candidate in roots:
        try:
            raw = _read(name, split == "train", candidate, download=False)
            break
        except RuntimeError:  # torchvision's "Dataset not found or corrupted"
            continue
    else:
        raw = _download(name, split, roots, download)
    images = to_pixel_tensor(raw.data)
    labels = torch.as_tensor(np.asarray(raw.targets), dtype=torch.int64)
    return ImageDataset(images, labels, info.classes, name)


def _download(name: str, split: str, roots: list[Path], download: bool):
    if download:
        try:
            return _read(name, split == "train", CACHE_DIR, download=True)
        except Exception as err:  # no network, a proxy, a half-written file...
            reason = f"the download into {CACHE_DIR} failed ({type(err).__name__}: {err})"
    else:
        reason = "download=False"
    looked = "\n".join(f"  - {r}" for r in roots)
    hint = ("install Debian's package: sudo apt-get install dataset-fashion-mnist\n"
            if name == "fashion-mnist" else "")
    raise DataNotFoundError(
        f"{name} ({split}) was not found. Looked in:\n{looked}\nand {reason}.\n"
        f"To get it: {hint}put torchvision's files for {dataset_info(name).torchvision_class} "
        f"under a folder and pass root=... or set COURSE_DATA, or run once with a network.")


def load_splits(name: str, root=None, download: bool = True) -> tuple[ImageDataset, ImageDataset]:
    """The (train, test) pair of a named dataset."""
    return (load_dataset(name, "train", root, download),
            load_dataset(name, "test", root, download))


def synthetic_dataset(n: int, *, channels: int = 1, size: int = 28, num_classes: int = 10,
                      seed: int = 0) -> ImageDataset:
    """A small learnable toy dataset for fast tests: each class is a noisy stripe pattern.

    Class k lights up horizontal band k (of ``num_classes`` bands) on a noisy background,
    so a small CNN learns it in one epoch. Nothing here is downloaded.
    """
    if n < num_classes:
        raise ValueError(f"n must be at least num_classes ({num_classes}), got {n}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if size < num_classes:
        raise ValueError(f"size must be at least num_classes ({num_classes}), got {size}")
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_classes
    labels = labels[torch.randperm(n, generator=gen)]
    images = 0.3 * torch.rand(n, channels, size, size, generator=gen)
    band = size // num_classes
    rows = torch.arange(size)
    in_band = (rows[None, :] // band) == labels[:, None]             # (n, size)
    images = images + 0.6 * in_band[:, None, :, None].float()
    return ImageDataset(images.clamp(0, 1), labels, tuple(f"class{k}" for k in range(num_classes)),
                        "synthetic")
