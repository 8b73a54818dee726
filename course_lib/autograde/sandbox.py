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
- **one writable folder**, ``/sandbox``: a tmpfs of at most ``disk_bytes`` (bubblewrap's
  ``--size``) holding the submission's copy (``work/``), a fresh, empty HOME, ``/tmp`` and
  ``out/``, so that everything it writes counts against one cap; when it ends, ``out/`` is
  handed to the grader as a tar stream (at most ``output_bytes``, read on a pipe) and the
  rest vanishes with it;
- **limits per process** on CPU seconds, address space, file size and open files
  (``setrlimit``, inherited by every process), a wall-clock limit, and a private PID
  namespace: when the sandbox ends, for whatever reason, the kernel kills every process it
  started (``--die-with-parent`` and the namespace's init process going away);
- **limits per sandbox** (:mod:`.resources`): its own control group caps the memory of all
  its processes together, their number and its CPU share, and (as root) its own
  unprivileged uid makes ``RLIMIT_NPROC`` bind;
- ``--new-session``, so nothing inside can push keystrokes into the grader's terminal.

The grader's console reads at most the last ``CONSOLE_CHARS`` of what the sandbox prints.

:func:`available` says whether such a sandbox can be made here; the autograder refuses to
run without one unless the instructor explicitly accepts the loss (``--unsafe-no-sandbox``).
"""
from __future__ import annotations

import functools
import math
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import course_lib

from ..checks import check_float, check_int
from . import resources

BWRAP = "bwrap"
SANDBOX_ROOT = Path("/sandbox")            # the sandbox's only writable folder (a tmpfs)
HANDED_IN = SANDBOX_ROOT / "handed-in"     # the host's copy of the submission, read-only
EXPORT_GRACE = 60.0                        # seconds past the wall-clock limit for handing out/ over
CONSOLE_CHARS = 20_000
SHM_BYTES = 64 * 2**20                     # /dev/shm, a tmpfs of its own (counted in the memory cap)
MAX_OUTPUT_FILES = 10_000
# Inside, around the command ($1: the pipe's fd, $2: the wall-clock limit, $3: the uid or -):
# copy the submission into the tmpfs, hand the folders to the uid, run the command as that uid
# (killed at the limit), report the disk used, hand out/ over.
WRAPPER = ('export_fd=$1; limit=$2; uid=$3; shift 3\n'
           'if [ "$uid" = - ]; then as_student=; else\n'
           f'  chown "$uid:$uid" {" ".join(str(SANDBOX_ROOT / n) for n in ("work", "home", "tmp", "out"))}\n'
           '  as_student="setpriv --reuid=$uid --regid=$uid --clear-groups --inh-caps=-all --bounding-set=-all --"\n'
           'fi\n'
           f'$as_student cp -R {HANDED_IN}/. {SANDBOX_ROOT}/work/ || exit 70\n'
           'timeout -s KILL "$limit" $as_student "$@"; status=$?\n'
           f'echo "sandbox disk used: $(df -B1 --output=used {SANDBOX_ROOT} | tail -n 1)"\n'
           f'tar -C {SANDBOX_ROOT}/out -cf "/proc/self/fd/$export_fd" . 2>/dev/null\n'
           'exit $status\n')
WRAPPER_CAPS = ("CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_SETUID", "CAP_SETGID",
                "CAP_SETPCAP")
ETC_FILES = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "nsswitch.conf", "passwd", "group",
             "localtime", "fonts", "hosts")
UNSAFE_LOSSES = (
    ("the student's code runs with your user's rights: it can read the answer key and the reference "
     "model, rewrite the gradebook, other submissions and your IPython profile, reach the network, "
     "and leave processes running after grading"),
)


@dataclass(frozen=True)
class Limits:
    """Resource limits of one sandbox run: per sandbox (all its processes together: memory,
    processes, CPU cores, disk, output, wall clock) and per process (the rest)."""

    wall_seconds: float = 600.0
    sandbox_memory_bytes: int = 4 * 2**30   # all its processes (and its tmpfs) together
    processes: int = 256                    # processes and threads together
    disk_bytes: int = 2 * 2**30             # the tmpfs: submission copy, HOME, /tmp, out/
    output_bytes: int = 1 * 2**30           # the most of out/ the grader reads back
    threads: int = 1                        # its CPU quota in cores, and the torch/OpenMP/BLAS threads
    cpu_seconds: int = 1200                 # per process
    memory_bytes: int = 12 * 2**30          # address space per process: torch maps GBs of libraries
    file_bytes: int = 512 * 2**20           # the largest file it may write
    open_files: int = 1024

    def __post_init__(self):
        check_float("wall_seconds", self.wall_seconds, 0, math.inf, low_open=True)
        for name in ("sandbox_memory_bytes", "processes", "disk_bytes", "output_bytes", "threads", "cpu_seconds",
                     "memory_bytes", "file_bytes", "open_files"):
            check_int(name, getattr(self, name), 1)


@dataclass
class Result:
    """How a sandbox run ended: exit code (None when killed at the wall-clock limit), seconds,
    the end of its console output, and what it used (peak memory and processes of its group,
    disk at the end; None where not measured)."""

    returncode: int | None
    seconds: float
    stdout: str = ""
    timed_out: bool = False
    command: list = field(default_factory=list)
    output_truncated: bool = False
    usage: dict = field(default_factory=dict)

    def exhausted(self, limits: Limits) -> str:
        """What of the sandbox's disk or output the submission used up ("" if nothing): the
        reason its later results are missing, to show beside them."""
        if self.usage.get("disk_bytes", 0) >= 0.99 * limits.disk_bytes:
            return f"your notebook filled the sandbox's disk ({limits.disk_bytes / 2**30:g} GiB), so results " \
                   f"could not be written"
        if self.output_truncated:
            return f"your notebook's results were more than the {limits.output_bytes / 2**30:g} GiB the grader reads"
        return ""


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


def _python_binds() -> list[tuple]:
    """The interpreter, the virtual environment and the course_lib source (read-only mounts)."""
    package = Path(course_lib.__file__).resolve().parent
    paths = {Path(sys.base_prefix).resolve(), Path(sys.prefix).resolve(), package}
    return [(str(path), str(path)) for path in sorted(paths) if not str(path).startswith("/usr/")]


def _mount_points(paths: list) -> list[str]:
    """Every folder above the mounts, made world-readable (bwrap would copy the host's modes,
    and a private /root above a pyenv Python would hide it from the sandbox's uid)."""
    made, args = {"/", "/usr", "/tmp", str(SANDBOX_ROOT)}, []
    for path in paths:
        for parent in reversed(Path(path).parents):
            if str(parent) not in made and not str(parent).startswith(("/usr/", f"{SANDBOX_ROOT}/")):
                made.add(str(parent))
                args += ["--perms", "0755", "--dir", str(parent)]
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
           # never import from the working folder (the hand-in): a file named like a module
           # there must not replace that module in the harvest or the kernel
           "PYTHONSAFEPATH": "1",
           "MPLBACKEND": "Agg", "MPLCONFIGDIR": "/tmp", "NBGRADER_EXECUTION": "autograde",
           "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads,
           "TORCH_NUM_THREADS": threads, "JUPYTER_PLATFORM_DIRS": "1", "PYDEVD_DISABLE_FILE_VALIDATION": "1"}
    env.update(extra or {})
    return env


def command(limits: Limits, uid: int | None = None, env: dict | None = None, binds: tuple = ()) -> list[str]:
    """The bwrap command line, up to WRAPPER's arguments (the export pipe's fd, the wall-clock
    limit, the uid, then the command), over a fresh tmpfs ``/sandbox``.

    ``binds`` are (host folder, path inside) pairs mounted read-only (the submission's copy at
    ``HANDED_IN``, the grader's inputs, the instructor's zoo). With ``uid`` (a grader running
    as root), bwrap makes no user namespace and keeps only the capabilities WRAPPER needs to
    hand the sandbox's folders to ``uid`` and switch to it; the command runs with none.
    """
    if uid is None:
        cmd = [BWRAP, "--unshare-all"]
    else:
        cmd = [BWRAP, "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try",
               "--cap-drop", "ALL", *[x for cap in WRAPPER_CAPS for x in ("--cap-add", cap)]]
    # /tmp is a (relative) link into the tmpfs, made before anything is mounted under it (the
    # virtual environment or the kit may live under /tmp, as in a CI checkout).
    cmd += ["--die-with-parent", "--new-session", "--hostname", "sandbox",
            "--size", str(limits.disk_bytes), "--tmpfs", str(SANDBOX_ROOT)]
    for name in ("work", "home", "tmp", "out"):
        cmd += ["--dir", str(SANDBOX_ROOT / name)]
    cmd += ["--symlink", str(SANDBOX_ROOT.relative_to("/") / "tmp"), "/tmp", "--ro-bind", "/usr", "/usr", *_usr_links(),
            *_etc_binds(), "--proc", "/proc", "--dev", "/dev",
            # POSIX semaphores and shared memory (multiprocessing, joblib) for the sandbox's uid
            "--perms", "1777", "--size", str(SHM_BYTES), "--tmpfs", "/dev/shm"]
    mounts = [*_python_binds(), *[(str(source), str(inside)) for source, inside in binds]]
    cmd += _mount_points([inside for _, inside in mounts])
    for source, inside in mounts:
        cmd += ["--ro-bind", source, inside]
    cmd += ["--remount-ro", "/", "--chdir", str(SANDBOX_ROOT / "work"), "--clearenv"]
    for key, value in environment(limits, env).items():
        cmd += ["--setenv", key, value]
    return [*cmd, "--", "/bin/sh", "-c", WRAPPER, "sandbox"]


def prepare(scratch: Path) -> None:
    """The host's scratch layout: work/ (the submission to copy in), out/ (what comes back),
    and home/, tmp/, in/ for an unsafe run without a sandbox."""
    for name in ("work", "home", "tmp", "in", "out"):
        (scratch / name).mkdir(parents=True, exist_ok=True)


def _set_limits(limits: Limits, processes: int | None):
    def apply():
        os.setsid()
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds))
        resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_bytes, limits.file_bytes))
        resource.setrlimit(resource.RLIMIT_NOFILE, (limits.open_files, limits.open_files))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if processes is not None:   # counted per uid: only with the sandbox's own uid
            resource.setrlimit(resource.RLIMIT_NPROC, (processes, processes))
    return apply


