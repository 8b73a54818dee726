"""What runs with the instructor's rights around the sandbox, attacked by hand-ins: the copy of a
hand-in (links, hard links, FIFOs), nbgrader's collect, the harvest's start-up and its record of
each call, the grader's self-check. (The class command with broken and hostile hand-ins beside
honest ones is tests/test_class_scale.py.)"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import nbformat
import pytest
import torch
from safetensors.torch import save_file

from course_lib.autograde import classroom, pipeline, sandbox
from course_lib.autograde.files import copy_own_files, valid_student_id
from course_lib.autograde.steps import run_nbgrader
from course_lib.autograde.verdicts import Outputs
from course_lib.grading import GradingFailure

ROOT = Path(__file__).resolve().parents[1]
SECRET = "THE-ANSWER-KEY-42"


def test_a_hand_in_is_copied_without_anything_a_link_or_a_special_file_would_bring(tmp_path):
    secret = tmp_path / "instructor" / "answer_key.json"
    secret.parent.mkdir()
    secret.write_text(SECRET)
    hand_in = tmp_path / "hand_in"
    (hand_in / "sub" / "deeper").mkdir(parents=True)
    (hand_in / "part1_attack.ipynb").write_text("{}")
    (hand_in / "sub" / "deeper" / "notes.txt").write_text("mine")
    (hand_in / "key.json").symlink_to(secret)
    (hand_in / "sub" / "folder_link").symlink_to(secret.parent, target_is_directory=True)
    os.link(secret, hand_in / "hard.json")
    os.mkfifo(hand_in / "pipe")
    start = time.perf_counter()
    refused = copy_own_files(hand_in, tmp_path / "copy")
    assert time.perf_counter() - start < 5, "a FIFO made the copy wait"
    copied = sorted(str(p.relative_to(tmp_path / "copy")) for p in (tmp_path / "copy").rglob("*") if p.is_file())
    assert copied == ["part1_attack.ipynb", "sub/deeper/notes.txt"]
    assert not any(SECRET in p.read_text() for p in (tmp_path / "copy").rglob("*") if p.is_file())
    assert sorted(line.split(":")[0] for line in refused) == ["hard.json", "key.json", "pipe", "sub/folder_link"]
    assert any("hard link" in line for line in refused) and any("FIFO" in line for line in refused)
    with pytest.raises(OSError, match="not a plain folder"):
        copy_own_files(hand_in / "sub" / "folder_link", tmp_path / "copy2")
    (hand_in / "big.bin").write_bytes(b"x" * 5000)
    with pytest.raises(OSError, match="larger than"):
        copy_own_files(hand_in, tmp_path / "copy3", max_bytes=1000)


def test_student_ids_that_could_name_another_folder_are_refused():
    assert valid_student_id("alice") and valid_student_id("bob.smith@uni-x_1")
    for bad in ("", ".", "..", ".hidden", "a/b", "a\nb", "x" * 101, "é", "\x1b[31m"):
        assert not valid_student_id(bad), bad


def _course(tmp_path: Path) -> tuple[Path, Path]:
    """A course folder with the kit's nbgrader_config.py and an exchange outside it."""
    course = tmp_path / "course"
    course.mkdir()
    (course / "nbgrader_config.py").write_text((ROOT / "assignments" / "nbgrader_config.py").read_text())
    exchange = tmp_path / "exchange"
    (exchange / "adversarial-ml-week4" / "inbound").mkdir(parents=True)
    return course, exchange


def _hand_in(inbound: Path, student: str, stamp: str = "2026-12-01 10:00:00.000000 UTC") -> Path:
    folder = inbound / f"{student}+week4+{stamp}+abc"
    folder.mkdir()
    (folder / "timestamp.txt").write_text(stamp)
    (folder / "part1_attack.ipynb").write_text(json.dumps(nbformat.v4.new_notebook()))
    return folder


