"""A throw-away bubblewrap sandbox for everything a student wrote.

A homework submission is hostile code (DESIGN.md, "threat model"): it may patch any module,
read or write any file its process can reach, start background processes, or kill and hang
its own kernel. The autograder therefore never runs it in its own process. It runs it with
`bubblewrap <https://github.com/containers/bubblewrap>`_ (Debian's ``bwrap``), which builds
a private view of the machine out of Linux namespaces:

- **no network** (``--unshare-all``: a new, empty network namespace with only loopback, which
  the Jupyter kernel needs to talk to its client);
- **read-only system**: ``/usr``, the Python installation, the virtual environment and the
  ``course_lib`` source, and nothing else of the host: not the course folder, not the
  grading files, not the gradebook, not other submissions, not the grader's HOME;
- **one writable folder**, the sandbox's own scratch folder, with a fresh, empty HOME and
  ``/tmp`` inside it;
- **limits** on CPU seconds, address space, file size and open files (``setrlimit``,
  inherited by every process), a wall-clock limit, and a private PID namespace: when the
  sandbox ends, for whatever reason, the kernel kills every process it started
  (``--die-with-parent`` and the namespace's init process going away);
- ``--new-session``, so nothing inside can push keystrokes into the grader's terminal.

What it does not limit: the number of processes (``RLIMIT_NPROC`` does not bind root, and
the grader usually runs as root), so a fork bomb slows the machine until the wall-clock
limit kills it; and the disk space of the scratch folder (each file is capped, not their
sum).

:func:`available` says whether such a sandbox can be made here; the autograder refuses to
run without one unless the instructor explicitly accepts the loss (``--unsafe-no-sandbox``).
"""
from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import course_lib

import math

from ..checks import check_float, check_int

BWRAP = "bwrap"
SANDBOX_ROOT = Path("/sandbox")            # where the scratch folder appears inside
ETC_FILES = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "nsswitch.conf", "passwd", "group",
             "localtime", "fonts", "hosts")
UNSAFE_LOSSES = (
    ("the student's code runs with your user's rights: it can read the answer key and the reference "
     "model, rewrite the gradebook, other submissions and your IPython profile, reach the network, "
     "and leave processes running after grading"),
)


@dataclass(frozen=True)
class Limits:
    """Resource limits of one sandbox run (per process, except ``wall_seconds``)."""

    wall_seconds: float = 600.0
    cpu_seconds: int = 1200
    memory_bytes: int = 12 * 2**30      # address space: torch maps several GB of libraries
    file_bytes: int = 512 * 2**20       # the largest file it may write
    open_files: int = 1024
    threads: int = 1                    # torch / OpenMP / BLAS threads of every process inside

    def __post_init__(self):
        check_float("wall_seconds", self.wall_seconds, 0, math.inf, low_open=True)
        for name in ("cpu_seconds", "memory_bytes", "file_bytes", "open_files", "threads"):
            check_int(name, getattr(self, name), 1)


@dataclass
class Result:
    """How a sandbox run ended: exit code (None when killed at the wall-clock limit), seconds, output."""

    returncode: int | None
    seconds: float
    stdout: str = ""
    timed_out: bool = False
    command: list = field(default_factory=list)


