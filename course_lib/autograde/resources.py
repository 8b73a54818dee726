"""Each sandbox's own share of the machine: memory, processes, CPU, disk and output.

Per-process limits (``setrlimit``) do not bound a submission that starts many processes: three
processes may each hold the whole address-space limit, a hundred files may each stay under the
file-size limit, and forty busy processes slow down the student graded beside them. So every
sandbox also runs inside its own **control group** (the kernel's accounting of a group of
processes, children included), with

- a cap on the memory of all its processes together (``memory.limit_in_bytes`` in cgroup v1,
  ``memory.max`` in v2; its tmpfs pages count too): past it, the kernel's OOM killer picks a
  process *of that sandbox*, never the grader or a neighbour;
- a cap on its processes and threads (``pids.max``): a fork bomb stops at it;
- a CPU quota of ``threads`` cores (``cpu.cfs_quota_us`` / ``cpu.max``) and the CPU weight
  of ``threads`` busy processes (``cpu.shares`` / ``cpu.weight``; a group competes with the
  machine's other processes as one): with ``workers x threads`` = the cores, no sandbox can
  take another's core, and all sandboxes weigh the same.

Its disk is capped by bubblewrap itself (a size-limited tmpfs, see :mod:`.sandbox`), and its
output by the grader, which reads at most ``output_bytes`` of it.

The groups are made by maintained tools, never by writing to ``/sys/fs/cgroup`` here:
``systemd-run --scope`` where systemd is the init system, otherwise Debian's ``cgroup-tools``
(``cgcreate``, ``cgset``, ``cgexec``, ``cgget``, ``cgdelete``), for cgroup v1 and v2.

A grader running as root also gives each sandbox its own unprivileged uid (a free one of
``UID_RANGE``, held with a lock file while the sandbox runs), so that ``RLIMIT_NPROC`` binds
(the kernel never applies it to root) and the student's code holds no root rights even in its
namespaces. (A grader that is not root runs bubblewrap as its own unprivileged user already;
the process cap is then the control group's alone.)

:func:`missing` says which of these controls cannot be made here and what is lost without
each; autograding refuses to run then, unless the instructor passes ``--unsafe-no-limits``.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

PARENT = "course-sandbox"                 # every sandbox's group is PARENT/<name>
CONTROLLERS = "memory,pids,cpu"
UID_RANGE = range(62000, 62256)           # unprivileged uids no account uses (checked by free_uids)
LOCKS = Path(tempfile.gettempdir()) / "course-sandbox-uids"
PERIOD_US = 100_000                       # the CPU quota's period
CONTROL_FILES = {1: {"memory": "memory.limit_in_bytes", "pids": "pids.max", "cpu": "cpu.shares"},
                 2: {"memory": "memory.max", "pids": "pids.max", "cpu": "cpu.weight"}}   # one per controller

LOSSES = {
    "memory": "the memory cap: one submission's processes together can take all the machine's memory, "
              "and the kernel's OOM killer then kills any process (the grader, a neighbour's kernel)",
    "pids": "the process cap: a fork bomb fills the process table until the time limit ends it",
    "cpu": "the CPU share: a submission's background processes slow the students graded beside it, "
           "whose tests may then fail on a time limit",
    "uid": "the per-sandbox uid: RLIMIT_NPROC never binds root, and the student's code runs as root "
           "inside its namespaces",
}


def systemd_is_init() -> bool:
    """True where systemd is PID 1 (its ``systemd-run --scope`` then makes the groups)."""
    try:
        return Path("/proc/1/comm").read_text().strip() == "systemd" and shutil.which("systemd-run") is not None
    except OSError:
        return False


def cgroup_version() -> int:
    """2 on a unified (cgroup v2 only) hierarchy, else 1: ``stat -f`` names the file system."""
    kind = subprocess.run(["stat", "-fc", "%T", "/sys/fs/cgroup"], capture_output=True, text=True).stdout.strip()
    return 2 if kind == "cgroup2fs" else 1


def settings(version: int, memory_bytes: int, processes: int, cpus: int) -> dict:
    """The control files and values of one sandbox's group, for cgroup ``version`` 1 or 2."""
    if version == 2:
        return {"memory.max": memory_bytes, "memory.swap.max": 0, "pids.max": processes,
                "cpu.max": f"{cpus * PERIOD_US} {PERIOD_US}", "cpu.weight": 100 * cpus}
    return {"memory.limit_in_bytes": memory_bytes, "pids.max": processes, "cpu.cfs_period_us": PERIOD_US,
            "cpu.cfs_quota_us": cpus * PERIOD_US, "cpu.shares": 1024 * cpus}


def systemd_properties(memory_bytes: int, processes: int, cpus: int) -> list[str]:
    """The same caps as ``systemd-run`` properties."""
    return ["-p", f"MemoryMax={memory_bytes}", "-p", "MemorySwapMax=0", "-p", f"TasksMax={processes}",
            "-p", f"CPUQuota={cpus * 100}%", "-p", f"CPUWeight={100 * cpus}"]


def systemd_prefix(memory_bytes: int, processes: int, cpus: int) -> list[str]:
    """``systemd-run --scope`` with the caps (``--user`` for a grader that is not root: its
    user manager must have the controllers delegated, as on most cgroup v2 desktops)."""
    user = [] if os.geteuid() == 0 else ["--user"]
    return ["systemd-run", *user, "--scope", "--quiet", "--collect",
            *systemd_properties(memory_bytes, processes, cpus), "--"]


def _tool(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True)


