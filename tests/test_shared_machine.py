"""A course on one shared machine keeps its secrets, tried with real student accounts.

The test makes two accounts (removed after), a course laid out as nbgrader leaves it after a
graded run (solutions, hidden tests, the answer key, every student's autograded work and
feedback, the grader's cache, the gradebook, exported grades, a collected submission that
nbgrader made world-writable), and the repository's ``solutions/``, all under a folder every
account can reach. Before ``python -m course_lib permissions --fix`` a student reads all of it
and writes into another's submission (the control: the check below can fail); after it, none of
it, while the exchange stays open to them.
"""
from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from course_lib.autograde import shared

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("useradd") is None,
                                reason="needs root and useradd to make real student accounts")

SECRETS = {
    "source/week4/part1_attack.ipynb": "### BEGIN SOLUTION",
    "release/week4/part1_attack.ipynb": "released copy",
    "grading/week4/answer_key.json": json.dumps({"models": {"model_1": {"backdoored": True}}}),
    "gradebook.db": "SQLite format 3",
    "grades.csv": "student_id,email,raw_score\nalice,alice@example.org,90",
    "autograded/alice/week4/part1_attack.ipynb": "alice's graded work",
    "feedback/alice/week4/part1_attack.html": "alice's feedback",
    ".autograde/week4/results/alice/part1_attack.json": "cached verdicts",
    "submitted/alice/week4/part1_attack.ipynb": "alice's hand-in",
}


@pytest.fixture
def students():
    """Two real accounts, removed after the test."""
    names = [f"kit{uuid.uuid4().hex[:8]}" for _ in range(2)]
    for name in names:
        subprocess.run(["useradd", "--no-create-home", "--shell", "/bin/sh", name], check=True)
    try:
        yield [pwd.getpwnam(name) for name in names]
    finally:
        for name in names:
            subprocess.run(["userdel", name], check=False)


def as_student(account, *command) -> subprocess.CompletedProcess:
    return subprocess.run(["setpriv", f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}", "--clear-groups",
                           *command], capture_output=True, text=True, timeout=30)


def test_after_the_permissions_step_a_student_reads_only_the_exchange(students, monkeypatch):
    bob = students[0]
    base = Path(tempfile.mkdtemp(prefix="course-shared-", dir="/tmp"))
    try:
        base.chmod(0o755)
        course = base / "repo" / "assignments"
        for relative, text in SECRETS.items():
            path = course / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        shutil.copy(ROOT / "assignments" / "nbgrader_config.py", course)
        (base / "repo" / ".git" / "objects").mkdir(parents=True)   # the history holds every committed answer
        (base / "repo" / ".git" / "objects" / "pack").write_text("### BEGIN SOLUTION (in the history)")
        (base / "repo" / "solutions" / "week4").mkdir(parents=True)
        (base / "repo" / "solutions" / "week4" / "part1_attack.ipynb").write_text("reference solution")
        (course / "submitted" / "alice").chmod(0o777)          # as nbgrader's own collect leaves it
        (course / "submitted" / "alice" / "week4").chmod(0o777)
        for path in [base / "repo", *base.joinpath("repo").rglob("*")]:
            if path.is_dir() and not path.is_relative_to(course / "submitted"):
                path.chmod(0o755)
        exchange = base / "exchange"
        (exchange / "adversarial-ml-week4" / "outbound" / "week4").mkdir(parents=True)
        (exchange / "adversarial-ml-week4" / "outbound" / "week4" / "part1_attack.ipynb").write_text("the release")
        for path in [exchange, *exchange.rglob("*")]:
            path.chmod(0o1777 if path == exchange else (0o755 if path.is_dir() else 0o644))
        inbound = exchange / "adversarial-ml-week4" / "inbound"
        inbound.mkdir(mode=0o733)              # as nbgrader's release makes it: write, no listing
        inbound.chmod(0o733)
        monkeypatch.setenv("NBGRADER_EXCHANGE", str(exchange))
        secrets = [course / relative for relative in SECRETS] + [base / "repo" / "solutions" / "week4" /
                                                                 "part1_attack.ipynb",
                                                                 base / "repo" / ".git" / "objects" / "pack"]
        intruder = course / "submitted" / "alice" / "week4" / "planted.txt"

        # the control: as the guide's old setup left it, a student reads every secret
        assert all(as_student(bob, "cat", str(path)).returncode == 0 for path in secrets)
        assert as_student(bob, "touch", str(intruder)).returncode == 0
        intruder.unlink()
        problems = shared.audit(course)
        assert any("assignments is open to other accounts" in p for p in problems), problems
        assert any("solutions" in p for p in problems), problems
        assert any("repository" in p for p in problems), problems

        changed = shared.secure(course)
        assert len(changed) == 3, changed
        for path in secrets:
            done = as_student(bob, "cat", str(path))
            assert done.returncode != 0 and "Permission denied" in done.stderr, (path, done)
        assert as_student(bob, "touch", str(intruder)).returncode != 0 and not intruder.exists()
        assert as_student(bob, "ls", str(course)).returncode != 0
        released = exchange / "adversarial-ml-week4" / "outbound" / "week4" / "part1_attack.ipynb"
        assert as_student(bob, "cat", str(released)).stdout == "the release"
        assert as_student(bob, "mkdir", str(inbound / f"{bob.pw_name}+week4+2026-12-07")).returncode == 0
        assert as_student(bob, "ls", str(inbound)).returncode != 0
        assert shared.audit(course) == []
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_an_exchange_inside_the_course_is_reported(tmp_path, monkeypatch):
    course = tmp_path / "assignments"
    course.mkdir(mode=0o700)
    shutil.copy(ROOT / "assignments" / "nbgrader_config.py", course)
    monkeypatch.setenv("NBGRADER_EXCHANGE", str(course / "exchange"))
    assert any("inside the course folder" in p for p in shared.audit(course))
    monkeypatch.setenv("NBGRADER_EXCHANGE", str(tmp_path / "missing"))
    assert any("does not exist" in p for p in shared.audit(course))
    with pytest.raises(ValueError, match="course"):
        shared.audit(tmp_path / "nowhere")


