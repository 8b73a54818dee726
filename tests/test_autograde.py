"""The trusted autograder's parts on their own: the sandbox's walls, the harvest's recovery from
dying and hanging kernels, the verdicts' refusal of unreadable results, the unsafe switch.
(The whole pipeline, with real cheating students, is tests/test_homework.py's round trip.)"""
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import nbformat
import pytest
import torch
from safetensors.torch import save_file

from course_lib.autograde import classroom, harvest, resources, sandbox
from course_lib.autograde.pipeline import NotebookResult
from course_lib.autograde.preprocessor import UnsafeRefusal, require_sandbox
from course_lib.autograde.resources import LimitsRefusal
from course_lib.autograde.verdicts import Outputs, Verdict
from course_lib.grading import GradingFailure

LIMITS = sandbox.Limits(wall_seconds=60)


def run_python(tmp_path, code: str, limits=LIMITS, **kwargs) -> sandbox.Result:
    scratch = tmp_path / "scratch"
    sandbox.prepare(scratch)
    return sandbox.run(scratch, [sys.executable, "-c", code], limits, **kwargs)


def test_the_sandbox_sees_no_secret_and_writes_only_its_scratch(tmp_path):
    secret = tmp_path / "grading" / "answer_key.json"
    secret.parent.mkdir()
    secret.write_text('{"answer": 42}')
    home_file = Path.home() / ".course-lib-sandbox-test"
    code = f"""
import os, pathlib
for path in [{str(secret)!r}, {str(Path(__file__))!r}, "/root/.bashrc", "/etc/shadow"]:
    print("visible" if os.path.exists(path) else "hidden", path)
for path in [{str(tmp_path / 'planted')!r}, {str(home_file)!r}, "/usr/planted", "/sandbox/in/planted"]:
    try:
        pathlib.Path(path).write_text("x"); print("wrote", path)
    except OSError as err:
        print("refused", path, type(err).__name__)
pathlib.Path("/sandbox/out/ok").write_text("ok")
print("home", os.environ["HOME"], os.listdir(os.environ["HOME"]))
"""
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    result = run_python(tmp_path, code, binds=((inputs, sandbox.SANDBOX_ROOT / "in"),))
    assert result.returncode == 0, result.stdout
    assert "visible" not in result.stdout, result.stdout
    assert "wrote" not in result.stdout.replace("wrote /sandbox/out", ""), result.stdout
    assert not (tmp_path / "planted").exists() and not home_file.exists() and not Path("/usr/planted").exists()
    assert not (inputs / "planted").exists()
    assert (tmp_path / "scratch" / "out" / "ok").read_text() == "ok"
    assert "home /sandbox/home []" in result.stdout


def test_no_network(tmp_path):
    code = """
import socket
for address in [("1.1.1.1", 53), ("8.8.8.8", 443)]:
    try:
        socket.create_connection(address, timeout=3); print("connected", address)
    except OSError as err:
        print("no network", type(err).__name__)
try:
    socket.getaddrinfo("pypi.org", 443); print("resolved")
except OSError:
    print("no name resolution")
"""
    result = run_python(tmp_path, code)
    assert result.stdout.count("no network") == 2 and "no name resolution" in result.stdout, result.stdout


def test_every_process_dies_with_the_sandbox_and_the_wall_clock_limit_holds(tmp_path):
    tag = f"sandbox-orphan-{os.getpid()}"
    code = f"""
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)  # {tag}"], start_new_session=True)
time.sleep(300)
"""
    start = time.perf_counter()
    result = run_python(tmp_path, code, sandbox.Limits(wall_seconds=5))
    assert result.timed_out and result.returncode is None
    assert time.perf_counter() - start < 30
    time.sleep(0.5)
    assert tag not in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout


