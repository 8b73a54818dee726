"""The course website (``python -m course_lib site``), read as a student would read it.

The test writes two tiny lecture notebooks (a heading per section, a figure, a printed number,
an explorer-style static snapshot, an exercise), executes them with nbclient with a secret
answer filled in and a wrong answer appended (as tests/test_notebooks.py does with the real
ones), builds the site from them with the command line, a tournament's results folder
included, and then
opens every page in headless Chromium from the disk with every request that is not a file
blocked: no page may try the network, log a console error or show a broken image; every
internal link must lead to a page (and an anchor) of the site; each lecture page must show
the number its executed notebook printed, and no page may hold an answer.
"""
from __future__ import annotations

import base64
import math
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import unquote, urldefrag, urlparse

import nbformat
import pytest

from course_lib.__main__ import main as course_main
from course_lib.site import build_site, main as site_main, network_references, publishable

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
SECRET = "SECRET-ANSWER-4242"
PIXEL = ("iVBORw0KGgoAAAANSUhEUgAAAAIAAAACCAYAAABytg0kAAAAFklEQVR4nGNgYGD4z8DAwMDAwMAAAAwAAf8H"
         "3NmGAAAAAElFTkSuQmCC")  # a 2x2 PNG, the explorer snapshot's picture


def tiny_lecture(n: int) -> nbformat.NotebookNode:
    """A lecture notebook in the kit's shape: title, sections, a figure, a number, a widget and its static
    snapshot (as the explorers show), an exercise."""
    v4 = nbformat.v4
    answer = v4.new_code_cell("answer = None  # your prediction")
    answer.metadata.update(tags=["exercise"], exercise=f"0{n}-predict")
    cells = [
        v4.new_markdown_cell(f"# Week 4 · {n}. Tiny lecture {n}\n\nLearning objectives: read the site."),
        v4.new_markdown_cell("## 1. A figure"),
        v4.new_code_cell("import matplotlib.pyplot as plt\n"
                         "fig, ax = plt.subplots(figsize=(2, 2)); ax.plot([1, 3, 2]); plt.show()"),
        v4.new_markdown_cell("## 2. A measured number"),
        v4.new_code_cell(f"import math\nprint(f'clean accuracy {{math.sqrt({n} / 7):.6f}}')"),
        v4.new_code_cell("import ipywidgets\nipywidgets.IntSlider(value=3, description='rate')"),  # a live explorer
        v4.new_code_cell("from IPython.display import HTML\n"
                         f"HTML('<div class=\"explorer-snapshot\"><img src=\"data:image/png;base64,{PIXEL}\" "
                         "width=\"40\"><p>PSNR 31.4 dB</p></div>')"),
        v4.new_markdown_cell("## Exercises\n\nPredict the attack success rate."),
        answer,
        v4.new_code_cell("print('your answer:', answer)"),
    ]
    return v4.new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                                   "language": "python"}})


