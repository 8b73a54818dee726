"""``python -m course_lib site --out DIR``: the lecture as a static course website.

Courses in the Jupyter ecosystem publish their lectures as a website built from the executed
notebooks, so that a student can read the lecture, its figures and its numbers before class,
on any device, and open the notebook to run it when they want to. The kit does the same with
the ecosystem's tool, Jupyter Book 1.x (Sphinx + MyST-NB; the optional extra ``site``):

1. take the seven lecture notebooks *executed* (``--notebooks DIR``: e.g. the folder
   ``COURSE_NOTEBOOK_SAVE`` makes tests/test_notebooks.py keep them in; or ``--execute``, which
   runs them here first with nbclient);
2. make each one publishable (:func:`publishable`): the exercises' answer cells go back to what
   the student starts from, with no outputs on them or on their checks, so that no reference
   answer (tests/test_notebooks.py fills them in) reaches the site;
3. stage them beside the site's own pages (``docs/site/``: its configuration, the front page,
   the homework page) and, when given, the tournament's results page (``--tournament DIR``: the
   folder ``python -m course_lib tournament`` wrote, with its index.html);
4. run ``jupyter-book build`` and copy the HTML to ``--out``; the build fails if any page loads
   a script, style sheet, font or image from the network (:func:`network_references`).

    python -m course_lib site --out DIR --notebooks EXECUTED_DIR [--tournament RESULTS_DIR]
    python -m course_lib site --out DIR --execute [--timeout 900]

(``--lecture DIR`` publishes another folder of stored notebooks instead of ``notebooks/``.)
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
LECTURE = ROOT / "notebooks"
SITE_PAGES = ROOT / "docs" / "site"
JUPYTER_BOOK = "import sys; from jupyter_book.cli.main import main; sys.argv[0] = 'jupyter-book'; main()"
# Sphinx's build records, the theme's template macros and its source maps (for debugging the theme's
# own scripts: half the size of a small site) stay out of the published site.
NOT_PUBLISHED = (".buildinfo", ".doctrees", "*webpack-macros.html", "*.map")
MARKER = ".course-site"           # left in a built site, so that --out only ever replaces a site
NETWORK_REF = re.compile(r"""<(script|link|img|source|iframe)\b[^>]*?\b(src|href)\s*=\s*["'](https?:)?//""", re.I)
CSS_NETWORK_REF = re.compile(r"""url\(\s*["']?(https?:)?//""", re.I)


TOURNAMENT_PAGE = """# Tournament results

The class tournament (`python -m course_lib tournament`): every student's backdoor against every
student's detector, scored by the grader. <a href="tournament/index.html">Open the results page</a>.
"""


def lecture_notebooks(folder: Path) -> list[Path]:
    """The lecture notebooks in ``folder`` (``01_*.ipynb`` ... ``07_*.ipynb``), in lecture order."""
    return sorted(Path(folder).glob("[0-9][0-9]_*.ipynb"))


