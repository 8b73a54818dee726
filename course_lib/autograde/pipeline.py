"""One notebook of one submission, graded: sandbox run, trusted verdicts, outputs for feedback.

:func:`grade_notebook` is what both entry points call: nbgrader's own ``autograde`` (through
the :class:`.preprocessor.TrustedExecute` preprocessor) and the kit's parallel
``python -m course_lib autograde`` (:mod:`.classroom`), which computes it for many students at
once and lets nbgrader record the cached results. The cache key covers everything the result
depends on: the notebook's cells, every file handed in, the grader's inputs and the kit's
grading code, so an unchanged submission is never graded twice and a changed one always is.
"""
from __future__ import annotations

import hashlib
import json
import secrets
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nbformat

from .. import grading
from . import sandbox
from .verdicts import Context, Outputs, Verdict, decide, read_regular_file

SKIPPED = ("zoo", ".ipynb_checkpoints", "__pycache__")   # never copied into the sandbox, never hashed
MAX_CELL_OUTPUTS = 50
SAFE_MIME = ("text/plain", "image/png")
MODEL_FILES = (grading.MODEL_FILE, str(Path(grading.MODEL_FILE).with_suffix(".json")))   # never in a sandbox


@dataclass(frozen=True)
class Settings:
    """How a notebook is run: time limit per cell, the sandbox's limits, and the unsafe switch."""

    cell_timeout: float = 120.0
    limits: sandbox.Limits = field(default_factory=sandbox.Limits)
    unsafe_no_sandbox: bool = False


@dataclass
class NotebookResult:
    """The graded notebook: outputs of the student's cells, a verdict per test, and timings."""

    key: str
    cells: dict = field(default_factory=dict)          # cell index -> outputs (sanitized)
    verdicts: dict = field(default_factory=dict)       # grade id -> Verdict
    seconds: float = 0.0
    sandbox_seconds: float = 0.0
    usage: dict = field(default_factory=dict)          # what the sandbox used (sandbox.Result.usage)
    note: str = ""

    def to_json(self) -> str:
        data = asdict(self)
        data["verdicts"] = {k: asdict(v) for k, v in self.verdicts.items()}
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> NotebookResult:
        data = json.loads(text)
        data["verdicts"] = {k: Verdict(**v) for k, v in data["verdicts"].items()}
        return cls(**data)


def test_cells(nb) -> list[str]:
    """Grade ids of the autograder's test cells (graded code cells that are not solutions)."""
    return [c.metadata["nbgrader"]["grade_id"] for c in nb.cells
            if c.cell_type == "code" and c.metadata.get("nbgrader", {}).get("grade")
            and not c.metadata["nbgrader"].get("solution")]


def submission_files(folder: Path) -> list[Path]:
    """The files handed in (or overlaid by nbgrader), except notebooks and the instructor's zoo."""
    files = []
    for path in sorted(Path(folder).rglob("*")):
        relative = path.relative_to(folder)
        if any(part in SKIPPED for part in relative.parts) or path.suffix == ".ipynb":
            continue
        if path.is_file() and not path.is_symlink():
            files.append(path)
    return files


def code_version() -> str:
    """A hash of the grading code itself: a new rule invalidates every cached verdict."""
    digest = hashlib.sha256()
    here = Path(__file__).parent
    for path in sorted([*here.glob("*.py"), here.parent / "grading.py", *(here.parent / "homework").glob("*.py")]):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def cache_key(nb, folder: Path, inputs: Path) -> str:
    """What a result depends on: the notebook's cells, the files handed in, the grader's inputs
    and the grading code. Not the time limits: rerun with ``--force`` after changing them."""
    digest = hashlib.sha256()
    cells = [(c.cell_type, c.source, c.get("metadata", {}).get("nbgrader", {})) for c in nb.cells]
    digest.update(json.dumps(cells, sort_keys=True).encode())
    for path in submission_files(folder):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    digest.update((inputs / "plans.json").read_bytes())
    digest.update(code_version().encode())
    return digest.hexdigest()


def _copy_submission(folder: Path, work: Path, nb, name: str) -> None:
    """The submission's files and the notebook, into the sandbox's ``work``. Never the handed-in
    model: the grader reads it itself, and a trigger is a function of the image alone (a trigger
    that reads the model's weights to attack it is an evasion attack, not a backdoor)."""
    for path in submission_files(folder):
        if path.relative_to(folder).as_posix() in MODEL_FILES:
            continue
        dest = work / path.relative_to(folder)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)
    nbformat.write(nb, work / f"{name}.ipynb")


def _harvest_argv(root: Path, name: str, settings: Settings) -> list[str]:
    return [sys.executable, "-m", "course_lib.autograde.harvest", str(root), name, str(settings.cell_timeout)]