def available() -> tuple[bool, str]:
    """(True, "") when a bubblewrap sandbox starts here; else (False, why not)."""
    if shutil.which(BWRAP) is None:
        return False, "bubblewrap is not installed (Debian: apt-get install bubblewrap)"
    probe = subprocess.run([BWRAP, "--unshare-all", "--die-with-parent", "--ro-bind", "/usr", "/usr",
                            *_usr_links(), "/bin/true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return False, f"bwrap cannot create namespaces here: {probe.stderr.strip()}"
    return True, ""


def _usr_links() -> list[str]:
    """/bin, /lib... as on the host: symlinks into /usr (Debian's merged /usr) or read-only binds."""
    args = []
    for name in ("bin", "sbin", "lib", "lib64", "lib32"):
        path = Path("/") / name
        if path.is_symlink():
            args += ["--symlink", os.readlink(path), str(path)]
        elif path.is_dir():
            args += ["--ro-bind", str(path), str(path)]
    return args


def _python_binds() -> list[str]:
    """The interpreter, the virtual environment and the course_lib source, read-only."""
    package = Path(course_lib.__file__).resolve().parent
    paths = {Path(sys.base_prefix).resolve(), Path(sys.prefix).resolve(), package}
    args = []
    for path in sorted(paths):
        if not str(path).startswith("/usr/"):
            args += ["--ro-bind", str(path), str(path)]
    return args


def _etc_binds() -> list[str]:
    args = []
    for name in ETC_FILES:
        path = Path("/etc") / name
        if path.exists():
            args += ["--ro-bind", str(path), str(path)]
    return args


def environment(limits: Limits, extra: dict | None = None) -> dict:
    """The whole environment inside: nothing inherited from the grader."""
    threads = str(limits.threads)
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(SANDBOX_ROOT / "home"),
           "TMPDIR": "/tmp", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1",
           "MPLBACKEND": "Agg", "MPLCONFIGDIR": "/tmp", "NBGRADER_EXECUTION": "autograde",
           "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads,
           "TORCH_NUM_THREADS": threads, "JUPYTER_PLATFORM_DIRS": "1", "PYDEVD_DISABLE_FILE_VALIDATION": "1"}
    env.update(extra or {})
    return env


def command(scratch: Path, argv: list[str], limits: Limits, env: dict | None = None,
            binds: tuple = ()) -> list[str]:
    """The bwrap command line that runs ``argv`` with ``scratch`` as its only writable folder.

    ``binds`` are (host folder, path inside) pairs mounted read-only on top (the grader's
    inputs, the instructor's zoo).
    """
    # /tmp first: the virtual environment or the kit may live under /tmp (a CI checkout), and
    # a later mount on top of it must not be hidden by it.
    cmd = [BWRAP, "--unshare-all", "--die-with-parent", "--new-session", "--hostname", "sandbox",
           "--bind", str(scratch / "tmp"), "/tmp", "--bind", str(scratch), str(SANDBOX_ROOT),
           "--ro-bind", "/usr", "/usr", *_usr_links(), *_etc_binds(), *_python_binds(),
           "--proc", "/proc", "--dev", "/dev"]
    for source, inside in binds:
        cmd += ["--ro-bind", str(source), str(inside)]
    cmd += ["--remount-ro", "/", "--chdir", str(SANDBOX_ROOT / "work"), "--clearenv"]
    for key, value in environment(limits, env).items():
        cmd += ["--setenv", key, value]
    return [*cmd, "--", *argv]


def prepare(scratch: Path) -> None:
    """The scratch layout: work/ (the submission, the working directory), home/, tmp/, in/, out/."""
    for name in ("work", "home", "tmp", "in", "out"):
        (scratch / name).mkdir(parents=True, exist_ok=True)


def _set_limits(limits: Limits):
    def apply():
        os.setsid()
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds))
        resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_bytes, limits.file_bytes))
        resource.setrlimit(resource.RLIMIT_NOFILE, (limits.open_files, limits.open_files))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    return apply


def run(scratch: Path, argv: list[str], limits: Limits = Limits(), env: dict | None = None,
        binds: tuple = ()) -> Result:
    """Run ``argv`` in a sandbox over ``scratch``; kill everything it started when it ends.

    The scratch folder must have been made by :func:`prepare`. Never raises for what happens
    inside: a crash, a hang (killed after ``limits.wall_seconds``) or a kill is reported in
    the :class:`Result`.
    """
    return _run(command(Path(scratch), argv, limits, env, binds), limits)


def run_unsandboxed(scratch: Path, argv: list[str], limits: Limits, env: dict) -> Result:
    """``argv`` as a plain child process in ``scratch`` with the same limits: the instructor's
    explicit, unsafe fallback where no sandbox can be made (see ``UNSAFE_LOSSES``)."""
    return _run(argv, limits, cwd=Path(scratch) / "work", env=env)


def _run(cmd: list[str], limits: Limits, cwd: Path | None = None, env: dict | None = None) -> Result:
    start = time.perf_counter()
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               preexec_fn=_set_limits(limits), text=True, errors="replace", cwd=cwd, env=env)
    timed_out = False
    try:
        stdout, _ = process.communicate(timeout=limits.wall_seconds)
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_group(process)
        stdout, _ = process.communicate()
    finally:
        _kill_group(process)
    return Result(None if timed_out else process.returncode, time.perf_counter() - start, stdout[-20_000:],
                  timed_out, cmd)


def _kill_group(process: subprocess.Popen) -> None:
    """SIGKILL the sandbox's process group (bwrap, and with it its PID namespace)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