def readable_by_all(folder: Path) -> None:
    """Let any uid read the files under ``folder`` (the grader's inputs, the released zoo:
    what every submission is given anyway), for the sandbox's own uid. (safetensors writes
    its files for their owner only.)"""
    for path in [folder, *folder.rglob("*")]:
        if path.is_symlink():
            continue
        mode = path.stat().st_mode
        wanted = mode | stat.S_IROTH | (stat.S_IXOTH if path.is_dir() else 0)
        if wanted != mode:
            path.chmod(wanted)


@functools.lru_cache(maxsize=1)
def lost_controls() -> dict:
    """The per-sandbox controls that cannot be made here (probed once per process)."""
    return resources.missing()


def run(scratch: Path, argv: list[str], limits: Limits = Limits(), env: dict | None = None,
        binds: tuple = (), controls: bool = True, stdin: bytes = b"") -> Result:
    """Run ``argv`` in a sandbox; kill everything it started when it ends; its ``out/`` lands
    in ``scratch/out``.

    The scratch folder must have been made by :func:`prepare`, with the submission in
    ``scratch/work``. Never raises for what happens inside: a crash, a hang (killed after
    ``limits.wall_seconds``) or a kill is reported in the :class:`Result`. ``controls=False``
    leaves out the control group and the uid (only to measure what they cost). ``stdin`` is
    what the command reads on its standard input (the harvest's signing key).
    """
    scratch = Path(scratch)
    lost = lost_controls() if controls else {name: "not asked for" for name in resources.LOSSES}
    with ExitStack() as stack:
        prefix, group, uid = [], None, None
        if "memory" not in lost and resources.systemd_is_init():
            prefix = resources.systemd_prefix(limits.sandbox_memory_bytes, limits.processes, limits.threads)
        elif "memory" not in lost:
            group = resources.Group(limits.sandbox_memory_bytes, limits.processes, limits.threads)
            stack.callback(group.close)
            prefix = list(group.prefix)
        if os.geteuid() == 0 and "uid" not in lost:
            uid = stack.enter_context(resources.own_uid())
            for source, _ in binds:
                readable_by_all(Path(source))
        cmd = command(limits, uid, env, ((scratch / "work", HANDED_IN), *binds))
        read_end, write_end = os.pipe()
        cmd = [*prefix, *cmd, str(write_end), f"{limits.wall_seconds:g}", "-" if uid is None else str(uid), *argv]
        result = _run(cmd, limits, processes=None if uid is None else limits.processes, pass_fds=(write_end,),
                      export=(read_end, write_end, scratch / "out"), stdin=stdin)
        if group is not None:
            result.usage.update(group.peak())
        return result


