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
import subprocess
import tempfile
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


def test_a_student_sets_up_in_one_step_and_fetches_and_submits_through_the_exchange(student_home, tmp_path):
    """As a real account: student-setup, then nbgrader's fetch and submit with no option at all (the
    Assignments tab runs the same exchange code), and the instructor's menus switched off."""
    import sys
    python = Path(sys.executable)
    # A student installs the kit in an environment of their own. Here the kit's environment stands in
    # for it; where its interpreter lies in a private folder (a pyenv under /root), a mount namespace
    # shows the student that interpreter's folder and nothing else of the private one.
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
    student = student_home
    exchange = Path(tempfile.mkdtemp(prefix="exchange-", dir="/tmp"))
    try:
        exchange.chmod(0o1777)
        outbound = exchange / "adversarial-ml-week4" / "outbound" / "week4"
        outbound.mkdir(parents=True)
        (outbound / "part1_attack.ipynb").write_text(json.dumps(
            {"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
        inbound = exchange / "adversarial-ml-week4" / "inbound"
        inbound.mkdir(mode=0o733)
        for path in [exchange / "adversarial-ml-week4", outbound.parent, outbound]:
            path.chmod(0o755)
        (outbound / "part1_attack.ipynb").chmod(0o644)
        inbound.chmod(0o733)
        env = ["env", "-i", f"HOME={student.pw_dir}", f"PATH={python.parent}:/usr/bin:/bin", "LANG=C.UTF-8"]

        def run(*command, cwd=None):
            return subprocess.run([*reach, "setpriv", f"--reuid={student.pw_uid}", f"--regid={student.pw_gid}",
                                   "--init-groups", *env, *command], capture_output=True, text=True, timeout=300,
                                  cwd=cwd or student.pw_dir)

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


def test_student_setup_never_overwrites_a_config_of_the_students_own(tmp_path):
    from course_lib import student_setup
    path = student_setup.write_config(tmp_path, exchange="/srv/nbgrader/exchange")
    assert "c.Exchange.root = '/srv/nbgrader/exchange'" in path.read_text()
    path.write_text("c = get_config()\nc.Exchange.root = '/mine'\n")
    with pytest.raises(ValueError, match="was not written by this command"):
        student_setup.write_config(tmp_path)
    with pytest.raises(ValueError, match="exchange must be an absolute path"):
        student_setup.write_config(tmp_path / "other", exchange="relative/path")
