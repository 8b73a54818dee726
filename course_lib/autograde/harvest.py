"""Inside the sandbox: run a submission's notebook and call its functions on the grader's inputs.

``python -m course_lib.autograde.harvest ROOT NOTEBOOK CELL_TIMEOUT`` is the only program the
autograder starts in a sandbox (:mod:`.sandbox`). ``ROOT`` holds ``work/`` (the submission,
with ``NOTEBOOK.ipynb``), ``in/`` (the grader's inputs and ``plans.json``, read-only) and
``out/``. It reads the calls the grader planned for ``NOTEBOOK`` (see :mod:`.plan`), then

1. starts a Jupyter kernel and executes the notebook's code cells one by one, except the
   autograder's test cells (those are decided outside, by :mod:`.verdicts`), with a time
   limit per cell; it records each cell's outputs for the student's feedback;
2. performs every call of the plan in that kernel (:func:`.calls.perform`): each writes the
   function's return value as tensors to a file whose name is drawn at random just before the
   call; when the call has returned in time, this program copies that file to
   ``out/<call id>.safetensors`` and *signs* the copy (an HMAC with a key the grader passed
   on stdin, which student code never sees: it is read before any kernel starts, and this
   process is made non-dumpable so that processes of the same uid cannot read its memory).
   A call that raised, hung or killed its kernel gets ``out/<call id>.error.txt`` and no
   signature. The grader believes a result only with its signature (:mod:`.verdicts`): a file
   that student code wrote before the call, after it, or for a call that failed counts for
   nothing.

A cell or a call that kills its kernel, or hangs and ignores the interrupt, loses only
itself: the kernel is restarted, the cells that completed before are replayed, and the next
cell or call runs. Nothing this program writes is trusted: the grader reads the output files
as plain data and decides every score itself.
"""
from __future__ import annotations

import ctypes
import hashlib
import hmac
import json
import os
import secrets
import stat
import sys
import time
from pathlib import Path
from queue import Empty

import nbformat
from jupyter_client import KernelManager

KERNEL_ARGUMENTS = ["--HistoryManager.hist_file=:memory:", "--InteractiveShellApp.ignore_cwd=True"]
INTERRUPT_GRACE = 5.0   # seconds a kernel gets to stop after an interrupt before it is killed


class Kernel:
    """One Jupyter kernel that can run code with a time limit, and be replaced when it dies."""

    def __init__(self, startup_timeout: float = 120):
        self.startup_timeout = startup_timeout
        self.manager = self.client = None
        self.start()

    def start(self) -> None:
        self.manager = KernelManager(kernel_name="python3")
        self.manager.start_kernel(extra_arguments=KERNEL_ARGUMENTS)
        self.client = self.manager.blocking_client()
        self.client.start_channels()
        self.client.wait_for_ready(timeout=self.startup_timeout)

    def restart(self) -> None:
        """Kill the kernel (and everything it started) and start a fresh one."""
        self.client.stop_channels()
        self.manager.shutdown_kernel(now=True)
        self.start()

    def run(self, code: str, timeout: float) -> tuple[str, list]:
        """Execute ``code``; returns (status, outputs).

        status is ``ok``, ``error`` (it raised: the kernel's own reply says so, even when the
        student silenced IPython's error display), ``interrupted`` (stopped at the time limit,
        kernel still usable), ``timeout`` (it ignored the interrupt) or ``died``.
        """
        msg_id = self.client.execute(code, store_history=False, allow_stdin=False)
        outputs, deadline, interrupted = [], time.monotonic() + timeout, False
        while True:
            if not self.manager.is_alive():
                return "died", outputs
            if time.monotonic() > deadline:
                if interrupted:
                    return "timeout", outputs
                self.manager.interrupt_kernel()
                interrupted, deadline = True, time.monotonic() + INTERRUPT_GRACE
            try:
                msg = self.client.get_iopub_msg(timeout=0.2)
            except Empty:
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind = msg["msg_type"]
            if kind == "status" and msg["content"]["execution_state"] == "idle":
                return ("interrupted" if interrupted else self._reply_status(msg_id, outputs)), outputs
            if kind in ("stream", "display_data", "execute_result", "error"):
                outputs.append(nbformat.v4.output_from_msg(msg))

    def _reply_status(self, msg_id: str, outputs: list) -> str:
        """ok or error, from the kernel's execute reply (an error the display hid is added)."""
        while True:
            try:
                reply = self.client.get_shell_msg(timeout=5)
            except Empty:
                return "error" if any(o.output_type == "error" for o in outputs) else "ok"
            if reply["parent_header"].get("msg_id") == msg_id:
                break
        content = reply["content"]
        if content.get("status") == "ok":
            return "ok"
        if not any(o.output_type == "error" for o in outputs):
            name, value = str(content.get("ename", "Error")), str(content.get("evalue", ""))
            outputs.append(nbformat.v4.new_output("error", ename=name, evalue=value, traceback=[f"{name}: {value}"]))
        return "error"

    def shutdown(self) -> None:
        self.client.stop_channels()
        self.manager.shutdown_kernel(now=True)


def _failure(status: str, timeout: float) -> dict:
    """The error output recorded for a cell that hung or killed its kernel."""
    if status in ("timeout", "interrupted"):
        name, value = "CellTimeoutError", f"the cell did not finish within {timeout:g} s and was stopped"
    else:
        name, value = "DeadKernelError", "the kernel died while running this cell (it was restarted)"
    return nbformat.v4.new_output("error", ename=name, evalue=value, traceback=[f"{name}: {value}"])