def run_unsandboxed(scratch: Path, argv: list[str], limits: Limits, env: dict, stdin: bytes = b"") -> Result:
    """``argv`` as a plain child process in ``scratch`` with the same per-process limits: the
    instructor's explicit, unsafe fallback where no sandbox can be made (see ``UNSAFE_LOSSES``)."""
    return _run(argv, limits, cwd=Path(scratch) / "work", env=env, stdin=stdin)


class _Capped:
    """A file-like reader that gives at most ``cap`` bytes of ``handle`` (and notes if there was more)."""

    def __init__(self, handle, cap: int):
        self.handle, self.left, self.truncated = handle, cap, False

    def read(self, size: int = -1) -> bytes:
        if self.left <= 0:
            self.truncated = self.truncated or bool(self.handle.read(1))
            return b""
        data = self.handle.read(self.left if size < 0 else min(size, self.left))
        self.left -= len(data)
        return data


def _receive(handle, cap: int, dest: Path, report: dict) -> None:
    """Extract the tar stream of ``out/`` into ``dest``: regular files only, at most ``cap``
    bytes and MAX_OUTPUT_FILES files, nothing outside ``dest`` (tarfile's ``data`` filter)."""
    stream = _Capped(handle, cap)
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for count, member in enumerate(tar):
                if count >= MAX_OUTPUT_FILES:
                    report["truncated"] = True
                    break
                if member.isfile():
                    tar.extract(member, dest, filter="data")
    except (tarfile.TarError, OSError):
        pass              # a broken or missing stream: the results it held are the student's loss
    finally:
        report["truncated"] = report.get("truncated", False) or stream.truncated
        handle.close()


