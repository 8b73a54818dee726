"""Small helpers shared by the lecture notebooks (``notebooks/``), so that no notebook copies code.

Every notebook starts the same way: its parameters cell names the dataset, the device and
the ``FAST`` flag, and :func:`start` turns them into a :class:`Lab`: the training and test
data, the device, where trained models are cached and where the measured numbers go.

- Trained models are cached on disk (:func:`course_lib.experiments.run_backdoor` with
  ``cache_dir``), so two cells, or two notebooks, that need the same model train it once;
  other expensive results too (:meth:`Lab.cached`, :mod:`course_lib.cache`).
- :meth:`Lab.record` writes the numbers a notebook measured to ``<results_dir>/<name>.json``.
  The summary notebook gathers them with :func:`load_results`; the notebook tests read them.
- :func:`versus` shows a number the lecture states next to the one measured just now: the
  kit never types a result in (docs/DESIGN.md, "Numbers are measured, never typed in").
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from IPython.display import Markdown

from .attacks import PoisonResult
from .cache import cached
from .data import DATASETS, ImageDataset, load_splits
from .experiments import BackdoorRun, run_backdoor, run_clean
from .train import pick_device

#: Training images used when ``fast=True``: enough for a small CNN to learn Fashion-MNIST
#: well in two epochs, in seconds on a laptop CPU (README.md, "Measured", has the timings).
FAST_TRAIN_SIZE = 20_000
#: Training images held back from the victim when ``fast=False``: clean data that the
#: attacker (for a surrogate model) or the defender (for a clean validation set) owns.
SPARE_SIZE = 10_000


@dataclass
class Lab:
    """Everything a lecture notebook needs: data, device, cache and the results it measured.

    ``train`` is the victim's (clean) training set, ``spare`` clean training images the
    victim never sees, ``test`` the test set. ``epochs`` is the training length every
    notebook uses, so that models trained in different notebooks match (and are cached).
    """

    name: str
    dataset: str
    device: torch.device
    fast: bool
    train: ImageDataset
    spare: ImageDataset
    test: ImageDataset
    epochs: int
    seed: int
    cache_dir: Path | None
    results_dir: Path
    results: dict = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)
    started_cpu: float = field(default_factory=time.process_time)

    @property
    def classes(self) -> tuple[str, ...]:
        return self.train.classes

    def _defaults(self, kwargs: dict) -> dict:
        """This lab's epochs and seed, and no progress bar, unless ``kwargs`` says otherwise."""
        return {"epochs": self.epochs, "seed": self.seed, "progress": False, **kwargs}

    def run_backdoor(self, *, train: ImageDataset | None = None, **kwargs) -> BackdoorRun:
        """:func:`~course_lib.experiments.run_backdoor` on this lab's data, device and cache."""
        return run_backdoor(self.train if train is None else train, self.test, device=self.device,
                            cache_dir=self.cache_dir, **self._defaults(kwargs))

    def run_clean(self, *, train: ImageDataset | None = None, **kwargs) -> BackdoorRun:
        """:func:`~course_lib.experiments.run_clean` on this lab's data (or ``train``), device and cache."""
        return run_clean(self.train if train is None else train, self.test, device=self.device,
                         cache_dir=self.cache_dir, **self._defaults(kwargs))

    def run_poisoned(self, poison: PoisonResult, **kwargs) -> BackdoorRun:
        """Train a fresh model on the training set of any attack's :class:`~course_lib.attacks.PoisonResult`.

        Cached by the poisoned data itself, so it suits attacks that
        :func:`~course_lib.experiments.run_backdoor` does not cover (clean-label attacks, an
        optimized patch). Returns clean accuracy and the ASR of ``poison.trigger``.
        """
        run = self.run_clean(train=poison.dataset, trigger=poison.trigger, target=poison.target, **kwargs)
        return BackdoorRun(run.model, poison, run.history, run.clean_acc, run.asr, run.train_seconds)

    def cached(self, name: str, compute, *, depends=(), **params):
        """``compute(**params)``, computed once and then loaded from the cache (:mod:`course_lib.cache`).

        For results that are expensive and deterministic (an optimized patch, a fine-tuned
        copy's scores): a lecture re-run then costs only a file read. The key holds ``name``,
        ``params`` (a tensor, a model or a data set counts by its values) and the source code
        of ``compute`` and of each function or class in ``depends``, so editing the code
        recomputes instead of loading a stale result. The value may hold tensors, numbers,
        strings, lists, tuples, dicts and kit models; a cache file cannot run code.
        Without a cache folder it computes.
        """
        if not callable(compute):
            raise TypeError(f"compute must be a function, got {type(compute).__name__}")
        if not isinstance(depends, tuple):
            raise TypeError(f"depends must be a tuple of the functions and classes compute calls, "
                            f"got {type(depends).__name__}")
        value, _ = cached(self.cache_dir, name, lambda: compute(**params), inputs=params, code=(compute, *depends))
        return value

    def record(self, **values) -> None:
        """Add measured numbers to this notebook's results and rewrite its JSON file.

        Values must be JSON-able (numbers, strings, lists, dicts); floats are kept as they are.
        """
        for key, value in values.items():
            try:
                json.dumps(value, allow_nan=True)
            except TypeError as err:
                raise TypeError(f"value of {key!r} must be JSON-able (numbers, strings, lists, dicts), "
                                f"got {type(value).__name__}") from err
        self.results.update(values)
        self._write()

    def finish(self) -> dict:
        """Record the notebook's wall and CPU time, save every result and say where.

        The numbers go to ``<results_dir>/<name>.json`` (read it with :func:`load_results`),
        not to the screen: a wall of JSON at the end of a lecture notebook helps nobody.
        The CPU time counts every thread of this process; with one thread
        (``OMP_NUM_THREADS=1``) it is the notebook's work on one core, whatever else the
        machine is doing.
        """
        self.results["wall_seconds"] = round(time.perf_counter() - self.started, 1)
        self.results["cpu_seconds"] = round(time.process_time() - self.started_cpu, 1)
        path = self._write()
        print(f"{len(self.results)} measured results written to {path} "
              f"(this notebook: {self.results['wall_seconds']:.0f} s wall, {self.results['cpu_seconds']:.0f} s CPU)")
        return dict(self.results)

    def _write(self) -> Path:
        self.results_dir.mkdir(parents=True, exist_ok=True)
        path = self.results_dir / f"{self.name}.json"
        record = {"notebook": self.name, "dataset": self.dataset, "fast": self.fast,
                  "n_train": len(self.train), "n_test": len(self.test), "epochs": self.epochs,
                  "device": str(self.device), "results": self.results}
        tmp = path.with_suffix(".json.part")
        tmp.write_text(json.dumps(record, indent=1, sort_keys=True, default=_jsonable))
        os.replace(tmp, path)
        return path