def test_collect_takes_each_students_own_files_and_never_stops_for_one(tmp_path):
    course, exchange = _course(tmp_path)
    inbound = exchange / "adversarial-ml-week4" / "inbound"
    secret = course / "grading" / "week4" / "answer_key.json"
    secret.parent.mkdir(parents=True)
    secret.write_text(SECRET)
    for student in ("aaa_honest", "linker", "piper", "zzz_honest"):
        _hand_in(inbound, student)
    (inbound / "linker+week4+2026-12-01 10:00:00.000000 UTC+abc" / "answer_key.json").symlink_to(secret)
    os.mkfifo(inbound / "piper+week4+2026-12-01 10:00:00.000000 UTC+abc" / "model.safetensors")
    (inbound / "garbage").mkdir()                                    # not STUDENT+ASSIGNMENT+TIMESTAMP
    (inbound / "badtime+week4+yesterday+abc").mkdir()                # a timestamp nbgrader cannot read
    (inbound / "..+week4+2026-12-01 10:00:00.000000 UTC+abc").mkdir()   # would land beside submitted/
    (inbound / "a b;rm+week4+2026-12-01 10:00:00.000000 UTC+abc").mkdir()  # not a plain student id
    (inbound / "sneaky+week4+2026-12-01 10:00:00.000000 UTC+abc").symlink_to(course / "grading",
                                                                            target_is_directory=True)
    done = run_nbgrader(course, "collect", "week4", f"--Exchange.root={exchange}", timeout=120, check=False)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log
    submitted = course / "submitted"
    assert sorted(p.name for p in submitted.iterdir()) == ["aaa_honest", "linker", "piper", "zzz_honest"]
    assert not (course / "week4").exists()
    for path in submitted.rglob("*"):
        assert not path.is_symlink(), path
        if path.is_file():
            assert SECRET not in path.read_text(errors="replace"), path
    assert (submitted / "linker" / "week4" / "part1_attack.ipynb").is_file()
    assert not (submitted / "piper" / "week4" / "model.safetensors").exists()
    for who in ("linker", "piper", "'a b;rm'", "sneaky", "badtime"):
        assert f"NEEDS ATTENTION: {who}:" in log, (who, log)


def run_harvest(tmp_path: Path, nb, files: dict, calls: list, key: bytes = b"s" * 32, wall: float = 240):
    scratch = tmp_path / "scratch"
    sandbox.prepare(scratch)
    for name, text in files.items():
        (scratch / "work" / name).write_text(text)
    nbformat.write(nb, scratch / "work" / "demo.ipynb")
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    save_file({"value": torch.arange(4.0)}, str(inputs / "x.safetensors"))
    (inputs / "plans.json").write_text(json.dumps({"demo": calls}))
    settings = pipeline.Settings(cell_timeout=30, limits=sandbox.Limits(wall_seconds=wall))
    ran = pipeline.run_in_sandbox(scratch, inputs, None, "demo", settings, key)
    return ran, Outputs(scratch / "out", key), scratch


# Files named like modules: the harvest, the kernel and the student's own cells must all import
# the real ones (each of these would break them: they raise on import).
SHADOWS = {f"{name}.py": "raise ImportError('imported from the hand-in')\n"
           for name in ("json", "torch", "nbformat", "jupyter_client", "course_lib", "numpy", "secrets")}

FORGER = '''
import os, subprocess, sys, time
import torch
from safetensors.torch import save_file

def double(x):
    return 2 * x

def slow(x):
    time.sleep(30)
    return x

def fails(x):
    raise ValueError("not done")

# results written ahead, where the harvest writes the calls' results, and by a background process
forged = {"call0": torch.full((4,), 99.0)}
for name in ("slow", "fails", "missing"):
    save_file(forged, f"/sandbox/out/{name}.safetensors")
code = ("import time, glob\\nfrom safetensors.torch import save_file\\nimport torch\\n"
        "for _ in range(400):\\n"
        "    for name in ('slow', 'fails'):\\n"
        "        save_file({'call0': torch.full((4,), 99.0)}, f'/sandbox/out/{name}.safetensors')\\n"
        "    time.sleep(0.05)\\n")
subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
'''


def test_results_are_what_each_call_returned_and_module_named_files_change_nothing(tmp_path):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(FORGER),
                                         nbformat.v4.new_code_cell("import json, numpy\nprint(json.dumps([1]))")])
    calls = [{"id": "double", "function": "double", "args": [{"tensor": "x"}]},
             {"id": "slow", "function": "slow", "args": [{"tensor": "x"}], "timeout": 3},
             {"id": "fails", "function": "fails", "args": [{"tensor": "x"}]},
             {"id": "missing", "function": "missing", "args": [{"tensor": "x"}]}]
    ran, out, scratch = run_harvest(tmp_path, nb, SHADOWS, calls)
    assert ran.returncode == 0, ran.stdout
    cells = json.loads((scratch / "out" / "cells.json").read_text())
    assert cells["1"][0]["text"] == "[1]\n", cells          # the student's own import is the real json
    assert torch.equal(out.result("double"), 2 * torch.arange(4.0))
    for name, message in (("slow", "did not finish"), ("fails", "not done"), ("missing", "defines no function")):
        with pytest.raises(GradingFailure, match=message):
            out.result(name)
    # a file the background process rewrote after the harvest ended is not the call's result
    save_file({"call0": torch.full((4,), 7.0)}, str(scratch / "out" / "double.safetensors"))
    with pytest.raises(GradingFailure, match="not what the call returned"):
        Outputs(scratch / "out", b"s" * 32).result("double")
    with pytest.raises(GradingFailure, match="not what the call returned"):
        Outputs(scratch / "out", b"t" * 32).result("double")      # another run's key


