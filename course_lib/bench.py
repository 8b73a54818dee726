"""``python -m course_lib bench attack|poison|throughput|predict``: the figures the README quotes, measured.

- ``bench attack``: BadNets on the offline default dataset; prints clean accuracy, ASR
  and training seconds.
- ``bench poison``: poisons 50,000 CIFAR-sized (3x32x32) images twice, with the kit's
  batched :func:`course_lib.attacks.badnets` and with the lecture's per-sample loop
  (``DirtyLabelBackdoor.poison_dataset`` over a torchvision-style dataset), and prints
  the speedup.
- ``bench throughput [--arch airbench|resnet18]``: training images per second on random
  CIFAR-shaped tensors (meant for a GPU; runs on the CPU too).
- ``bench predict``: seconds to predict the 10,000 Fashion-MNIST test images with the small
  CNN, in the default and the channels-last memory layout, in batches of 128 and 1,024
  (what :func:`course_lib.train.inference_batch` and :func:`course_lib.checkpoints.load_checkpoint`
  were chosen by).
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms

from .attacks import badnets
from .data import DATASETS, ImageDataset, to_pixel_tensor, load_splits
from .experiments import default_trigger, run_backdoor
from .models import model_for
from .train import pick_device, predict_logits, train


def bench_attack(dataset: str = "fashion-mnist", rate: float = 0.05, epochs: int = 2, seed: int = 0,
                 device=None, progress: bool = False) -> dict:
    """Train one BadNets model on the full dataset and return its measured figures."""
    train, test = load_splits(dataset)
    run = run_backdoor(train, test, rate=rate, epochs=epochs, seed=seed, device=device, progress=progress)
    return {"dataset": dataset, "poison_rate": rate, "trigger": repr(default_trigger()), "epochs": epochs,
            "n_train": len(train), "clean_acc": round(run.clean_acc, 4), "asr": round(run.asr, 4),
            "train_seconds": round(run.train_seconds, 2), "device": str(pick_device(device)),
            "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine()}


class LectureStyleCIFAR(Dataset):
    """What the lecture poisons: a torchvision-style CIFAR-10 that converts on every access.

    Like ``torchvision.datasets.CIFAR10`` it keeps uint8 (H, W, C) arrays and runs
    ``PIL.Image.fromarray`` + the lecture's ``ToTensor`` + ``Normalize`` per ``__getitem__``.
    """

    def __init__(self, images_hwc: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images_hwc, labels
        self.transform = transforms.Compose([transforms.ToTensor(),
                                             transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, idx):
        return self.transform(Image.fromarray(self.images[idx])), int(self.labels[idx])


def lecture_loop_poison(dataset: Dataset, poison_rate: float, target: int, trigger_size: int = 3,
                        seed: int = 0) -> list:
    """The lecture's ``DirtyLabelBackdoor.poison_dataset``, for comparison only: one Python
    iteration, one conversion and one list entry per image."""
    rng = np.random.default_rng(seed)
    poison_indices = set(rng.choice(len(dataset), int(len(dataset) * poison_rate), replace=False).tolist())
    poisoned = []
    for idx in range(len(dataset)):
        image, label = dataset[idx]
        if idx in poison_indices:
            image = image.clone()
            image[:, -trigger_size:, -trigger_size:] = 1.0
            label = target
        poisoned.append((image, label))
    return poisoned


def bench_poison(n: int = 50_000, rate: float = 0.1, seed: int = 0, repeats: int = 3) -> dict:
    """Seconds to poison ``n`` random CIFAR-shaped images: the kit vs the lecture's loop, same run.

    The kit converts the uint8 images to a float tensor once (timed as ``kit_load_seconds``,
    what :func:`course_lib.data.load_dataset` does), then poisons with one batched call
    (best of ``repeats``; most of it is copying the 614 MB tensor so the clean data stays
    untouched). The lecture's loop converts every image on every pass, as a torchvision
    dataset with transforms does.
    """
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    raw_labels = rng.integers(0, 10, n)

    start = time.perf_counter()
    data = ImageDataset(to_pixel_tensor(raw), torch.as_tensor(raw_labels), DATASETS["cifar10"].classes,
                        "random-cifar-shaped")
    load_seconds = time.perf_counter() - start
    kit_runs = [_timed(lambda: badnets(data, trigger=default_trigger(), target=0, rate=rate, seed=seed))
                for _ in range(repeats)]
    kit_seconds = min(kit_runs)

    start = time.perf_counter()
    looped = lecture_loop_poison(LectureStyleCIFAR(raw, raw_labels), rate, target=0, seed=seed)
    loop_seconds = time.perf_counter() - start
    if len(looped) != n:
        raise RuntimeError("the lecture-style loop lost images")
    return {"images": n, "shape": [3, 32, 32], "poison_rate": rate, "kit_seconds": _figures(kit_seconds),
            "kit_first_call_seconds": _figures(kit_runs[0]),
            "kit_load_seconds": _figures(load_seconds), "loop_seconds": _figures(loop_seconds),
            "speedup": round(loop_seconds / kit_seconds, 1),
            "speedup_including_load": round(loop_seconds / (kit_seconds + load_seconds), 1)}


def bench_throughput(arch: str = "airbench", batch_size: int = 512, steps: int = 20, device=None,
                     seed: int = 0) -> dict:
    """Training images per second of ``arch`` on random CIFAR-shaped tensors.

    Runs :func:`course_lib.train.train` (channels_last, bf16 autocast on CUDA) for two
    epochs of ``steps`` batches and times the second, so start-up costs (cuDNN autotuning,
    memory allocation) are left out. Also reports the implied seconds per 50,000-image epoch.
    """
    gen = torch.Generator().manual_seed(seed)
    n = batch_size * steps
    data = ImageDataset(torch.rand(n, 3, 32, 32, generator=gen), torch.randint(0, 10, (n,), generator=gen),
                        DATASETS["cifar10"].classes, "cifar10")
    model = model_for("cifar10", arch=arch, seed=seed)
    train(model, data, epochs=1, batch_size=batch_size, progress=False, device=device)  # warm-up
    seconds = train(model, data, epochs=1, batch_size=batch_size, progress=False, device=device).seconds
    return {"arch": arch, "device": str(pick_device(device)), "batch_size": batch_size,
            "images_per_second": round(n / seconds, 1), "seconds_per_50k_epoch": round(50_000 * seconds / n, 1)}


def bench_predict(repeats: int = 3, device=None) -> dict:
    """Best-of-``repeats`` seconds of :func:`course_lib.train.predict_logits` on the 10,000
    Fashion-MNIST test images, for a small CNN in the default layout (as a checkpoint used to
    load) and in channels-last (as training leaves it), in batches of 128 and 1,024, with
    torch's current thread count."""
    _, test = load_splits("fashion-mnist")
    device = pick_device(device)
    result = {"device": str(device), "threads": torch.get_num_threads(), "images": len(test)}
    for layout in (torch.contiguous_format, torch.channels_last):
        model = model_for("fashion-mnist", seed=0).to(device=device, memory_format=layout).eval()
        for batch_size in (128, 1024):
            predict_logits(model, test.images[:batch_size], batch_size=batch_size)   # warm-up
            seconds = min(_timed(lambda: predict_logits(model, test.images, batch_size=batch_size))
                          for _ in range(repeats))
            name = "channels_last" if layout is torch.channels_last else "default_layout"
            result[f"{name}_batch_{batch_size}_seconds"] = _figures(seconds)
    return result


