"""The trigger explorer in a real browser: JupyterLab + headless Chromium, driven by Playwright.

The test copies the widget part of notebook 5 (its cells tagged ``parameters`` and
``widget-demo``: setup, one backdoored model, the explorer) into a temporary folder,
starts JupyterLab there on a free localhost port with a random token, opens the notebook
in Debian's Chromium, runs all cells from the menu, and checks that the explorer
rendered as a live widget and that moving its opacity slider updates the readout that
the kernel computes. Screenshots go to ``artifacts/browser/``.

Chromium is installed with apt-get when missing (``scripts/kit.sh test`` does the same);
the test is skipped only when that is impossible.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "05_trigger_design.ipynb"
SHOTS = ROOT / "artifacts" / "browser"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# Training the one model the demo needs takes seconds on an idle 2-core machine; leave room for a busy one.
RUN_LIMIT_S = float(os.environ.get("COURSE_BROWSER_LIMIT_S", 300))

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def _ensure_chromium() -> Path:
    """Debian's chromium, installed with apt-get if it is missing; skip only if that fails."""
    if CHROMIUM.exists():
        return CHROMIUM
    apt = shutil.which("apt-get")
    if apt is None or os.geteuid() != 0:
        pytest.skip("Chromium is not installed at /usr/bin/chromium and cannot be installed here "
                    "(needs apt-get as root: apt-get install -y chromium)")
    for command in ([apt, "install", "-y", "-q", "chromium"], [apt, "update", "-q"],
                    [apt, "install", "-y", "-q", "chromium"]):
        subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=900, check=False)
        if CHROMIUM.exists():
            return CHROMIUM
    pytest.skip("Chromium could not be installed with apt-get install -y chromium (no package source?)")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _widget_demo(folder: Path) -> Path:
    """A copy of notebook 5 reduced to its widget demo, writing results and models under ``folder``."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    keep = [c for c in nb.cells if {"parameters", "widget-demo"} & set(c.metadata.get("tags", []))]
    assert len(keep) >= 3, "notebook 5 must tag its setup and explorer cells 'widget-demo'"
    injected = nbformat.v4.new_code_cell(f'RESULTS_DIR = "{folder / "results"}"\nCACHE_DIR = "{folder / "models"}"')
    injected.metadata["tags"] = ["injected-parameters"]
    nb.cells = keep[:1] + [injected] + keep[1:]
    path = folder / "trigger_explorer.ipynb"
    nbformat.write(nb, path)
    return path


@pytest.fixture()
def jupyterlab(tmp_path):
    """A JupyterLab server on a free localhost port with a random token, serving ``tmp_path/root``."""
    root = tmp_path / "root"
    root.mkdir()
    port, token = _free_port(), secrets.token_hex(16)
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(tmp_path / "config"), JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"))
    command = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
               f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
               f"--LabApp.workspaces_dir={tmp_path / 'workspaces'}",
               f"--LabApp.user_settings_dir={tmp_path / 'settings'}"]
    if os.geteuid() == 0:
        command.append("--allow-root")
    log = open(tmp_path / "jupyterlab.log", "w")
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=root)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            if server.poll() is not None:
                pytest.fail(f"JupyterLab exited: {(tmp_path / 'jupyterlab.log').read_text()[-2000:]}")
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("JupyterLab did not answer within 120 s")
        yield {"url": url, "token": token, "root": root}
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def test_trigger_explorer_renders_and_answers_a_slider(jupyterlab, tmp_path):
    chromium = _ensure_chromium()
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    notebook = _widget_demo(jupyterlab["root"])
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=str(chromium), headless=True,
            args=CHROMIUM_ARGS, viewport={"width": 1400, "height": 1000})
        try:
            page = browser.new_page()
            page.goto(f"{jupyterlab['url']}/lab/tree/{notebook.name}?token={jupyterlab['token']}")
            page.wait_for_selector(".jp-Notebook", timeout=120_000)
            page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=120_000)
            _wait_for_connected_kernel(jupyterlab)
            _run_all_cells(page)

            readout = page.locator(".trigger-explorer .trigger-explorer-readout")
            try:
                readout.wait_for(timeout=RUN_LIMIT_S * 1000)
            except PlaywrightTimeout:
                page.screenshot(path=str(SHOTS / "failure.png"), full_page=True)
                pytest.fail("the explorer never rendered; dialogs on the page: "
                            f"{page.locator('.jp-Dialog').all_inner_texts()}; outputs: "
                            f"{page.locator('.jp-OutputArea-output').all_inner_texts()[-3:]}; "
                            f"screenshot: {SHOTS / 'failure.png'}")
            page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=RUN_LIMIT_S * 1000)
            explorer = page.locator(".trigger-explorer")
            explorer.scroll_into_view_if_needed()
            before = readout.inner_text()
            assert "PSNR" in before and "SSIM" in before and "model:" in before, before
            assert page.locator(".trigger-explorer img").first.evaluate("img => img.naturalWidth") > 0
            explorer.screenshot(path=str(SHOTS / "trigger_explorer_before.png"))

            opacity = explorer.locator(".widget-slider").filter(has_text="opacity").locator(".noUi-target")
            box = opacity.bounding_box()
            page.mouse.click(box["x"] + 0.2 * box["width"], box["y"] + box["height"] / 2)
            page.wait_for_function("([el, old]) => el.innerText !== old",
                                   arg=[readout.element_handle(), before], timeout=30_000)
            after = readout.inner_text()
            explorer.screenshot(path=str(SHOTS / "trigger_explorer_after.png"))
            page.screenshot(path=str(SHOTS / "jupyterlab.png"), full_page=True)
        finally:
            browser.close()
    assert _l2(after) < _l2(before), f"a fainter trigger must change fewer pixels: {before!r} -> {after!r}"


def _wait_for_connected_kernel(server: dict, limit_s: float = 120) -> None:
    """Block until the server reports the notebook's kernel idle with a browser connected to it."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"{server['url']}/api/kernels?token={server['token']}", timeout=5) as reply:
            kernels = json.load(reply)
        if any(k["execution_state"] == "idle" and k["connections"] > 0 for k in kernels):
            return
        time.sleep(0.5)
    pytest.fail(f"no kernel became idle and connected within {limit_s:.0f} s: {kernels}")


def _run_all_cells(page, attempts: int = 3) -> None:
    """Run > Run All Cells from the menu, retried when the first cell has not started within a minute.

    On a freshly started server the first command can reach JupyterLab before the
    notebook panel has finished attaching its session and be dropped; a cell that
    started shows ``[*]`` or ``[1]`` in its prompt.
    """
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    for _ in range(attempts):
        page.locator(".jp-Notebook .jp-Cell").first.click()
        page.keyboard.press("Escape")
        page.get_by_role("menuitem", name="Run", exact=True).click()
        page.get_by_text("Run All Cells", exact=True).click()
        try:
            page.wait_for_function(
                "() => [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')]"
                ".some(p => /\\[(\\*|\\d+)\\]/.test(p.innerText))", timeout=60_000)
            return
        except PlaywrightTimeout:
            continue
    page.screenshot(path=str(SHOTS / "failure.png"), full_page=True)
    pytest.fail(f"Run All Cells started no cell in {attempts} attempts; screenshot: {SHOTS / 'failure.png'}")


def _l2(readout: str) -> float:
    """The L2 number of the explorer's readout text."""
    return float(readout.split("L2 =")[1].split()[0])