def _console(handle, report: dict) -> None:
    """Read everything the sandbox prints, keeping only its last CONSOLE_CHARS characters."""
    tail = b""
    while chunk := handle.read(65536):
        tail = (tail + chunk)[-4 * CONSOLE_CHARS:]
    report["console"] = tail.decode(errors="replace")[-CONSOLE_CHARS:]


def _run(cmd: list[str], limits: Limits, cwd: Path | None = None, env: dict | None = None,
         processes: int | None = None, pass_fds: tuple = (), export: tuple | None = None,
         stdin: bytes = b"") -> Result:
    start = time.perf_counter()
    grace = EXPORT_GRACE if export else 0.0
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                               preexec_fn=_set_limits(limits, processes), cwd=cwd, env=env, pass_fds=pass_fds)
    if stdin:
        try:
            process.stdin.write(stdin)
            process.stdin.close()
        except OSError:       # the sandbox ended before reading it: its results are unsigned
            pass
    report = {}
    threads = [threading.Thread(target=_console, args=(process.stdout, report), daemon=True)]
    if export:
        read_end, write_end, dest = export
        os.close(write_end)
        threads.append(threading.Thread(target=_receive, daemon=True,
                                        args=(os.fdopen(read_end, "rb"), limits.output_bytes, dest, report)))
    for thread in threads:
        thread.start()
    timed_out = False
    try:
        process.wait(timeout=limits.wall_seconds + grace)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        _kill_group(process)
        process.wait()
    for thread in threads:
        thread.join(timeout=30)
    seconds = time.perf_counter() - start
    # inside, timeout(1) kills the command at the limit with SIGKILL (exit status 137)
    timed_out = timed_out or (export is not None and process.returncode == 137 and seconds >= limits.wall_seconds)
    console = report.get("console", "")
    usage = {}
    for line in console.splitlines()[::-1]:
        if line.startswith("sandbox disk used: ") and line.split()[-1].isdigit():
            usage["disk_bytes"] = int(line.split()[-1])
            break
    return Result(None if timed_out else process.returncode, seconds, console, timed_out, cmd,
                  report.get("truncated", False), usage)


def _kill_group(process: subprocess.Popen) -> None:
    """SIGKILL the sandbox's process group (bwrap, and with it its PID namespace)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