def _figures(seconds: float) -> float:
    """``seconds`` to 4 significant figures, so that a ratio of two printed figures keeps its value."""
    return float(f"{seconds:.4g}")


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv) -> dict:
    parser = argparse.ArgumentParser(prog="python -m course_lib bench")
    parser.add_argument("what", choices=["attack", "poison", "throughput", "predict"])
    parser.add_argument("--arch", default="airbench", help="architecture for bench throughput")
    parser.add_argument("--steps", type=int, default=20, help="batches per timed epoch (bench throughput)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--dataset", default="fashion-mnist", choices=sorted(DATASETS))
    parser.add_argument("--rate", type=float, default=None)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--device", default=None)
    parser.add_argument("--n", type=int, default=50_000, help="images to poison (bench poison)")
    args = parser.parse_args(argv)
    if args.what == "attack":
        result = bench_attack(args.dataset, args.rate or 0.05, args.epochs, device=args.device,
                              progress=not args.json)
    elif args.what == "throughput":
        result = bench_throughput(args.arch, steps=args.steps, device=args.device)
    elif args.what == "predict":
        result = bench_predict(device=args.device)
    else:
        result = bench_poison(n=args.n, rate=args.rate or 0.1)
    print(json.dumps(result) if args.json else "\n".join(f"{k}: {v}" for k, v in result.items()))
    return result