def run_in_sandbox(scratch: Path, inputs: Path, zoo: Path | None, name: str, settings: Settings,
                   key: bytes) -> sandbox.Result:
    """Run the harvest for notebook ``name`` over ``scratch``: sandboxed, or (unsafe) as a plain
    child process with the same limits, a fresh HOME and a cleaned environment. ``key`` signs
    the results (the harvest reads it on stdin)."""
    stdin = key.hex().encode() + b"\n"
    if not settings.unsafe_no_sandbox:
        extra = [(inputs, sandbox.SANDBOX_ROOT / "in")]
        if zoo is not None and zoo.is_dir():
            extra.append((zoo, sandbox.SANDBOX_ROOT / "work" / "zoo"))
        return sandbox.run(scratch, _harvest_argv(sandbox.SANDBOX_ROOT, name, settings), settings.limits,
                           binds=tuple(extra), stdin=stdin)
    (scratch / "in").rmdir()
    (scratch / "in").symlink_to(inputs)
    if zoo is not None and zoo.is_dir():
        (scratch / "work" / "zoo").symlink_to(zoo)
    env = sandbox.environment(settings.limits, {"HOME": str(scratch / "home"), "TMPDIR": str(scratch / "tmp"),
                                                "MPLCONFIGDIR": str(scratch / "tmp")})
    return sandbox.run_unsandboxed(scratch, _harvest_argv(scratch, name, settings), settings.limits, env, stdin)


SELF_CHECK = ("import course_lib.grading, course_lib.autograde.calls\nimport torch\n\n"
              "def add_one(x):\n    return torch.tensor([x + 1])\n")


def check_sandbox(settings: Settings) -> str:
    """Run a known answer through the whole harvest, sandboxed as a student's notebook is: a
    kernel that imports the kit, one call whose result must come back as 42. Returns "" if it
    did, else what went wrong, in the sandbox's own words."""
    from .verdicts import Outputs
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(SELF_CHECK)])
    with tempfile.TemporaryDirectory(prefix="course-selfcheck-") as tmp:
        scratch, inputs = Path(tmp) / "scratch", Path(tmp) / "inputs"
        inputs.mkdir()
        (inputs / "plans.json").write_text(json.dumps({"selfcheck": [
            {"id": "selfcheck.0", "function": "add_one", "args": [{"value": 41}]}]}))
        sandbox.prepare(scratch)
        nbformat.write(nb, scratch / "work" / "selfcheck.ipynb")
        key = secrets.token_bytes(32)
        ran = run_in_sandbox(scratch, inputs, None, "selfcheck", settings, key)
        try:
            value = Outputs(scratch / "out", key).result("selfcheck.0")
            if value.tolist() == [42]:
                return ""
            problem = f"the known answer came back as {value.tolist()!r}"
        except Exception as err:
            problem = str(err)
        cells = (read_regular_file(scratch / "out" / "cells.json", 2**20) or b"").decode(errors="replace")
        console = " ".join(ran.stdout.split())[-1500:]
        return f"{problem} (exit status {ran.returncode}; cell outputs: {cells[-1500:] or 'none'}; console: {console or 'empty'})"


def safe_outputs(outputs: list) -> list:
    """The outputs of a student's cell, rebuilt from plain text and PNG only (no HTML or
    JavaScript from a submission ever reaches the instructor's browser)."""
    clean = []
    for out in outputs[:MAX_CELL_OUTPUTS] if isinstance(outputs, list) else []:
        kind = out.get("output_type") if isinstance(out, dict) else None
        if kind == "stream" and isinstance(out.get("text"), str):
            clean.append(nbformat.v4.new_output("stream", name="stdout" if out.get("name") != "stderr" else "stderr",
                                                text=out["text"][:20_000]))
        elif kind == "error":
            text = f"{out.get('ename', 'Error')}: {out.get('evalue', '')}"[:5000]
            clean.append(nbformat.v4.new_output("error", ename=str(out.get("ename", "Error"))[:200],
                                                evalue=str(out.get("evalue", ""))[:5000], traceback=[text]))
        elif kind in ("display_data", "execute_result") and isinstance(out.get("data"), dict):
            data = {k: v for k, v in out["data"].items() if k in SAFE_MIME and isinstance(v, str)}
            if data:
                clean.append(nbformat.v4.new_output("display_data", data=data))
    return clean


def grade_notebook(nb, folder: Path, name: str, files: grading.GradingFiles, inputs: Path, settings: Settings,
                   *, zoo: Path | None = None, cache: Path | None = None, reuse: bool = True) -> NotebookResult:
    """Grade notebook ``name`` (already sanitized by nbgrader) of the submission in ``folder``.

    The result is stored in ``cache``; with ``reuse``, a stored result with the same key is
    returned instead of grading again.
    """
    start = time.perf_counter()
    key = cache_key(nb, folder, inputs)
    cached = cache / f"{name}.json" if cache is not None else None
    if reuse and cached is not None and cached.is_file():
        result = NotebookResult.from_json(cached.read_text())
        if result.key == key:
            return result
    result = _grade(nb, folder, name, files, inputs, settings, zoo, NotebookResult(key))
    result.seconds = time.perf_counter() - start
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_text(result.to_json())
    return result