def publishable(executed: nbformat.NotebookNode, stored: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """The executed notebook as a student may read it: its outputs, without any exercise's answer.

    Each answer cell (tag ``exercise``, see :mod:`course_lib.exercises`) gets back the source it
    has in ``stored`` (what the student starts from) and loses its outputs, as does its check cell
    (which would say whether the hidden answer was right); wrong answers appended by the notebook
    test (tag ``exercise-wrong``), its injected parameters and the widgets' saved state (which
    only live JavaScript could draw) are dropped.
    """
    starts = {c.metadata["exercise"]: c.source for c in stored.cells
              if "exercise" in c.metadata.get("tags", [])}
    cells, after_answer = [], False
    for cell in executed.cells:
        tags = set(cell.metadata.get("tags", []))
        if tags & {"exercise-wrong", "injected-parameters"}:
            continue
        if "exercise" in tags:
            name = cell.metadata["exercise"]
            if name not in starts:
                raise ValueError(f"stored: the notebook has no answer cell {name!r} to publish instead of the answer")
            cell.source, after_answer = starts[name], True
            cell.outputs, cell.execution_count = [], None
        elif after_answer and cell.cell_type == "code":
            cell.outputs, cell.execution_count, after_answer = [], None, False
        cells.append(cell)
    executed.cells = cells
    executed.metadata.pop("widgets", None)
    return executed


def stage(executed_dir: Path, into: Path, lecture_dir: Path = LECTURE, tournament: Path | None = None) -> list[str]:
    """Write the book's source into ``into``: configuration, pages and publishable notebooks.

    Returns the lecture pages (file stems) in order. Every notebook of ``lecture_dir`` must have an
    executed copy, with outputs, in ``executed_dir``.
    """
    stored = lecture_notebooks(lecture_dir)
    if not stored:
        raise ValueError(f"lecture_dir: no lecture notebooks (NN_name.ipynb) in {lecture_dir}")
    shutil.copytree(SITE_PAGES, into, dirs_exist_ok=True)
    pages = []
    for path in stored:
        done = Path(executed_dir) / path.name
        if not done.is_file():
            raise ValueError(f"notebooks: no executed copy of {path.name} in {executed_dir}")
        nb = nbformat.read(done, as_version=4)
        if not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"):
            raise ValueError(f"notebooks: {done} has no outputs: give the executed notebooks (or use --execute)")
        nbformat.write(publishable(nb, nbformat.read(path, as_version=4)), into / path.name)
        pages.append(path.stem)
    extra = ["homework"]
    (into / "_extra").mkdir(exist_ok=True)       # copied as is beside the pages (html_extra_path)
    if tournament is not None:
        tournament = Path(tournament)
        if not (tournament / "index.html").is_file():
            raise ValueError(f"tournament: {tournament} is not a tournament's results folder (no index.html)")
        shutil.copytree(tournament, into / "_extra" / "tournament")
        (into / "tournament.md").write_text(TOURNAMENT_PAGE)
        extra.append("tournament")
    toc = ["format: jb-book", "root: intro", "parts:", "  - caption: The lecture", "    chapters:"]
    toc += [f"      - file: {page}" for page in pages]
    toc += ["  - caption: After the lecture", "    chapters:"] + [f"      - file: {page}" for page in extra]
    (into / "_toc.yml").write_text("\n".join(toc) + "\n")
    return pages


def network_references(html_dir: Path) -> list[str]:
    """Every place in the built site that would load something from the network (should be none):
    ``page: tag`` for a script, style sheet, image, font or frame with an http(s) source."""
    found = []
    for page in sorted(Path(html_dir).rglob("*")):
        if page.suffix == ".html":
            found += [f"{page.relative_to(html_dir)}: {m.group(0)}" for m in NETWORK_REF.finditer(page.read_text())]
        elif page.suffix == ".css":
            found += [f"{page.relative_to(html_dir)}: {m.group(0)}" for m in CSS_NETWORK_REF.finditer(page.read_text())]
    return found


def build_site(executed_dir: Path, out: Path, lecture_dir: Path = LECTURE, tournament: Path | None = None) -> dict:
    """Build the website into ``out`` from the executed notebooks; return what was built (pages,
    seconds, megabytes, and the book tool's warnings).

    ``out`` must be absent, empty, or a site built before (it holds the marker file), so that a
    mistyped path never deletes anything else.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists():
        raise ValueError(f"out: {out} exists and is not a site built by this command: give a new folder")
    if not Path(executed_dir).is_dir():
        raise ValueError(f"notebooks: {executed_dir} is not a folder")
    if importlib.util.find_spec("jupyter_book") is None:
        raise RuntimeError("the website needs Jupyter Book: pip install -e '.[site]' (bash scripts/kit.sh test does)")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="course-site-") as tmp:
        source = Path(tmp) / "book"
        pages = stage(Path(executed_dir), source, Path(lecture_dir), tournament)
        book = subprocess.run([sys.executable, "-c", JUPYTER_BOOK, "build", str(source), "--path-output", tmp,
                               "--builder", "html", "--keep-going"], capture_output=True, text=True)
        if book.returncode != 0:
            raise RuntimeError(f"jupyter-book build failed:\n{book.stdout[-4000:]}\n{book.stderr[-4000:]}")
        warnings = [line for line in book.stdout.splitlines() + book.stderr.splitlines() if "WARNING" in line]
        html = Path(tmp) / "_build" / "html"
        leaks = network_references(html)
        if leaks:
            raise RuntimeError("the site would load from the network:\n" + "\n".join(leaks[:20]))
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(html, out, ignore=shutil.ignore_patterns(*NOT_PUBLISHED))
    (out / MARKER).write_text("built by python -m course_lib site\n")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    return {"out": str(out), "pages": pages + (["homework", "tournament"] if tournament else ["homework"]),
            "seconds": round(time.perf_counter() - start, 1), "megabytes": round(size / 2**20, 1),
            "warnings": warnings}


def execute_lecture(into: Path, lecture_dir: Path = LECTURE, timeout: float = 900) -> Path:
    """Run every lecture notebook with nbclient in its folder, in order, and save it executed in ``into``."""
    from nbclient import NotebookClient

    if timeout <= 0:
        raise ValueError(f"timeout: must be positive seconds, got {timeout}")
    into = Path(into)
    into.mkdir(parents=True, exist_ok=True)
    for path in lecture_notebooks(lecture_dir):
        nb = nbformat.read(path, as_version=4)
        NotebookClient(nb, timeout=timeout, kernel_name="python3",
                       resources={"metadata": {"path": str(path.parent)}}).execute()
        nbformat.write(nb, into / path.name)
    return into


def main(argv) -> dict:
    parser = argparse.ArgumentParser(prog="python -m course_lib site",
                                     description="Build the lecture's static website (Jupyter Book).")
    parser.add_argument("--out", required=True, type=Path, help="folder to write the site to")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--notebooks", type=Path, help="folder of the executed lecture notebooks")
    source.add_argument("--execute", action="store_true", help="execute the lecture notebooks first")
    parser.add_argument("--tournament", type=Path, help="the tournament's results folder (its index.html and images)")
    parser.add_argument("--lecture", type=Path, default=LECTURE, help="the stored lecture notebooks (default: notebooks/)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per notebook with --execute")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="course-site-run-") as tmp:
        try:
            executed = execute_lecture(Path(tmp), args.lecture, args.timeout) if args.execute else args.notebooks
            result = build_site(executed, args.out, args.lecture, args.tournament)
        except (ValueError, TypeError) as err:      # a bad argument: its message names it, no traceback
            parser.error(str(err))
    print(json.dumps(result))
    return result