def test_file_size_and_memory_limits(tmp_path):
    code = """
import numpy as np
try:
    open("/sandbox/out/big", "wb").write(b"x" * (3 * 2**20)); print("wrote big")
except OSError as err:
    print("file too big", type(err).__name__)
try:
    block = np.ones(2**31, dtype=np.uint8); print("allocated", block.sum())
except MemoryError:
    print("out of memory")
"""
    limits = sandbox.Limits(wall_seconds=60, file_bytes=2**20, memory_bytes=2 * 2**30)
    result = run_python(tmp_path, code, limits)
    assert "file too big" in result.stdout and "out of memory" in result.stdout, result.stdout


MiB = 2**20


def left_behind(result: sandbox.Result) -> list:
    """The control groups of ``result``'s sandbox that still exist (lscgroup, cgroup-tools)."""
    name = next(arg.split(":", 1)[1] for arg in result.command if arg.startswith(f"{resources.CONTROLLERS}:"))
    groups = subprocess.run(["lscgroup"], capture_output=True, text=True).stdout.splitlines()
    return [line for line in groups if line.endswith(name)]
CAPS = dict(wall_seconds=60, sandbox_memory_bytes=1024 * MiB, disk_bytes=64 * MiB, processes=32,
            output_bytes=1 * MiB)


def test_memory_is_capped_for_all_the_sandbox_processes_together(tmp_path):
    """Three processes of 600 MiB each (each far below the per-process limit) against a 1 GiB
    cap for the sandbox: the kernel kills inside the sandbox, the group never holds more."""
    code = """
import subprocess, sys
hog = "import numpy as np, time; block = np.ones(600 * 2**20, np.uint8); print('held', flush=True); time.sleep(4)"
children = [subprocess.Popen([sys.executable, "-c", hog]) for _ in range(3)]
print("exit codes", sorted(child.wait() for child in children))
"""
    result = run_python(tmp_path, code, sandbox.Limits(**CAPS))
    assert "exit codes" in result.stdout and "-9" in result.stdout, result.stdout     # killed: out of memory
    assert result.stdout.count("held") < 3, result.stdout
    assert 600 * MiB < result.usage["memory_bytes"] <= 1024 * MiB, result.usage
    assert left_behind(result) == []


def test_disk_is_capped_for_all_the_sandbox_files_together(tmp_path):
    """Files in the working folder, HOME and /tmp, each far below the file-size limit, share one
    64 MiB cap; nothing reaches the host's disk but out/."""
    code = """
import os
written = 0
for folder in ("/sandbox/work", os.environ["HOME"], "/tmp", "/sandbox/out"):
    for i in range(4):
        try:
            with open(os.path.join(folder, f"fill{i}"), "wb") as handle:
                for _ in range(8):
                    handle.write(b"x" * 2**20); handle.flush(); written += 2**20
        except OSError as err:
            print("refused", err.errno); break
print("written MiB", written // 2**20)
"""
    result = run_python(tmp_path, code, sandbox.Limits(**CAPS))
    written = int(result.stdout.split("written MiB")[1].split()[0])
    assert "refused 28" in result.stdout and written <= 64, result.stdout          # ENOSPC
    host = sum(p.stat().st_size for p in (tmp_path / "scratch").rglob("*") if p.is_file())
    assert host <= 64 * MiB and result.usage["disk_bytes"] <= 64 * MiB, (host, result.usage)
    assert "filled the sandbox's disk" in result.exhausted(sandbox.Limits(**CAPS))


def test_a_fork_bomb_stops_at_the_process_cap_and_dies_with_the_sandbox(tmp_path):
    tag = f"sandbox-bomb-{os.getpid()}"
    code = f"""
import os, time
started = 0
try:
    for _ in range(1000):
        if os.fork() == 0:
            time.sleep(60)  # {tag}
            os._exit(0)
        started += 1
except OSError as err:
    print("refused", err.errno)
print("started", started, "uid", os.getuid())
"""
    result = run_python(tmp_path, code, sandbox.Limits(**CAPS))
    started = int(result.stdout.split("started")[1].split()[0])
    assert "refused 11" in result.stdout and started < 32, result.stdout            # EAGAIN
    assert result.usage["processes"] <= 32
    if os.geteuid() == 0:       # the sandbox's own unprivileged uid, so that RLIMIT_NPROC binds too
        assert int(result.stdout.split("uid")[1].split()[0]) in resources.UID_RANGE
    time.sleep(0.5)
    assert tag not in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert left_behind(result) == []


