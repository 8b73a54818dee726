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

CIFAR-10 copied in by hand (an offline classroom) may sit in any of these folders as the
official tarball ``cifar-10-python.tar.gz`` (extracted once into ``~/.cache/course_lib``)
or as the extracted folder ``cifar-10-batches-py/``. Every file is compared with the MD5 sum
torchvision publishes for it; a copy that differs is refused with the file's name and both
sums (:class:`DataChecksumError`), unless the environment variable ``COURSE_DATA_TRUST=1``
says the instructor trusts it. Trust means trust: the batches are Python pickles, and
unpickling a file runs whatever its author put in it.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import shutil
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torchvision

SYSTEM_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "course_lib"
TRUST_ENV = "COURSE_DATA_TRUST"   # "1": read a local CIFAR-10 copy whose checksums differ from the published ones


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


class DataChecksumError(ValueError):
    """Dataset files are on disk but differ from the published ones (or some are missing)."""


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
    if images.ndim not in (3, 4) or images.dtype != torch.uint8:
        raise ValueError(f"array must be uint8 of shape (N, H, W) or (N, H, W, C), got {images.dtype} "
                         f"{tuple(images.shape)}")
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
    place it looked when the files are missing and cannot be downloaded, and
    :class:`DataChecksumError` when a local CIFAR-10 copy is there but differs from the
    published files (see the module docstring).
    """
    info = dataset_info(name)
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if root is not None and not isinstance(root, (str, os.PathLike)):
        raise ValueError(f"root must be a folder path or None, got {type(root).__name__}")
    if not isinstance(download, bool):
        raise ValueError(f"download must be True or False, got {download!r}")
    roots = _candidate_roots(name, root)
    raw = _local_cifar10(split, roots) if name == "cifar10" else None
    if raw is None:
        raw = _local_torchvision(name, split, roots)
    if raw is None:
        raw = _download(name, split, roots, download)
    images = to_pixel_tensor(raw.data)
    labels = torch.as_tensor(np.asarray(raw.targets), dtype=torch.int64)
    return ImageDataset(images, labels, info.classes, name)


def _local_torchvision(name: str, split: str, roots: list[Path]):
    for candidate in roots:
        try:
            return _read(name, split == "train", candidate, download=False)
        except RuntimeError:  # torchvision's "Dataset not found or corrupted"
            continue
    return None


@dataclass(frozen=True)
class _Arrays:
    data: np.ndarray      # uint8 (N, H, W, C), as torchvision holds it
    targets: list


def _md5(path: Path) -> str:
    return torchvision.datasets.utils.calculate_md5(str(path))


def _trusted() -> bool:
    return os.environ.get(TRUST_ENV, "") == "1"


def _checksum_failure(path: Path, expected: str, found: str) -> DataChecksumError:
    return DataChecksumError(
        f"{path} is not the published CIFAR-10 file: its MD5 sum is {found}, torchvision publishes {expected}. "
        f"A copy damaged in transfer: copy it again. A copy you trust (a re-packed or reduced archive): "
        f"set the environment variable {TRUST_ENV}=1 to read it anyway.")


def _local_cifar10(split: str, roots: list[Path]) -> _Arrays | None:
    """CIFAR-10 from the first root holding ``cifar-10-batches-py/`` or ``cifar-10-python.tar.gz``;
    None when no root holds either (then the caller says "not found" or downloads)."""
    spec = torchvision.datasets.CIFAR10
    for candidate in roots:
        folder, tarball = candidate / spec.base_folder, candidate / spec.filename
        if folder.is_dir():
            return _read_cifar10(folder, split)
        if tarball.is_file():
            return _read_cifar10(_extract_once(tarball), split)
    return None


def _extract_once(tarball: Path) -> Path:
    """Extract the official tarball into the cache, once per distinct tarball (keyed by its MD5)."""
    spec = torchvision.datasets.CIFAR10
    found = _md5(tarball)
    if found != spec.tgz_md5 and not _trusted():
        raise _checksum_failure(tarball, spec.tgz_md5, found)
    target = CACHE_DIR / "local" / found[:16]
    if not (target / spec.base_folder).is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(dir=target.parent))   # extracted whole, then renamed: no half copy
        torchvision.datasets.utils.extract_archive(str(tarball), str(scratch))
        if not (scratch / spec.base_folder).is_dir():
            shutil.rmtree(scratch)
            raise DataChecksumError(f"{tarball} holds no {spec.base_folder}/ folder: it is not CIFAR-10's archive")
        try:
            scratch.rename(target)
        except OSError:   # another process extracted it first
            shutil.rmtree(scratch)
    return target / spec.base_folder


def _read_cifar10(folder: Path, split: str) -> _Arrays:
    """Read the batches of one split (pickled dicts with b"data", uint8 rows of 3x32x32, and
    b"labels"), after comparing each file's MD5 with the sum torchvision publishes."""
    spec = torchvision.datasets.CIFAR10
    files = spec.train_list if split == "train" else spec.test_list
    missing = [name for name, _ in files if not (folder / name).is_file()]
    if missing:
        raise DataChecksumError(f"{folder} is an incomplete copy of CIFAR-10: it lacks {', '.join(missing)}")
    rows, labels = [], []
    for name, expected in files:
        found = _md5(folder / name) if not _trusted() else expected
        if found != expected:
            raise _checksum_failure(folder / name, expected, found)
        with open(folder / name, "rb") as f:
            batch = pickle.load(f, encoding="latin1")   # Python 2 pickles: str keys read as latin-1
        rows.append(np.asarray(batch["data"], dtype=np.uint8))
        labels += list(batch["labels"])
    data = np.concatenate(rows).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return _Arrays(data, labels)