def is_test_cell(cell) -> bool:
    """An autograder test cell (graded, not a solution): decided by the grader, never run here."""
    meta = cell.get("metadata", {}).get("nbgrader", {})
    return bool(meta.get("grade")) and not meta.get("solution")


class Session:
    """The notebook's completed cells, replayed into a fresh kernel whenever one is lost."""

    def __init__(self, cell_timeout: float):
        self.cell_timeout = cell_timeout
        self.kernel = Kernel()
        self.completed: list[str] = []

    def run(self, code: str, timeout: float, *, keep: bool) -> tuple[str, list]:
        status, outputs = self.kernel.run(code, timeout)
        if status in ("interrupted", "timeout", "died"):
            outputs.append(_failure(status, timeout))
        if status in ("timeout", "died"):
            self.recover()
        elif keep and status != "interrupted":
            self.completed.append(code)
        return status, outputs

    def recover(self) -> None:
        """A fresh kernel with every completed cell run again (a cell that now fails is dropped)."""
        self.kernel.restart()
        replayed = []
        for code in self.completed:
            status, _ = self.kernel.run(code, self.cell_timeout)
            if status in ("timeout", "died"):
                self.kernel.restart()
                continue
            if status != "interrupted":
                replayed.append(code)
        self.completed = replayed


def execute_cells(session: Session, notebook) -> dict:
    """Run every code cell except the test cells; returns {cell index: outputs}."""
    outputs = {}
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type != "code" or is_test_cell(cell) or not cell.source.strip():
            continue
        _, outputs[index] = session.run(cell.source, session.cell_timeout, keep=True)
    return outputs


RECORD = "record.json"     # {call id: signature} of the calls that returned in time


def signature(key: bytes, call_id: str, digest: bytes) -> str:
    """The HMAC-SHA256 that vouches for one call's result file (``digest``: its SHA-256)."""
    return hmac.new(key, call_id.encode() + b"\0" + digest, hashlib.sha256).hexdigest()


def _take_result(pending: Path, final: Path) -> bytes | None:
    """Copy the call's result file to ``final`` (new, never through a link); its SHA-256, or
    None if the call left no regular file."""
    try:
        source = os.open(pending, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    digest = hashlib.sha256()
    try:
        if not stat.S_ISREG(os.fstat(source).st_mode):
            return None
        final.unlink(missing_ok=True)
        target = os.open(final, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            while chunk := os.read(source, 1 << 20):
                digest.update(chunk)
                os.write(target, chunk)
        finally:
            os.close(target)
    finally:
        os.close(source)
        pending.unlink(missing_ok=True)      # one result on the sandbox's disk at a time, not two
    return digest.digest()


def perform_calls(session: Session, calls: list, inputs: Path, out: Path, key: bytes) -> dict:
    """Each call of the plan; returns {call id: signature} of those that returned in time. A
    call's error (or hang, or death) goes to ``<id>.error.txt``.

    A call may carry ``"give_up_after": N``: once N calls of its function have run past their
    limit, its remaining calls are not made (each gets an error that says so). The tournament
    asks for this, so that a detector that hangs costs its sandbox N time limits, not one per
    arena; the homework's plans never do."""
    record, pending, overruns = {}, out.parent / "tmp", {}
    for call in calls:
        function, limit = call.get("function"), call.get("give_up_after")
        if isinstance(limit, int) and overruns.get(function, 0) >= limit:
            (out / f"{call['id']}.error.txt").write_text(
                f"not called: {function} ran past its time limit on {limit} calls before this one")
            continue
        target = pending / f"result-{secrets.token_hex(16)}.safetensors"
        code = (f"__import__('course_lib.autograde.calls', fromlist=['perform']).perform("
                f"globals(), {json.dumps(call)!r}, {str(inputs)!r}, {str(target)!r})")
        status, outputs = session.run(code, call.get("timeout", session.cell_timeout), keep=False)
        if status in ("interrupted", "timeout"):
            overruns[function] = overruns.get(function, 0) + 1
        digest = _take_result(target, out / f"{call['id']}.safetensors") if status == "ok" else None
        if digest is not None:
            record[call["id"]] = signature(key, call["id"], digest)
        else:
            errors = [f"{o.ename}: {o.evalue}" for o in outputs if o.output_type == "error"]
            reason = errors[-1] if errors else status
            if status == "ok":
                reason = "the call finished but its result was never saved where the grader asked for it"
            (out / f"{call['id']}.safetensors").unlink(missing_ok=True)
            (out / f"{call['id']}.error.txt").write_text(reason[:2000])
    return record


def _private() -> bytes:
    """The grader's key from stdin (then stdin is closed, so no kernel inherits it), and this
    process made non-dumpable: same-uid processes cannot ptrace it or read its memory."""
    key = bytes.fromhex(sys.stdin.readline().strip() or "00")
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0)     # PR_SET_DUMPABLE, 0
    except (OSError, AttributeError):
        pass
    return key


def main(argv=None) -> None:
    key = _private()
    root, name, cell_timeout = (argv or sys.argv[1:])[:3]
    root = Path(root)
    inputs, out = root / "in", root / "out"
    calls = json.loads((inputs / "plans.json").read_text()).get(name, [])
    notebook = nbformat.read(root / "work" / f"{name}.ipynb", as_version=4)
    session = Session(float(cell_timeout))
    record = {}
    try:
        outputs = execute_cells(session, notebook)
        (out / "cells.json").write_text(json.dumps({str(k): v for k, v in outputs.items()}))
        record = perform_calls(session, calls, inputs, out, key)
    finally:
        session.kernel.shutdown()
        (out / RECORD).unlink(missing_ok=True)
        (out / RECORD).write_text(json.dumps(record))


if __name__ == "__main__":
    main()