def test_a_sandbox_gets_its_cpu_quota_and_no_more(tmp_path):
    """Four busy processes in a sandbox with one core's quota: together they get at most about
    one core's time, so a neighbour's core stays free."""
    code = """
import subprocess, sys
spin = "import time\\nend = time.time() + 3\\nwhile time.time() < end: pass\\nprint(time.process_time())"
children = [subprocess.Popen([sys.executable, "-c", spin], stdout=subprocess.PIPE, text=True) for _ in range(4)]
print("cpu seconds", sum(float(child.communicate()[0]) for child in children))
"""
    result = run_python(tmp_path, code, sandbox.Limits(**CAPS, threads=1))
    cpu = float(result.stdout.split("cpu seconds")[1].split()[0])
    assert 0.5 < cpu < 3 * 1.2, result.stdout       # 3 s of wall clock, one core


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="a neighbour's own core needs two cores")
def test_spinners_at_normal_priority_leave_a_neighbour_sandbox_its_core(tmp_path):
    """Issue 18's detached busy processes at normal priority: eight left running in one sandbox
    (one core's quota) while a neighbour sandbox does a fixed amount of work. The neighbour
    takes about as long as alone; without the per-sandbox caps nine busy processes would share
    the two cores and it would take about four times as long."""
    work = ("import time\nstart = time.process_time(), time.perf_counter()\nx = 0\n"
            "for i in range(15_000_000): x += i\n"
            "print('seconds', time.perf_counter() - start[1], 'cpu', time.process_time() - start[0])")
    spinners = """
import subprocess, sys, time
for _ in range(8):
    subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
print("spinning", flush=True)
time.sleep(12)
"""

    def neighbour(name: str) -> float:
        result = run_python(tmp_path / name, work, sandbox.Limits(**CAPS, threads=1))
        return float(result.stdout.split("seconds")[1].split()[0])

    alone = neighbour("alone")
    busy = threading.Thread(target=run_python, args=(tmp_path / "busy", spinners, sandbox.Limits(**CAPS, threads=1)))
    busy.start()
    time.sleep(2)                                    # the spinners are running
    beside = neighbour("beside")
    busy.join()
    assert beside < 1.5 * alone, (alone, beside)
    uids = {int(uid) for uid in subprocess.run(["ps", "-eo", "uid="], capture_output=True, text=True).stdout.split()}
    assert not uids & set(resources.UID_RANGE)       # the spinners ended with their sandbox


def test_output_is_capped(tmp_path):
    """At most ``output_bytes`` of out/ come back (the rest is reported as truncated), and the
    grader keeps only the end of what the sandbox prints."""
    code = """
import sys
for i in range(3):
    open(f"/sandbox/out/part{i}", "wb").write(b"x" * 600_000)
for _ in range(2000):
    sys.stdout.write("y" * 10_000 + "\\n")
print("the end")
"""
    result = run_python(tmp_path, code, sandbox.Limits(**CAPS))
    back = sum(p.stat().st_size for p in (tmp_path / "scratch" / "out").iterdir())
    assert result.output_truncated and back <= 1 * MiB
    assert "results were more than" in result.exhausted(sandbox.Limits(**CAPS))
    assert len(result.stdout) <= sandbox.CONSOLE_CHARS and "the end" in result.stdout