def execute_with_answers(stored: Path, into: Path) -> None:
    """Run each stored notebook with its answer filled in and a wrong answer appended (tag exercise-wrong)."""
    from nbclient import NotebookClient

    into.mkdir()
    for path in sorted(stored.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if "exercise" in cell.metadata.get("tags", []):
                cell.source = f"answer = {SECRET!r}"
        wrong = nbformat.v4.new_code_cell(f"answer = 'WRONG-{SECRET}'\nprint(answer)")
        wrong.metadata.update(tags=["exercise-wrong"], exercise="01-predict")
        nb.cells.append(wrong)
        NotebookClient(nb, timeout=120, kernel_name="python3").execute()
        nbformat.write(nb, into / path.name)


def printed_numbers(nb) -> list[str]:
    return [m for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.get("output_type") == "stream"
            for m in re.findall(r"clean accuracy (\d\.\d+)", o["text"])]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    base = tmp_path_factory.mktemp("site")
    stored, executed = base / "stored", base / "executed"
    stored.mkdir()
    for n in (1, 2):
        nbformat.write(tiny_lecture(n), stored / f"0{n}_tiny.ipynb")
    execute_with_answers(stored, executed)
    tournament = base / "tournament"          # what python -m course_lib tournament --out writes
    tournament.mkdir()
    (tournament / "heatmap.png").write_bytes(base64.b64decode(PIXEL))
    (tournament / "index.html").write_text("<!doctype html><html><body><h1>Tournament</h1>"
                                           "<img src='heatmap.png' alt='heat map'><p>red 0.93</p></body></html>")
    out = base / "html"
    built = site_main(["--out", str(out), "--notebooks", str(executed), "--lecture", str(stored),
                       "--tournament", str(tournament)])
    return {"out": out, "executed": executed, "stored": stored, "base": base, "built": built}


def test_the_command_line_names_the_site_command(capsys):
    with pytest.raises(SystemExit) as done:
        course_main(["site", "--help"])
    assert done.value.code == 0 and "--notebooks" in capsys.readouterr().out


def test_execute_builds_the_site_from_the_stored_notebooks(site, tmp_path):
    built = site_main(["--out", str(tmp_path / "html"), "--execute", "--lecture", str(site["stored"]),
                       "--timeout", "120"])
    assert built["pages"] == ["01_tiny", "02_tiny", "homework"] and built["warnings"] == []
    page = (tmp_path / "html" / "02_tiny.html").read_text()
    assert f"clean accuracy {math.sqrt(2 / 7):.6f}" in page     # printed by the run the command made


def test_the_site_has_every_page_and_no_answer(site):
    out = site["out"]
    assert site["built"]["warnings"] == [], site["built"]["warnings"]
    for page in ("index", "intro", "01_tiny", "02_tiny", "homework", "tournament", "tournament/index"):
        assert (out / f"{page}.html").is_file(), page
    assert list((out / "_images").glob("*.png")), "the notebooks' figures are published"
    leaked = [str(f) for f in out.rglob("*") if f.is_file() and SECRET.encode() in f.read_bytes()]
    assert not leaked, f"an exercise's answer reached the site: {leaked}"
    assert network_references(out) == []
    from bs4 import BeautifulSoup
    page = BeautifulSoup((out / "01_tiny.html").read_text(), "html.parser")
    nav = [a.get_text(strip=True) for a in page.select("nav.bd-docs-nav a")]
    assert nav[:2] == ["Week 4 · 1. Tiny lecture 1", "Week 4 · 2. Tiny lecture 2"], nav   # the lecture's order
    assert nav[2].startswith("Homework") and nav[3] == "Tournament results", nav
    sections = [a.get_text(strip=True) for a in page.select(".bd-toc a")]
    assert sections == ["1. A figure", "2. A measured number", "Exercises"], sections   # the lecture's sections
    homework = (out / "homework.html").read_text()
    assert "backdoor_model.safetensors" in homework and "hidden tests" in homework


def test_bad_arguments_are_refused_by_name(site, tmp_path):
    (tmp_path / "mine.txt").write_text("not a site")
    with pytest.raises(ValueError, match="out"):
        build_site(site["executed"], tmp_path, lecture_dir=site["stored"])
    with pytest.raises(ValueError, match="notebooks"):
        build_site(site["stored"], tmp_path / "new", lecture_dir=site["stored"])   # stored: no outputs
    with pytest.raises(ValueError, match="tournament"):
        build_site(site["executed"], tmp_path / "new", lecture_dir=site["stored"], tournament=tmp_path)
    executed = nbformat.read(site["executed"] / "01_tiny.ipynb", as_version=4)
    with pytest.raises(ValueError, match="stored"):
        publishable(executed, nbformat.v4.new_notebook())


def _chromium() -> Path:
    if not CHROMIUM.exists() and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], capture_output=True, timeout=900, check=False)
    if not CHROMIUM.exists():
        pytest.skip("Chromium is not installed at /usr/bin/chromium (apt-get install -y chromium)")
    return CHROMIUM