def _reachable_by_others(path: Path) -> bool:
    return all(p.stat().st_mode & 0o001 for p in [path, *path.parents])


@pytest.fixture
def student_home():
    """A real account with a home folder, removed after the test."""
    name = f"kit{uuid.uuid4().hex[:8]}"
    subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", name], check=True)
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", "--remove", name], check=False, capture_output=True)


def _student_command(student) -> list[str]:
    """The command prefix that runs a program as ``student`` with only what a student has: their
    home, a clean environment and the kit's Python.

    A student installs the kit in an environment of their own. Here the kit's environment stands in
    for it; where its interpreter lies in a private folder (a pyenv under /root), a mount namespace
    shows the student that interpreter's folder and nothing else of the private one."""
    import sys

    import course_lib
    folders = sorted({Path(sys.base_prefix).resolve(), Path(sys.prefix).resolve(),
                      Path(course_lib.__file__).resolve().parent})
    reach, tops, made = [], [], set()
    for folder in folders:
        private = next((p for p in reversed(folder.parents) if not _reachable_by_others(p)), None)
        if private is None:
            continue
        if private not in tops:      # one tmpfs per private folder, then every folder bound into it
            tops.append(private)
            reach += ["--perms", "0755", "--tmpfs", str(private)]
        between = [p for p in reversed(folder.parents) if private in p.parents and p not in made]
        made.update(between)
        reach += [x for p in between for x in ("--perms", "0755", "--dir", str(p))]
        reach += ["--ro-bind", str(folder), str(folder)]
    reach = ["bwrap", "--dev-bind", "/", "/", *reach] if reach else []
    env = ["env", "-i", f"HOME={student.pw_dir}", f"PATH={Path(sys.executable).parent}:/usr/bin:/bin",
           "LANG=C.UTF-8"]
    return [*reach, "setpriv", f"--reuid={student.pw_uid}", f"--regid={student.pw_gid}", "--init-groups", *env]


def _exchange_with(notebook: dict) -> tuple[Path, Path]:
    """A shared exchange (modes as nbgrader's release leaves them) holding ``notebook`` as week4's
    released part1_attack.ipynb. Returns (exchange root, inbound folder)."""
    exchange = Path(tempfile.mkdtemp(prefix="exchange-", dir="/tmp"))
    exchange.chmod(0o1777)
    outbound = exchange / "adversarial-ml-week4" / "outbound" / "week4"
    outbound.mkdir(parents=True)
    (outbound / "part1_attack.ipynb").write_text(json.dumps(notebook))
    inbound = exchange / "adversarial-ml-week4" / "inbound"
    inbound.mkdir(mode=0o733)
    for path in [exchange / "adversarial-ml-week4", outbound.parent, outbound]:
        path.chmod(0o755)
    (outbound / "part1_attack.ipynb").chmod(0o644)
    inbound.chmod(0o733)
    return exchange, inbound