def test_without_a_per_sandbox_control_autograding_refuses_unless_told(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(sandbox, "lost_controls", lambda: {"memory": "cgroup-tools is not installed"})
    with pytest.raises(LimitsRefusal, match="--unsafe-no-limits") as refused:
        classroom.autograde_class(tmp_path, "week4")
    assert "OOM killer" in str(refused.value) and "cgroup-tools is not installed" in str(refused.value)
    with pytest.raises(ValueError, match="course_dir"):      # accepted: it goes on (and stops at the bad folder)
        classroom.autograde_class(tmp_path, "week4", unsafe_no_limits=True)
    assert "WARNING: grading without the memory cap" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        classroom.main(["week4", "--course", str(tmp_path)])
    assert "--unsafe-no-limits" in capsys.readouterr().err


def test_a_group_left_behind_by_a_killed_grader_is_removed():
    gone = subprocess.Popen(["true"])
    gone.wait()
    name = f"{resources.PARENT}/{gone.pid}-left-behind"
    subprocess.run(["cgcreate", "-g", f"{resources.CONTROLLERS}:{name}"], check=True)
    resources.remove_orphans()
    assert name not in subprocess.run(["lscgroup"], capture_output=True, text=True).stdout


def test_the_caps_for_cgroup_v2_and_systemd():
    """The same caps, named as cgroup v2 and systemd name them (the v1 ones are used above)."""
    v2 = resources.settings(2, 4 * 2**30, 256, 2)
    assert v2 == {"memory.max": 4 * 2**30, "memory.swap.max": 0, "pids.max": 256, "cpu.max": "200000 100000",
                  "cpu.weight": 200}
    props = resources.systemd_properties(4 * 2**30, 256, 2)
    assert ["-p", "TasksMax=256"] == props[4:6] and "CPUQuota=200%" in props and f"MemoryMax={4 * 2**30}" in props


def test_a_time_limit_is_recognised_for_a_regrade():
    ok = NotebookResult("k", verdicts={"t": Verdict(True)})
    slow_call = NotebookResult("k", verdicts={"t": Verdict(False, "f(images) failed in your notebook: "
                                                                   "CellTimeoutError: the cell did not finish")})
    slow_cell = NotebookResult("k", cells={"1": [{"output_type": "error", "ename": "CellTimeoutError"}]})
    assert not classroom.hit_time_limit(ok)
    assert classroom.hit_time_limit(slow_call) and classroom.hit_time_limit(slow_cell)
    assert classroom.hit_time_limit(NotebookResult("k", note="the notebook was stopped at the time limit"))
    assert not classroom.hit_time_limit(NotebookResult("k", note="your notebook filled the sandbox's disk"))


def test_limits_validate_their_arguments():
    with pytest.raises(ValueError, match="wall_seconds"):
        sandbox.Limits(wall_seconds=0)
    with pytest.raises(TypeError, match="threads"):
        sandbox.Limits(threads=1.5)
    with pytest.raises(ValueError, match="disk_bytes"):
        sandbox.Limits(disk_bytes=0)


def notebook(*sources) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(source) for source in sources]
    test = nbformat.v4.new_code_cell("raise AssertionError('a test cell must never run in the sandbox')")
    test.metadata["nbgrader"] = {"grade": True, "solution": False, "grade_id": "t", "points": 1}
    nb.cells.append(test)
    return nb


