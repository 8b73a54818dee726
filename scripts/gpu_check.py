"""Time the homework's CIFAR-10 setting on this machine and print a table (issue 26).

    python scripts/gpu_check.py            # on a GPU: CIFAR-10-sized synthetic data (50,000 + 10,000)
    python scripts/gpu_check.py --tiny     # a CPU rehearsal in a few minutes: 601 + 100 images

No machine of the kit can download CIFAR-10, so the data is a synthetic archive in CIFAR-10's
own format (course_lib.data.write_synthetic_cifar10: learnable stripes, not photographs),
read from COURSE_DATA like an instructor's copy. The table times, with the kit's defaults:

- the demo (``python -m course_lib demo --dataset cifar10``);
- lecture notebook 1 with DATASET="cifar10" (FAST: 20,000 training images, 2 epochs; nbclient);
- Part 1's training cell (a 3x3 checkerboard on 5% of the training set, ``model_for``, 2 epochs);
- the grader's poisoning run (witness.RECIPES["cifar10"]): the recipe without poison, then poisoned.

Timings are wall seconds of this process; accuracies are on synthetic data and say nothing of
real CIFAR-10. ``--tiny`` swaps in the small CNN and a tiny witness recipe so that a CPU
finishes: its seconds only show that the script runs.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "01_introduction.ipynb"


def run_notebook_1(work: Path, tiny: bool) -> str:
    """Notebook 1 with DATASET="cifar10" injected after its parameters cell, as tests/test_notebooks.py does."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    where = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    source = f'DATASET = "cifar10"\nRESULTS_DIR = "{work / "results"}"\nCACHE_DIR = "{work / "models"}"'
    if tiny:
        source += '\nfrom course_lib import models\nmodels.DEFAULT_ARCH["cifar10"] = "small_cnn"'
    nb.cells.insert(where + 1, nbformat.v4.new_code_cell(source))
    NotebookClient(nb, timeout=3600, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    # cells tagged "exercise" hold placeholders (`answer = ...`): their checks say "not yet", which is fine here
    return "executed"


def part1_training() -> str:
    """What Part 1's training cell does: poison 5% with a checkerboard patch, train 2 epochs."""
    from course_lib.attacks import badnets
    from course_lib.data import load_splits
    from course_lib.experiments import default_trigger
    from course_lib.metrics import attack_success_rate, clean_accuracy
    from course_lib.models import model_for
    from course_lib.train import train

    train_data, test_data = load_splits("cifar10")
    trigger = default_trigger()
    poisoned = badnets(train_data, trigger=trigger, target=0, rate=0.05, seed=0).dataset
    model = model_for("cifar10", seed=0)
    train(model, poisoned, epochs=2, seed=0, progress=False)
    return (f"{model.config['arch']}, {len(train_data):,} images: CA {clean_accuracy(model, test_data):.3f}, "
            f"ASR {attack_success_rate(model, test_data, trigger, 0):.3f}")


def main(argv=None) -> list[tuple[str, float, str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a CPU rehearsal: 601 + 100 images, small CNN, tiny recipe")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch (default 2)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    os.environ.update(COURSE_DATA=str(work / "data"), COURSE_DATA_TRUST="1", XDG_CACHE_HOME=str(work / "xdg"),
                      OMP_NUM_THREADS=str(args.threads))
    import torch
    torch.set_num_threads(args.threads)
    from course_lib import data, demo, models
    from course_lib.homework import witness
    from course_lib.experiments import default_trigger

    if args.tiny:
        models.DEFAULT_ARCH["cifar10"] = "small_cnn"
        witness.RECIPES["cifar10"] = witness.Recipe(arch="small_cnn", train_images=200, epochs=1, batch_size=25,
                                                    measure_images=50, holdout_images=50)
    recipe = witness.RECIPES["cifar10"]
    rows = []

    def timed(step: str, work_fn) -> None:
        start = time.perf_counter()
        detail = work_fn()
        rows.append((step, time.perf_counter() - start, detail))
        print(f"{step}: {rows[-1][1]:.1f} s ({detail})", file=sys.stderr, flush=True)

    train_n, test_n = (601, 100) if args.tiny else (50_000, 10_000)
    timed("write the synthetic archive", lambda: f"{train_n:,} + {test_n:,} images, "
          f"{data.write_synthetic_cifar10(work / 'data', train=train_n, test=test_n)}")
    timed("demo (python -m course_lib demo --dataset cifar10)",
          lambda: "CA {clean_acc:.3f}, ASR {asr:.3f}".format(**demo.main(["--dataset", "cifar10",
                                                                           "--out", str(work / "demo")])))
    timed("notebook 1 (DATASET='cifar10', FAST)", lambda: run_notebook_1(work, args.tiny))
    timed("Part 1's training cell", part1_training)
    pool = witness.draw_pool(witness.mixed_splits("cifar10"), target=0, seed=1)
    timed("grader's run: the recipe without poison", lambda: f"{recipe}: CA {pool.clean_ca:.3f}")
    trigger = default_trigger()
    timed("grader's run: poisoned", lambda: str(witness.poison_and_train(
        pool, trigger(pool.stamped.images), target=0, seed=2, name="checkerboard")))

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {args.threads} torch threads"
    print(f"\n{device}; torch {torch.__version__}; {'--tiny' if args.tiny else 'full size'}; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    print("| step | seconds | detail |\n|---|---|---|")
    for step, seconds, detail in rows:
        print(f"| {step} | {seconds:.1f} | {detail} |")
    return rows


if __name__ == "__main__":
    main()