def _grade(nb, folder: Path, name: str, files, inputs: Path, settings: Settings, zoo, result: NotebookResult):
    """Run the notebook in a sandbox and decide its tests (a notebook without code, like
    Part 3's written answers, has nothing to run)."""
    calls = json.loads((inputs / "plans.json").read_text()).get(name)
    if not calls and not any(c.cell_type == "code" for c in nb.cells):
        return result
    with tempfile.TemporaryDirectory(prefix="course-sandbox-") as tmp:
        scratch = Path(tmp)
        sandbox.prepare(scratch)
        _copy_submission(folder, scratch / "work", nb, name)
        key = secrets.token_bytes(32)
        ran = run_in_sandbox(scratch, inputs, zoo, name, settings, key)
        result.sandbox_seconds, result.usage = ran.seconds, ran.usage
        if ran.timed_out:
            result.note = f"the notebook was stopped at the time limit ({settings.limits.wall_seconds:g} s)"
        cells = read_regular_file(scratch / "out" / "cells.json", 50 * 2**20)
        try:
            raw = json.loads(cells) if cells else {}
        except (ValueError, RecursionError):     # the student's outputs, unreadable: shown as none
            raw = {}
        result.cells = {str(k): safe_outputs(v) for k, v in raw.items() if str(k).isdigit()}
        result.verdicts = decide(test_cells(nb), Context(Outputs(scratch / "out", key), folder, files, inputs))
        exhausted = ran.exhausted(settings.limits)
        if exhausted:
            result.note = exhausted
            result.verdicts = {g: v if v.passed else Verdict(False, f"{v.message} ({exhausted})")
                               for g, v in result.verdicts.items()}
    return result


# What a student's markdown may become on an instructor's page (the Formgrader, the feedback):
# formatting, never a script, an event handler, a style, a frame or a javascript: link.
INERT_TAGS = ("a", "abbr", "b", "blockquote", "br", "code", "div", "em", "h1", "h2", "h3", "h4", "h5", "h6", "hr",
              "i", "li", "ol", "p", "pre", "span", "strong", "sub", "sup", "table", "tbody", "td", "th", "thead",
              "tr", "ul")
INERT_ATTRIBUTES = {"a": ["href", "title"], "abbr": ["title"], "td": ["align"], "th": ["align"]}


def inert_markdown(source: str) -> str:
    """A student's markdown as the instructor may see it: unchanged if its rendering holds only
    formatting, else that rendering cleaned by bleach (nbconvert's own sanitizer): tags outside
    ``INERT_TAGS`` shown as text, attributes outside ``INERT_ATTRIBUTES`` and links other than
    http(s) and mailto dropped. The answer stays readable; nothing in it runs."""
    import html as html_module

    import bleach
    from nbconvert.filters.markdown import markdown2html
    text = source
    for _ in range(3):       # until the cleaned text, rendered again, needs no cleaning
        html = markdown2html(text)
        clean = bleach.clean(html, tags=INERT_TAGS, attributes=INERT_ATTRIBUTES, protocols=["http", "https", "mailto"])
        if clean == html:
            return text
        text = clean
    return f"<pre>{html_module.escape(source)}</pre>"


def verdict_output(verdict: Verdict):
    """A test cell's output: nbgrader gives full points to a cell without an error output."""
    if verdict.passed:
        shown = f": {verdict.message}" if verdict.message else ""
        return nbformat.v4.new_output("stream", name="stdout", text=f"passed (decided by the trusted autograder){shown}\n")
    return nbformat.v4.new_output("error", ename="GradingFailure", evalue=verdict.message,
                                  traceback=grading.failure_lines(verdict.message))


def apply(nb, result: NotebookResult):
    """Write the student's cell outputs and the trusted verdicts into ``nb`` (in place), and make
    its markdown inert (:func:`inert_markdown`): the autograded notebook is what the Formgrader
    and the feedback show the instructor and the student."""
    ids = test_cells(nb)
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "markdown":
            cell.source = inert_markdown(cell.source)
            cell.pop("attachments", None)
        if cell.cell_type != "code":
            continue
        grade_id = cell.metadata.get("nbgrader", {}).get("grade_id")
        if grade_id in ids:
            cell.outputs = [verdict_output(result.verdicts[grade_id])]
        else:
            cell.outputs = [nbformat.from_dict(o) for o in result.cells.get(str(index), [])]
        cell.execution_count = None
    return nb