def test_a_student_sets_up_in_one_step_and_fetches_and_submits_through_the_exchange(student_home, tmp_path):
    """As a real account: student-setup, then nbgrader's fetch and submit with no option at all (the
    Assignments tab runs the same exchange code), and the instructor's menus switched off."""
    import sys
    python = Path(sys.executable)
    student = student_home
    exchange, inbound = _exchange_with({"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5})
    try:
        def run(*command, cwd=None):
            return subprocess.run([*_student_command(student), *command], capture_output=True, text=True,
                                  timeout=300, cwd=cwd or student.pw_dir)

        done = run(str(python), "-m", "course_lib", "student-setup", "--exchange", str(exchange))
        assert done.returncode == 0 and "hidden" in done.stdout, done.stdout + done.stderr
        done = run(str(python), "-m", "nbgrader", "fetch_assignment", "week4")
        assert done.returncode == 0, done.stdout + done.stderr
        assert (Path(student.pw_dir) / "week4" / "part1_attack.ipynb").is_file()
        done = run(str(python), "-m", "nbgrader", "submit", "week4")
        assert done.returncode == 0, done.stdout + done.stderr
        assert [p.name.split("+")[0] for p in inbound.iterdir()] == [student.pw_name]
        listed = run(str(python), "-m", "jupyter", "labextension", "list")
        text = " ".join((listed.stdout + listed.stderr).split())
        assert "@jupyter/nbgrader:formgrader" in text and "disabled" in text.lower(), text[-2000:]
    finally:
        shutil.rmtree(exchange, ignore_errors=True)


def _released_notebook(tmp_path: Path) -> dict:
    """A one-test notebook as nbgrader's generate_assignment releases it (its answer cell says
    ``raise NotImplementedError()``), made by nbgrader itself in a scratch course."""
    import nbformat
    import sys
    course = tmp_path / "scratch-course"
    source = course / "source" / "week4"
    source.mkdir(parents=True)
    answer = nbformat.v4.new_code_cell("def add(a, b):\n    ### BEGIN SOLUTION\n    return a + b\n    ### END SOLUTION")
    answer.metadata["nbgrader"] = {"grade": False, "solution": True, "locked": False, "grade_id": "add",
                                   "schema_version": 3}
    check = nbformat.v4.new_code_cell("assert add(1, 2) == 3")
    check.metadata["nbgrader"] = {"grade": True, "solution": False, "locked": True, "grade_id": "add-test",
                                  "points": 1, "schema_version": 3}
    nbformat.write(nbformat.v4.new_notebook(cells=[answer, check]), source / "part1_attack.ipynb")
    (course / "nbgrader_config.py").write_text("c = get_config()\nc.CourseDirectory.course_id = "
                                               "'adversarial-ml-week4'\n")
    done = subprocess.run([sys.executable, "-m", "nbgrader", "generate_assignment", "week4", "--force"], cwd=course,
                          capture_output=True, text=True, timeout=300,     # nbgrader runs alembic from PATH
                          env=dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"))
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads((course / "release" / "week4" / "part1_attack.ipynb").read_text())


@pytest.mark.browser
def test_a_student_fetches_validates_and_submits_in_the_assignments_tab(student_home, tmp_path):
    """The student's whole loop in JupyterLab, in headless Chromium, with the server running as a real
    student account set up by student-setup alone: the Nbgrader menu offers the Assignments tab and
    none of the instructor's entries; the tab lists the release, fetches it, validates the notebook
    (the released answer cell fails its test, and Validate says so) and submits it to the exchange."""
    import secrets
    import sys
    import urllib.request

    from test_browser import CHROMIUM_ARGS, _ensure_chromium, _free_port
    chromium = _ensure_chromium()
    from playwright.sync_api import sync_playwright

    python = Path(sys.executable)
    student = student_home
    exchange, inbound = _exchange_with(_released_notebook(tmp_path))
    port, token = _free_port(), secrets.token_hex(16)
    log = open(tmp_path / "jupyterlab.log", "w")
    server = None
    try:
        done = subprocess.run([*_student_command(student), str(python), "-m", "course_lib", "student-setup",
                               "--exchange", str(exchange)], capture_output=True, text=True, timeout=300,
                              cwd=student.pw_dir)
        assert done.returncode == 0, done.stdout + done.stderr
        server = subprocess.Popen([*_student_command(student), str(python), "-m", "jupyterlab", "--no-browser",
                                   "--ip=127.0.0.1", f"--port={port}", f"--IdentityProvider.token={token}",
                                   f"--ServerApp.root_dir={student.pw_dir}"],
                                  stdout=log, stderr=subprocess.STDOUT, cwd=student.pw_dir,
                                  start_new_session=True)    # bwrap does not pass a signal on: stop the group
        url = f"http://127.0.0.1:{port}"
        for _ in range(240):
            assert server.poll() is None, (tmp_path / "jupyterlab.log").read_text()[-2000:]
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail(f"the student's JupyterLab did not answer within 120 s: "
                        f"{(tmp_path / 'jupyterlab.log').read_text()[-2000:]}")
        with sync_playwright() as pw:
            browser = pw.chromium.launch_persistent_context(
                str(tmp_path / "chromium-profile"), executable_path=str(chromium), headless=True,
                args=CHROMIUM_ARGS, viewport={"width": 1400, "height": 1000})
            try:
                page = browser.new_page()
                page.goto(f"{url}/lab?token={token}")
                menu = page.locator("#jp-menu-panel div.lm-MenuBar-itemLabel", has_text="Nbgrader")
                menu.wait_for(timeout=120_000)
                menu.click()
                entries = page.locator("#jp-mainmenu-nbgrader li.lm-Menu-item")
                entries.first.wait_for(timeout=30_000)
                shown = {entries.nth(i).get_attribute("data-command") for i in range(entries.count())
                         if "lm-mod-hidden" not in (entries.nth(i).get_attribute("class") or "")}
                assert shown == {"nbgrader:open-assignment-list"}, shown     # the instructor's entries are hidden
                page.locator('#jp-mainmenu-nbgrader li[data-command="nbgrader:open-assignment-list"]').click()

                released = page.locator("#released_assignments_list > .list_item")
                released.first.wait_for(timeout=60_000)
                assert released.count() == 1 and "week4" in released.first.inner_text()
                released.first.locator(".item_status button").click()

                fetched = page.locator("#fetched_assignments_list > .list_item")
                fetched.first.wait_for(timeout=60_000)
                assert (Path(student.pw_dir) / "week4" / "part1_attack.ipynb").is_file()
                page.locator('#fetched_assignments_list a', has_text="week4").first.click()
                page.locator('#fetched_assignments_list button', has_text="Validate").first.click()
                dialog = page.locator(".jp-Dialog")
                dialog.wait_for(timeout=180_000)
                said = dialog.inner_text()
                assert "NotImplementedError" in said or "failed" in said.lower(), said
                dialog.locator("button").last.click()

                fetched.first.locator(".item_status button", has_text="Submit").click()
                page.locator("#submitted_assignments_list > .list_item").first.wait_for(timeout=60_000)
            finally:
                browser.close()
        assert [p.name.split("+")[0] for p in inbound.iterdir()] == [student.pw_name]
        submitted = next(inbound.iterdir()) / "part1_attack.ipynb"
        assert "raise NotImplementedError()" in submitted.read_text()
    finally:
        if server is not None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(server.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()
        shutil.rmtree(exchange, ignore_errors=True)


def test_student_setup_never_overwrites_a_config_of_the_students_own(tmp_path):
    from course_lib import student_setup
    path = student_setup.write_config(tmp_path, exchange="/srv/nbgrader/exchange")
    assert "c.Exchange.root = '/srv/nbgrader/exchange'" in path.read_text()
    assert f"c.Execute.timeout = {student_setup.VALIDATE_TIMEOUT_S}" in path.read_text()
    path.write_text("c = get_config()\nc.Exchange.root = '/mine'\n")
    with pytest.raises(ValueError, match="was not written by this command"):
        student_setup.write_config(tmp_path)
    with pytest.raises(ValueError, match="exchange must be an absolute path"):
        student_setup.write_config(tmp_path / "other", exchange="relative/path")