def test_a_dead_or_deaf_kernel_loses_only_its_own_cell_and_call(tmp_path):
    """os._exit in one cell, a hang that ignores interrupts in another: the other cells and
    calls still produce their results (the kernel is restarted and the completed cells replayed)."""
    scratch = tmp_path / "scratch"
    sandbox.prepare(scratch)
    nb = notebook("import torch\ndef double(x):\n    return 2 * x",
                  "import os\nos._exit(3)",
                  "def triple(x):\n    return 3 * x",
                  "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True:\n    pass",
                  "def die(x):\n    import os; os._exit(1)\n\ndef hang(x):\n    while True:\n        pass\n"
                  "print('defined')")
    nbformat.write(nb, scratch / "work" / "demo.ipynb")
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    save_file({"value": torch.arange(4.0)}, str(inputs / "x.safetensors"))
    calls = [{"id": name, "function": name, "args": [{"tensor": "x"}], "timeout": 5 if name == "hang" else 60}
             for name in ("double", "die", "triple", "hang", "missing")]
    (inputs / "plans.json").write_text(json.dumps({"demo": calls}))
    argv = [sys.executable, "-m", "course_lib.autograde.harvest", str(sandbox.SANDBOX_ROOT), "demo", "15"]
    binds = ((inputs, sandbox.SANDBOX_ROOT / "in"),)
    key = b"k" * 32
    result = sandbox.run(scratch, argv, sandbox.Limits(wall_seconds=300), binds=binds, stdin=key.hex().encode() + b"\n")
    assert result.returncode == 0, result.stdout
    out = Outputs(scratch / "out", key)
    assert torch.equal(out.result("double"), 2 * torch.arange(4.0))
    assert torch.equal(out.result("triple"), 3 * torch.arange(4.0))
    for name, message in (("die", "died"), ("hang", "did not finish"), ("missing", "defines no function")):
        with pytest.raises(GradingFailure, match=message):
            out.result(name)
    cells = json.loads((scratch / "out" / "cells.json").read_text())
    assert cells["1"][-1]["ename"] == "DeadKernelError" and cells["3"][-1]["ename"] == "CellTimeoutError"
    assert "defined" in cells["4"][0]["text"] and "5" not in cells      # the test cell never ran


def test_unreadable_results_fail_the_test_not_the_grader(tmp_path):
    key = b"k" * 32
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x00" * 100)
    (tmp_path / "link.safetensors").symlink_to("/etc/passwd")
    record = {"corrupt": harvest.signature(key, "corrupt", hashlib.sha256(b"\x00" * 100).digest())}
    (tmp_path / harvest.RECORD).write_text(json.dumps(record))
    out = Outputs(tmp_path, key)
    with pytest.raises(GradingFailure, match="could not be read back as tensors"):
        out.result("corrupt")
    with pytest.raises(GradingFailure, match="produced no result"):
        out.result("link")     # a symlink is never followed


def test_a_metadata_file_nested_100000_deep_is_named_for_what_it_is(tmp_path):
    """The student sees what is wrong with the file, not the JSON parser's RecursionError."""
    from course_lib import grading
    from course_lib.checkpoints import save_checkpoint
    from course_lib.models import model_for
    path = tmp_path / grading.MODEL_FILE
    save_checkpoint(model_for("fashion-mnist", seed=0), path, dataset="fashion-mnist",
                    classes=[str(i) for i in range(10)])
    path.with_suffix(".json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(GradingFailure, match="nests lists or objects too deeply") as failure:
        grading.load_student_model(path, dataset="fashion-mnist")
    assert "Recursion" not in str(failure.value)
    path.with_suffix(".json").write_text('{"format": ')
    with pytest.raises(GradingFailure, match="is not valid JSON: expecting value at line 1, column 12"):
        grading.load_student_model(path, dataset="fashion-mnist")


def test_without_a_sandbox_autograding_refuses_unless_told_it_is_unsafe(monkeypatch, capsys):
    monkeypatch.setattr(sandbox, "available", lambda: (False, "bubblewrap is not installed"))
    with pytest.raises(UnsafeRefusal, match="--unsafe-no-sandbox"):
        require_sandbox(False)
    with pytest.raises(UnsafeRefusal):
        classroom.autograde_class(".", "week4")
    require_sandbox(True)
    assert "WITHOUT a sandbox" in capsys.readouterr().out and "read the answer key" in sandbox.UNSAFE_LOSSES[0]


def test_the_class_command_names_a_bad_argument(tmp_path):
    with pytest.raises(ValueError, match="course_dir"):
        classroom.autograde_class(tmp_path, "week4")
    with pytest.raises(ValueError, match="workers"):
        classroom.autograde_class(tmp_path, "week4", workers=0)
    with pytest.raises(TypeError, match="threads"):
        classroom.autograde_class(tmp_path, "week4", threads=1.5)
    with pytest.raises(SystemExit):
        classroom.main(["week4", "--course", str(tmp_path)])