def _download(name: str, split: str, roots: list[Path], download: bool):
    if download:
        try:
            return _read(name, split == "train", CACHE_DIR, download=True)
        except Exception as err:  # no network, a proxy, a half-written file...
            reason = f"the download into {CACHE_DIR} failed ({type(err).__name__}: {err})"
    else:
        reason = "download=False"
    looked = "\n".join(f"  - {r}" for r in roots)
    hint = {"fashion-mnist": "install Debian's package: sudo apt-get install dataset-fashion-mnist\n",
            "cifar10": "copy cifar-10-python.tar.gz (or its folder cifar-10-batches-py/) into a folder, or\n"}.get(name, "")
    raise DataNotFoundError(
        f"{name} ({split}) was not found. Looked in:\n{looked}\nand {reason}.\n"
        f"To get it: {hint}put torchvision's files for {dataset_info(name).torchvision_class} "
        f"under a folder and pass root=... or set COURSE_DATA, or run once with a network.")


def load_splits(name: str, root=None, download: bool = True) -> tuple[ImageDataset, ImageDataset]:
    """The (train, test) pair of a named dataset (arguments as :func:`load_dataset`)."""
    return (load_dataset(name, "train", root, download),
            load_dataset(name, "test", root, download))


def synthetic_dataset(n: int, *, channels: int = 1, size: int = 28, num_classes: int = 10,
                      seed: int = 0) -> ImageDataset:
    """A small learnable toy dataset for fast tests: each class is a noisy stripe pattern.

    Class k lights up horizontal band k (of ``num_classes`` bands) on a noisy background,
    so a small CNN learns it in one epoch. Nothing here is downloaded.
    """
    for arg, value in (("n", n), ("num_classes", num_classes), ("size", size), ("seed", seed)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{arg} must be an integer, got {value!r}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
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


def write_synthetic_cifar10(folder, *, train: int = 500, test: int = 100, seed: int = 0,
                            tarball: bool = False) -> Path:
    """Write a learnable stand-in for CIFAR-10 in its own format, to rehearse the CIFAR-10 setting
    offline: ``folder/cifar-10-batches-py/`` (five train batches, a test batch, ``batches.meta``),
    or with ``tarball=True`` that folder packed as ``folder/cifar-10-python.tar.gz``.

    The images are :func:`synthetic_dataset`'s stripes in 3x32x32, not photographs, and the files
    cannot match the published checksums: read them with ``COURSE_DATA_TRUST=1``.
    Returns the folder or tarball written.
    """
    if not isinstance(folder, (str, os.PathLike)):
        raise ValueError(f"folder must be a folder path, got {type(folder).__name__}")
    for arg, value in (("train", train), ("test", test)):
        if not isinstance(value, int) or value < 50:
            raise ValueError(f"{arg} must be an integer >= 50 (ten images per batch and class), got {value!r}")
    folder = Path(folder)
    spec = torchvision.datasets.CIFAR10
    data = synthetic_dataset(train + test, channels=3, size=32, seed=seed)
    rows = (data.images * 255).round().to(torch.uint8).flatten(1).numpy()   # 1024 red, 1024 green, 1024 blue
    labels = data.labels.tolist()
    out = folder / spec.base_folder
    out.mkdir(parents=True, exist_ok=True)
    cuts = np.linspace(0, train, len(spec.train_list) + 1).astype(int)
    parts = [(name, cuts[i], cuts[i + 1]) for i, (name, _) in enumerate(spec.train_list)]
    for name, start, stop in parts + [(spec.test_list[0][0], train, train + test)]:
        with open(out / name, "wb") as f:
            pickle.dump({"batch_label": name, "data": rows[start:stop], "labels": labels[start:stop]}, f)
    with open(out / spec.meta["filename"], "wb") as f:
        pickle.dump({"label_names": list(DATASETS["cifar10"].classes), "num_vis": 3072}, f)
    if not tarball:
        return out
    archive = folder / spec.filename
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(out, arcname=spec.base_folder)
    shutil.rmtree(out)
    return archive