def _internal_target(page: Path, href: str, root: Path) -> tuple[Path, str] | None:
    """The file and anchor an internal link of ``page`` leads to, or None for an external one."""
    url = urlparse(href)
    if url.scheme in ("http", "https", "mailto", "javascript"):
        return None
    path, anchor = urldefrag(href)
    if url.scheme == "file":
        return Path(unquote(url.path)), anchor
    target = (page.parent / unquote(urlparse(path).path)).resolve() if path else page
    return (target / "index.html" if target.is_dir() else target), anchor


def read_site(out: Path, chromium: Path, expected: dict[str, list[str]]) -> tuple[list[Path], list[str], list[str]]:
    """Open every page of the site ``out`` from the disk in Chromium, every non-file request blocked.

    Returns the pages, the problems found (console errors, images not loaded, internal links to no
    page or no anchor, a number of ``expected`` (page name -> numbers) not shown) and the requests
    that tried the network."""
    from bs4 import BeautifulSoup
    from playwright.sync_api import sync_playwright

    out = out.resolve()
    pages = sorted(p for p in out.rglob("*.html") if p.relative_to(out).parts[0] not in ("_static", "_sources"))
    attempted, problems = [], []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(chromium), headless=True, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context()

            def route(r):
                url = r.request.url
                if url.startswith(("file:", "data:", "blob:", "about:")) or urlparse(url).hostname in ("localhost",
                                                                                                      "127.0.0.1"):
                    return r.continue_()
                attempted.append(url)
                return r.abort()

            context.route("**/*", route)
            for path in pages:
                page = context.new_page()
                errors = []
                page.on("console", lambda m, e=errors: e.append(m.text) if m.type == "error" else None)
                page.on("pageerror", lambda exc, e=errors: e.append(str(exc)))
                page.goto(path.as_uri(), wait_until="load")
                page.wait_for_load_state("networkidle")
                path = Path(unquote(urlparse(page.url).path))   # index.html forwards to the front page
                name = path.relative_to(out)
                problems += [f"{name}: console error {e}" for e in errors]
                broken = page.evaluate("[...document.images].filter(i => !(i.complete && i.naturalWidth > 0))"
                                       ".map(i => i.getAttribute('src'))")
                problems += [f"{name}: image not loaded {src}" for src in broken]
                for href in page.evaluate("[...document.querySelectorAll('a[href]')].map(a => a.getAttribute('href'))"):
                    target = _internal_target(path, href, out)
                    if target is None:
                        continue
                    file, anchor = target
                    if not file.is_file():
                        problems.append(f"{name}: link {href} leads nowhere")
                    elif anchor and file.suffix == ".html" and not BeautifulSoup(file.read_text(), "html.parser").find(
                            id=anchor):
                        problems.append(f"{name}: link {href} names a missing anchor")
                if name.name in expected:
                    text = page.inner_text("main")
                    problems += [f"{name}: printed number {v} missing" for v in expected[name.name] if v not in text]
                page.close()
        finally:
            browser.close()
    return pages, problems, attempted


def test_every_page_opens_offline_in_chromium(site):
    expected = {f"{p.stem}.html": printed_numbers(nbformat.read(p, as_version=4))
                for p in site["executed"].glob("*.ipynb")}
    assert all(expected.values()), "each tiny notebook printed its number"
    pages, problems, attempted = read_site(site["out"], _chromium(), expected)
    assert len(pages) >= 7
    assert not problems, "\n".join(problems[:30])
    assert attempted == [], f"pages tried the network: {attempted[:10]}"
    lecture = (site["out"] / "02_tiny.html").read_text()
    assert "explorer-snapshot" in lecture and "PSNR 31.4 dB" in lecture