class Group:
    """One sandbox's control group (cgroup-tools): made with its caps, entered through
    :attr:`prefix`, read by :meth:`peak`, deleted by :meth:`close`."""

    def __init__(self, memory_bytes: int, processes: int, cpus: int, name: str | None = None):
        # named after the grader process that made it, so that one it left behind when it was
        # killed can be recognised (remove_orphans)
        self.name = f"{PARENT}/{os.getpid()}-{name or uuid.uuid4().hex[:12]}"
        self.version = cgroup_version()
        made = _tool("cgcreate", "-g", f"{CONTROLLERS}:{self.name}")
        if made.returncode != 0:
            raise OSError(f"cgcreate failed: {made.stderr.strip()}")
        values = settings(self.version, memory_bytes, processes, cpus)
        if self.version == 1:      # v1: the period must be set before a quota that depends on it
            values = {"cpu.cfs_period_us": values.pop("cpu.cfs_period_us"), **values}
        for key, value in values.items():
            done = _tool("cgset", "-r", f"{key}={value}", self.name)
            if done.returncode != 0:
                self.close()
                raise OSError(f"cgset {key}={value} failed: {done.stderr.strip()}")
        self.prefix = ["cgexec", "-g", f"{CONTROLLERS}:{self.name}"]

    def read(self, key: str) -> int | None:
        """The group's control file ``key`` as a number (None if it has no such file, or no number)."""
        value = _tool("cgget", "-n", "-v", "-r", key, self.name).stdout.strip()
        return int(value) if value.isdigit() else None

    def peak(self) -> dict:
        """The group's peak memory (bytes) and process count, for measuring what a submission needs."""
        memory = "memory.max_usage_in_bytes" if self.version == 1 else "memory.peak"
        return {"memory_bytes": self.read(memory), "processes": self.read("pids.peak")}

    def close(self, patience: float = 10.0) -> None:
        """Delete the group, one controller at a time (cgdelete 2.0 deletes only the first of a
        list), waiting up to ``patience`` seconds for the killed processes to be reaped (a
        group with a process left, even a zombie, cannot be deleted)."""
        left = CONTROLLERS.split(",")
        deadline = time.monotonic() + patience
        while left and time.monotonic() < deadline:
            for controller in left:
                _tool("cgdelete", "-r", "-g", f"{controller}:{self.name}")
            left = [c for c in left if self.read(CONTROL_FILES[self.version][c]) is not None]
            if left:
                time.sleep(0.1)


def remove_orphans() -> None:
    """Delete the empty groups that graders killed before they could delete them left behind
    (their maker's process is gone; lscgroup lists them)."""
    listed = _tool("lscgroup").stdout.splitlines()
    for line in listed:
        controller, _, path = line.partition(":")
        name = path.strip("/").removeprefix(f"{PARENT}/")
        maker = name.split("-")[0]
        if not path.strip("/").startswith(f"{PARENT}/") or not maker.isdigit():
            continue
        try:
            os.kill(int(maker), 0)
        except ProcessLookupError:
            _tool("cgdelete", "-g", f"{controller}:{path}")
        except PermissionError:
            pass


def free_uids() -> list[int]:
    """The uids of UID_RANGE that no account of this machine has."""
    import pwd
    taken = {entry.pw_uid for entry in pwd.getpwall()}
    return [uid for uid in UID_RANGE if uid not in taken]


@contextmanager
def own_uid():
    """A uid of UID_RANGE that no other sandbox on this machine holds while this one runs
    (a lock file per uid, released when the sandbox ends or the grader dies)."""
    LOCKS.mkdir(mode=0o700, exist_ok=True)
    for uid in free_uids():
        handle = open(LOCKS / str(uid), "w")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        try:
            yield uid
        finally:
            handle.close()
        return
    raise OSError(f"every uid of {UID_RANGE.start}-{UID_RANGE.stop - 1} is held by a running sandbox")


def as_uid(uid: int) -> list[str]:
    """The command prefix that drops to ``uid`` (util-linux's ``setpriv``), groups cleared."""
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--"]


def _group_probe() -> str:
    """"" when a capped group can be made here, else why not."""
    if systemd_is_init():
        probe = _tool(*systemd_prefix(2**30, 64, 1), "true")
        return "" if probe.returncode == 0 else f"systemd-run --scope failed: {probe.stderr.strip()}"
    if shutil.which("cgcreate") is None:
        return "cgroup-tools is not installed (Debian: apt-get install cgroup-tools)"
    remove_orphans()
    try:
        group = Group(2**30, 64, 1, name="probe")
    except OSError as err:
        return f"no control group can be made here ({err})"
    group.close()
    return ""


def missing() -> dict:
    """{control: why it cannot be made here} for each control of LOSSES that is lost."""
    lost = {}
    why = _group_probe()
    if why:
        lost.update({name: why for name in ("memory", "pids", "cpu")})
    if os.geteuid() == 0 and (shutil.which("setpriv") is None or not free_uids()):
        lost["uid"] = "setpriv (util-linux) is missing, or every uid of the range has an account"
    return lost


def losses_text(lost: dict) -> str:
    """What is lost, control by control, and why."""
    return "; ".join(f"{LOSSES[name]} ({why})" for name, why in lost.items())


class LimitsRefusal(RuntimeError):
    """A per-sandbox control cannot be made here, and the instructor did not accept the loss."""


def require_controls(unsafe: bool, lost: dict, log=print) -> None:
    """Refuse to grade when a control of ``lost`` (see :func:`missing`) is missing, unless
    ``unsafe``; then say what is lost."""
    if not lost:
        return
    if not unsafe:
        raise LimitsRefusal("autograding refuses to run: without " + losses_text(lost) + ". Install cgroup-tools "
                            "and run the grader as root (or under systemd with delegated controllers), or pass "
                            "--unsafe-no-limits (nbgrader: --TrustedExecute.unsafe_no_limits=True) to accept it")
    log("WARNING: grading without " + losses_text(lost))
