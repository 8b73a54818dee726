"""A student's function, called in the grading sandbox on the tournament's inputs.

The tournament runs student code exactly as the autograder does (:mod:`course_lib.autograde`):
a copy of the submission in a bubblewrap sandbox with its own control group and uid
(:func:`course_lib.autograde.pipeline.run_in_sandbox`), the notebook executed by
:mod:`course_lib.autograde.harvest` (training cells skipped), then one *call* per input, each
with its own time limit, whose return value comes back as plain tensors. A call that raises,
hangs, returns the wrong thing or kills its kernel loses only its own result (the harvest
restarts the kernel and goes on); a function that ran past its limit on ``GIVE_UP_AFTER`` calls
is not called again, and its remaining arenas are errors. The sandbox sees the inputs written
here and nothing else of the grader: not the ground truth, not other submissions, not the
course folder.
"""
from __future__ import annotations

import hashlib
import json
import secrets
import shutil
import tempfile
from pathlib import Path

import nbformat
import torch
from safetensors.torch import save_file

from ..autograde import pipeline, sandbox
from ..autograde.verdicts import Outputs
from ..homework.rules import GradingFailure

STARTUP_SECONDS = 180.0     # a sandbox's allowance for starting its kernel and running the notebook's cells
CELL_TIMEOUT = 120.0        # each notebook cell (the autograder's default)
WARMUP_SECONDS = 60.0       # a first call that only loads the call machinery (torch, safetensors) in the kernel
MEAN_CALL_SECONDS = 10.0    # the sandbox's wall clock allows this much per call on average (a detector that hangs
                            # on every arena costs this, not the call limit, per arena)
GIVE_UP_AFTER = 2           # a function that ran past its limit on this many calls is not called again in the sandbox:
                            # its remaining arenas are errors (a detector that hangs costs 2 limits, not one per arena)
WARMUP = {"id": "warmup", "function": "__tournament_warmup__", "args": [], "timeout": WARMUP_SECONDS}


def fingerprint(folder: Path, notebook: str) -> str:
    """A hash of what a student's code is: the notebook's code cells and every file handed in
    beside it (the model files excepted: they never enter a sandbox)."""
    folder = Path(folder)
    digest = hashlib.sha256()
    path = folder / f"{notebook}.ipynb"
    if path.is_file():
        nb = nbformat.read(path, as_version=4)
        digest.update(json.dumps([c.source for c in nb.cells if c.cell_type == "code"]).encode())
    for file in pipeline.submission_files(folder):
        if file.relative_to(folder).as_posix() not in pipeline.MODEL_FILES:
            digest.update(file.relative_to(folder).as_posix().encode())
            digest.update(hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()


def _stage(folder: Path, work: Path, notebook: str) -> None:
    """The submission's files (never its model) and the notebook, into the sandbox's ``work``."""
    for path in pipeline.submission_files(folder):
        relative = path.relative_to(folder)
        if relative.as_posix() in pipeline.MODEL_FILES:
            continue
        (work / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, work / relative)
    nbformat.write(nbformat.read(folder / f"{notebook}.ipynb", as_version=4), work / f"{notebook}.ipynb")


def call_in_sandbox(folder: Path, notebook: str, function: str, inputs: dict, *, call_timeout: float,
                    threads: int = 1, memory_gb: float = 4.0) -> tuple[dict, sandbox.Result]:
    """Call ``function`` of the notebook ``notebook`` in the submission ``folder`` once per entry
    of ``inputs`` ({call id: list of tensors, the positional arguments}), in one sandbox.

    Returns ({call id: the value returned, or the GradingFailure that says why there is none},
    the sandbox's :class:`~course_lib.autograde.sandbox.Result`).
    """
    folder = Path(folder)
    if not (folder / f"{notebook}.ipynb").is_file():
        raise FileNotFoundError(f"folder {folder} holds no {notebook}.ipynb")
    if not isinstance(call_timeout, (int, float)) or call_timeout <= 0:
        raise ValueError(f"call_timeout must be a positive number of seconds, got {call_timeout!r}")
    wall = STARTUP_SECONDS + WARMUP_SECONDS + call_timeout + len(inputs) * min(call_timeout + 5, MEAN_CALL_SECONDS)
    limits = sandbox.Limits(wall_seconds=wall, threads=threads, sandbox_memory_bytes=int(memory_gb * 2**30))
    settings = pipeline.Settings(cell_timeout=CELL_TIMEOUT, limits=limits)
    with tempfile.TemporaryDirectory(prefix="tournament-sandbox-") as tmp:
        scratch, given = Path(tmp) / "scratch", Path(tmp) / "in"
        sandbox.prepare(scratch)
        given.mkdir()
        # The warm-up call names no function (it fails at once, after the harvest has imported what every call
        # needs), so that each real call's time limit is the student's function's own.
        calls = [WARMUP]
        for n, (call_id, args) in enumerate(inputs.items()):
            names = []
            for k, value in enumerate(args):
                save_file({"value": torch.as_tensor(value).contiguous()}, str(given / f"c{n}_{k}.safetensors"))
                names.append({"array": f"c{n}_{k}"} if not isinstance(value, torch.Tensor) else {"tensor": f"c{n}_{k}"})
            calls.append({"id": call_id, "function": function, "args": names, "timeout": call_timeout,
                          "give_up_after": GIVE_UP_AFTER})
        (given / "plans.json").write_text(json.dumps({notebook: calls}))
        _stage(folder, scratch / "work", notebook)
        key = secrets.token_bytes(32)      # the harvest signs each result that a call returned in time
        ran = pipeline.run_in_sandbox(scratch, given, None, notebook, settings, key)
        outputs, results = Outputs(scratch / "out", key), {}
        for call_id in inputs:
            try:
                results[call_id] = outputs.result(call_id)
            except GradingFailure as failure:
                results[call_id] = failure
    return results, ran