def start(name: str, *, dataset: str = "fashion-mnist", device=None, fast: bool = True, seed: int = 0,
          results_dir="../artifacts/results", cache_dir="../artifacts/models",
          epochs: int | None = None) -> Lab:
    """Load ``dataset`` and set up a :class:`Lab` for the notebook called ``name``.

    With ``fast=True`` the victim trains on a random 20,000-image subset (the rest is the
    ``spare`` clean set) for 2 epochs; with ``fast=False`` on all but 10,000 images for 4
    epochs. ``device=None`` picks the GPU when there is one (:func:`~course_lib.train.pick_device`).
    ``cache_dir=None`` trains every model afresh.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string (the notebook's name), got {name!r}")
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {sorted(DATASETS)}, got {dataset!r}")
    if not isinstance(fast, bool):
        raise TypeError(f"fast must be True or False, got {fast!r}")
    if epochs is not None and (not isinstance(epochs, int) or epochs < 1):
        raise ValueError(f"epochs must be a positive integer or None, got {epochs!r}")
    device = pick_device(device)
    full_train, test = load_splits(dataset)
    size = FAST_TRAIN_SIZE if fast else len(full_train) - SPARE_SIZE
    train, spare = full_train.split(min(size, len(full_train) - 1), seed=seed)
    lab = Lab(name=name, dataset=dataset, device=device, fast=fast, train=train, spare=spare, test=test,
              epochs=epochs or (2 if fast else 4), seed=seed,
              cache_dir=None if cache_dir is None else Path(cache_dir),
              results_dir=Path(results_dir))
    threads = torch.get_num_threads()
    print(f"{dataset}: training on {len(train):,} of {len(full_train):,} images ({len(spare):,} held back: clean images "
          f"the victim never trains on, for an attacker's or a defender's use), "
          f"testing on {len(test):,}; {lab.epochs} epochs; device {device} "
          f"({threads} CPU thread{'' if threads == 1 else 's'}); FAST={fast}")
    return lab


def load_results(results_dir="../artifacts/results") -> dict[str, dict]:
    """Every notebook's saved record in ``results_dir``, keyed by notebook name (may be empty)."""
    folder = Path(results_dir)
    if not folder.is_dir():
        return {}
    return {path.stem: json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))}


def rate_sweep(lab: Lab, rates, *, trigger=None, target: int = 0) -> dict[float, BackdoorRun]:
    """One BadNets model per poisoning rate (cached), for ASR-versus-rate curves and the rate explorer."""
    rates = list(rates)
    if not rates or any(not 0 < r <= 1 for r in rates):
        raise ValueError(f"rates must be a non-empty list of numbers in (0, 1], got {rates!r}")
    runs = {}
    for rate in progress(rates, "one model per poisoning rate"):
        runs[rate] = lab.run_backdoor(trigger=trigger, target=target, rate=rate)
    return runs


def progress(items, desc: str):
    """Iterate over ``items`` behind a progress bar (for cells that train several models).

    In a notebook the bar is a widget that, once done, is replaced by a one-line summary
    (IPython's ``update_display``). Without that, an executed notebook or its HTML export
    keeps the bar's first frame ("0/4") forever, as if the cell had hung. Outside a
    notebook it is tqdm's text bar on stderr.
    """
    from tqdm.auto import tqdm
    from tqdm.notebook import tqdm as notebook_tqdm
    items = list(items)
    if not issubclass(tqdm, notebook_tqdm):
        yield from tqdm(items, desc=desc, leave=False)
        return
    from IPython.display import display
    start = time.perf_counter()
    bar = tqdm(items, desc=desc, leave=False, display=False)
    handle = display(bar.container, display_id=True)
    yield from bar
    bar.close()
    handle.update(Markdown(f"{desc}: {len(items)} of {len(items)} done in {time.perf_counter() - start:.0f} s"))


def pct(value, digits: int = 1) -> str:
    """``0.9123`` -> ``"91.2%"``; None or NaN -> ``"n/a"``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{100 * value:.{digits}f}%"


def table(rows: list[dict], columns: list[str] | None = None) -> Markdown:
    """A list of dicts as a Markdown table (rendered in a notebook, readable as plain text).

    Floats in [0, 1] are not reformatted: format them (e.g. with :func:`pct`) before.
    """
    if not rows:
        raise ValueError("rows must hold at least one row")
    columns = columns or list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |")
    return Markdown("\n".join(lines))


def versus(rows: list[tuple[str, str, str]]) -> Markdown:
    """A "lecture says / measured now" table from (quantity, lecture's number, measured) triples."""
    return table([{"quantity": q, "the lecture says": said, "measured in this run": got}
                  for q, said, got in rows])


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return str(value)
