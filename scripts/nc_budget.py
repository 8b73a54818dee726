"""Neural Cleanse budgets on a tournament's cached arenas: is the arena's target flagged, at what cost?

The tournament runs Neural Cleanse on every arena (course_lib.tournament.model_defenses). This
measures what a smaller budget changes, one thread, on arenas a tournament already built:

    python scripts/nc_budget.py CACHE 60x24,200x24 [--arenas NAME,NAME] [--seed S]

CACHE is a tournament's cache (``<course>/.autograde/week4/tournament``, e.g. the bench's),
``--seed`` the tournament's seed (default 0); each budget is STEPSxBATCH. One JSON line per
arena and budget: the labels flagged, whether the target is among them, the seconds. The
tournament's own defend() call is repeated exactly, with only ``steps`` and ``batch_size``
changed.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from course_lib.defenses.neural_cleanse import neural_cleanse
from course_lib.tournament import arenas, matches


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cache", type=Path)
    parser.add_argument("budgets", help="STEPSxBATCH,...")
    parser.add_argument("--arenas", default="", help="arena names, comma-separated (default: all built)")
    parser.add_argument("--seed", type=int, default=0, help="the tournament's seed (its pool)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if not (args.cache / "arenas").is_dir():
        parser.error(f"cache {args.cache} holds no arenas/ folder")
    try:
        budgets = [(int(steps), int(batch)) for steps, batch in (b.split("x") for b in args.budgets.split(","))]
    except ValueError:
        parser.error(f"budgets must be STEPSxBATCH pairs separated by commas (e.g. 60x24,200x24), got {args.budgets!r}")
    if any(steps < 1 or batch < 1 for steps, batch in budgets):
        parser.error(f"budgets must be positive STEPSxBATCH pairs, got {args.budgets!r}")
    wanted = set(filter(None, args.arenas.split(",")))
    for folder in sorted((args.cache / "arenas").iterdir()):
        summary = json.loads((folder / "summary.json").read_text())
        if not (folder / "model.safetensors").is_file() or (wanted and summary["name"] not in wanted):
            continue
        loaded = arenas.load(folder)
        target, seed = loaded.info["target"], loaded.info["seed"]
        setting = matches.Setting(str(args.cache), loaded.data.name, args.seed, target, 5.0, 1)
        holdout = setting.pool(summary.get("rate")).holdout
        half = len(holdout) // 2
        for steps, batch in budgets:
            start = time.perf_counter()
            found = neural_cleanse(loaded.model, holdout.subset(range(half)), n_images=half // 3,
                                   n_heldout=half // 3, seed=seed, progress=False, steps=steps, batch_size=batch)
            print(json.dumps({"arena": summary["name"], "budget": f"{steps}x{batch}",
                              "flagged": [int(x) for x in found.flagged], "target_flagged": target in found.flagged,
                              "seconds": round(time.perf_counter() - start, 2)}), flush=True)


if __name__ == "__main__":
    main()