def test_the_harvest_key_is_out_of_reach_of_student_code(tmp_path):
    """Student code looks for the key everywhere it could be: the harvest's stdin, environment,
    command line and memory (same uid), and the files it can read."""
    probe = '''
import os
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        cmdline = open(f"/proc/{pid}/cmdline", "rb").read()
    except OSError:
        continue
    if b"course_lib.autograde.harvest" in cmdline:
        print("harvest", pid, "key in cmdline" if b"7373737373" in cmdline else "")
        for part in ("environ", "mem", "fd/0"):
            try:
                open(f"/proc/{pid}/{part}", "rb").close()
                print("OPENED", part)
            except OSError as err:
                print("closed", part, type(err).__name__)
'''
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(probe)])
    ran, out, scratch = run_harvest(tmp_path, nb, {}, [])
    text = json.loads((scratch / "out" / "cells.json").read_text())["0"][0]["text"]
    assert "harvest" in text and "OPENED" not in text and "key in" not in text, text
    assert text.count("closed") == 3 * text.count("harvest "), text


def test_a_grader_whose_sandbox_cannot_import_the_kit_refuses_to_grade(tmp_path, monkeypatch):
    settings = pipeline.Settings(cell_timeout=60, limits=sandbox.Limits(wall_seconds=120))
    assert pipeline.check_sandbox(settings) == ""
    binds = sandbox._python_binds
    package = str(Path(classroom.__file__).resolve().parents[1])
    monkeypatch.setattr(sandbox, "_python_binds", lambda: [b for b in binds() if b[0] != package])
    problem = pipeline.check_sandbox(settings)
    assert "course_lib" in problem and "ModuleNotFoundError" in problem, problem


def test_the_integrity_report_finds_copies_and_only_copies(tmp_path):
    from course_lib.autograde import integrity
    from course_lib.models import model_for

    def save(model, name):
        path = tmp_path / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        return path

    original = model_for("fashion-mnist", seed=1)
    noisy = model_for("fashion-mnist", seed=1)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(0.01 * p.abs().mean() * torch.randn_like(p))
    files = {"ann": save(original, "ann"), "bob": save(original, "bob"), "cy": save(noisy, "cy"),
             "dee": save(model_for("fashion-mnist", seed=2), "dee")}
    (tmp_path / "eve.safetensors").write_bytes(b"not a model")
    files["eve"] = tmp_path / "eve.safetensors"

    def part1(code):
        nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code)])
        nb.cells[0].metadata["nbgrader"] = {"grade_id": "p1-triggers"}
        return nb

    mine = "def trigger_patch(images):\n    out = images.clone()\n    out[:, :, -3:, -3:] = 1\n    return out\n"
    copied = '# my own work!\ndef trigger_patch(images):\n    """Patch."""\n    out = images.clone()\n\n' \
             '    out[:, :, -3:, -3:] = 1   # white\n    return out\n'
    skeleton = "def trigger_patch(images):\n    raise NotImplementedError()\n"
    notebooks = {"ann": part1(mine), "bob": part1(copied), "cy": part1(skeleton), "dee": part1(skeleton),
                 "eve": part1("def broken(:")}
    lines = integrity.report(files, notebooks, part1(skeleton))
    assert lines[0] == "identical model files: ann, bob"
    close = [line for line in lines if line.startswith("models ")]
    assert len(close) == 2 and all("cy" in line for line in close), lines     # the noisy copy, of ann and of bob
    assert "the same trigger code: ann, bob" in lines
    assert not any("dee" in line or "eve" in line for line in lines), lines
    distances = integrity.relative_distances({s: integrity.model_parameters(p) for s, p in files.items()
                                              if s != "eve"})
    assert distances[("ann", "dee")] > 0.5 and distances[("ann", "bob")] < 1e-3
