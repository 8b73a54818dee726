"""``python -m course_lib demo``: plant a backdoor, measure it, draw it.

The whole lecture in two minutes on a laptop CPU: a 3x3 checkerboard in the corner of
5% of Fashion-MNIST's training images, relabelled "T-shirt/top"; a small CNN trained for
two epochs; then clean accuracy, attack success rate and the trigger's stealth, all
measured, and three figures written as PNG files.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib

from .data import DATASETS, load_splits
from .experiments import default_trigger, run_backdoor
from .metrics import attack_success_rate, stealth_summary
from .triggers import BlendTrigger, DistributedTrigger, PatchTrigger, SIGTrigger, WaNetTrigger


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m course_lib demo",
                                     description="Train a BadNets model end to end and measure it.")
    parser.add_argument("--dataset", default="fashion-mnist", choices=sorted(DATASETS))
    parser.add_argument("--out", default="out/demo", help="folder for the PNG figures")
    parser.add_argument("--rate", type=float, default=0.05, help="poisoning rate (fraction of the training set)")
    parser.add_argument("--target", type=int, default=0, help="target class index")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cpu, cuda, mps (default: the fastest present)")
    return parser.parse_args(argv)


def gallery_triggers() -> dict:
    """A few trigger families side by side, for the first figure."""
    return {"patch 3x3": default_trigger(), "solid 4x4 top-left": PatchTrigger(4, "solid", "top-left"),
            "blend a=0.1": BlendTrigger(alpha=0.1), "four corners": DistributedTrigger(),
            "SIG": SIGTrigger(), "WaNet": WaNetTrigger()}


def main(argv=None) -> dict:
    matplotlib.use("Agg")
    from .plots import poisoned_samples, training_curves, trigger_gallery

    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    train, test = load_splits(args.dataset)
    trigger = default_trigger()
    run = run_backdoor(train, test, trigger=trigger, target=args.target, rate=args.rate,
                       epochs=args.epochs, seed=args.seed, device=args.device, eval_data=test)
    sample = test.images[:512]
    stealth = stealth_summary(sample, trigger(sample))
    row = {"dataset": args.dataset, "poison_rate": args.rate, "poisoned_images": len(run.poison.indices),
           "target": f"{args.target} ({train.classes[args.target]})", "clean_acc": run.clean_acc,
           "asr": run.asr,
           "asr_lecture_counting": attack_success_rate(run.model, test, trigger, args.target, exclude_target=False),
           **{f"stealth_{k}": v for k, v in stealth.items()}, "train_seconds": run.train_seconds}
    figures = {
        "trigger_gallery.png": trigger_gallery(test.images[0], gallery_triggers()),
        "poisoned_samples.png": poisoned_samples(run.poison.dataset, run.poison.indices, train.labels),
        "training_curves.png": training_curves(run.history, "BadNets"),
    }
    for name, fig in figures.items():
        fig.savefig(out / name, dpi=110)
    row["total_seconds"] = time.perf_counter() - start
    print_table(row)
    print(f"figures: {', '.join(str(out / n) for n in figures)}")
    return row


def print_table(row: dict) -> None:
    """Print ``row`` as a two-column markdown table."""
    print("| measure | value |\n|---|---|")
    for key, value in row.items():
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        print(f"| {key} | {shown} |")
