"""The homework as students and instructors live it (issue 16), on one small graded course.

One module-scoped course (small zoo, release, exchange, five students: an honest one, a
"sloppy" one whose custom trigger is random and too strong, and three of issue 22's: a Part 3
that attacks the instructor's browser, with files named like modules and a link to the answer
key in the exchange; a notebook saved half-way; nbgrader metadata of a future version;
autograded, feedback generated) is shared by every test, to keep the run short:

- ``nbgrader validate`` of a complete Part 1 trains nothing, leaves the model file alone and
  passes within nbgrader's 30 s cell timeout; without the model file it says to train first;
- the feedback of a student whose Part 3 awaits manual grading says it is pending;
- a failed test's feedback lists two independent problems, wrapped and in red;
- the kit's summary marks manual grading, and a skipped student's row keeps its failures;
- a broken or hostile hand-in costs only its own points, and the class command says which
  hand-ins need attention (exit status 3);
- the instructor guide's commands, run in its order and folders, give a grades CSV;
- the Formgrader in JupyterLab (headless Chromium): a Part 3 score and comment reach the
  gradebook and the exported CSV; a hostile Part 3 is readable and runs nothing.
"""
from __future__ import annotations

import csv
import getpass
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest
from nbgrader.api import Gradebook

from course_lib import student_setup
from course_lib.autograde import steps
from course_lib.autograde.classroom import table
from test_browser import CHROMIUM_ARGS, SHOTS, _ensure_chromium, _free_port
from test_homework import edit_cell, hw

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "instructor_guide.md"
VALIDATE_TIMEOUT_S = student_setup.VALIDATE_TIMEOUT_S   # the cell timeout student-setup gives Validate
RANDOM_STRONG_TRIGGER = '''

def trigger_custom(images):
    """Random noise drawn anew on every call (not a trigger: not deterministic), and far too strong."""
    return (images + 0.6 * torch.rand(images.shape)).clamp(0, 1)
'''

# A Part 3 answer that tries to run code in the instructor's browser (the Formgrader) and the
# student's (the feedback): script, event handlers, a javascript: link in HTML and in markdown.
HOSTILE_ANSWER = """

**My answer:** the blend is best, it is hard to see. <script>window.top.__pwned = "script"</script>
<img src="x" onerror="window.top.__pwned = 'onerror'"> <a href="javascript:window.top.__pwned='link'">see</a>
[my table](javascript:window.top.__pwned='markdown') <style>body { display: none }</style>
<iframe src="javascript:window.top.__pwned='frame'"></iframe>
"""
# Files named like the modules the harvest and the kernel import (issue 22: such a file in the
# submission folder took an honest student from 90 to about 14 points)
SHADOWS = ("json.py", "torch.py", "course_lib.py", "nbformat.py")

pytestmark = pytest.mark.slow


def completed_release(fetched: Path, dest: Path) -> Path:
    """What a student hands in after doing the work: the released notebooks with the reference
    solution written into their solution cells (no hidden test, as a student's copy has none)."""
    shutil.copytree(fetched, dest)
    source = hw.COURSE / "source" / hw.ASSIGNMENT
    for name in hw.NOTEBOOKS:
        solutions = {c.metadata["nbgrader"]["grade_id"]: c.source
                     for c in nbformat.read(source / f"{name}.ipynb", as_version=4).cells
                     if c.metadata.get("nbgrader", {}).get("solution")}
        nb = nbformat.read(dest / f"{name}.ipynb", as_version=4)
        for cell in nb.cells:
            grade_id = cell.metadata.get("nbgrader", {}).get("grade_id")
            if cell.metadata.get("nbgrader", {}).get("solution") and grade_id in solutions:
                cell.source = hw.strip_for_solutions(solutions[grade_id])
        nbformat.write(nb, dest / f"{name}.ipynb")
    return dest


@pytest.fixture(scope="module")
def course(tmp_path_factory):
    """A small graded course in ``ROOT_TMP/assignments``: {"root", "course", "fetched", "models",
    "students", "summaries", "seconds"}."""
    root = tmp_path_factory.mktemp("workflow")
    seconds = {}
    start = time.perf_counter()
    course = hw.copy_course(root / "assignments")
    hw.build_zoo(course, small=True)
    seconds["zoo --small"] = time.perf_counter() - start
    hw.generate(course)
    exchange = root / "exchange"       # outside the (private) course folder, as on a shared machine
    before = os.environ.get("NBGRADER_EXCHANGE")
    os.environ["NBGRADER_EXCHANGE"] = str(exchange)    # the course config's exchange, for collect and feedback
    fetched = hw.fetch(course, exchange, root / "template")
    models = root / "model"
    models.mkdir()
    step = time.perf_counter()
    hw.train_solution_model(course / "source" / "week4" / "part1_attack.ipynb", models, num_train=15_000, epochs=2)
    seconds["training"] = time.perf_counter() - step
    students = {}
    for student in ("honest", "sloppy", "scripter", "halfsaved", "schema"):
        folder = completed_release(fetched, root / "students" / student / "week4")
        for name in hw.MODEL_FILES:
            shutil.copy(models / name, folder)
        students[student] = folder
    edit_cell(students["sloppy"] / "part1_attack.ipynb", "p1-triggers", lambda s: s + RANDOM_STRONG_TRIGGER)
    for grade_id in ("p3-triggers", "p3-tradeoff", "p3-defense"):
        edit_cell(students["scripter"] / "part3_analysis.ipynb", grade_id, lambda s: s + HOSTILE_ANSWER)
    for name in SHADOWS:
        (students["scripter"] / name).write_text("raise ImportError('imported from the hand-in')\n")
    whole = (students["halfsaved"] / "part1_attack.ipynb").read_bytes()   # saved half-way
    (students["halfsaved"] / "part1_attack.ipynb").write_bytes(whole[:len(whole) // 2])
    newer = nbformat.read(students["schema"] / "part2_detection.ipynb", as_version=4)
    newer.cells[2].metadata["nbgrader"] = {"schema_version": 99, "grade": False, "solution": False,
                                           "locked": False, "grade_id": "from-the-future"}
    nbformat.write(newer, students["schema"] / "part2_detection.ipynb")
    for student, folder in students.items():
        hw.submit(folder, student, exchange)
    # a link in the exchange to the instructor's answer key, made after submitting
    inbound, = (exchange / hw.COURSE_ID / "inbound").glob("scripter+week4+*")
    (inbound / "answer_key.json").symlink_to(course / "grading" / "week4" / "answer_key.json")
    collected = steps.collect(course, "week4")
    step = time.perf_counter()
    summaries = hw.autograde_class(course, workers=2, cell_timeout=60)
    seconds["autograde"] = time.perf_counter() - step
    steps.feedback(course, "week4")
    print({k: round(v, 1) for k, v in seconds.items()}, file=sys.stderr)
    yield {"root": root, "course": course, "fetched": fetched, "models": models, "students": students,
           "summaries": {s.student: s for s in summaries}, "collected": collected}
    if before is None:
        os.environ.pop("NBGRADER_EXCHANGE", None)
    else:
        os.environ["NBGRADER_EXCHANGE"] = before


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def feedback_text(course: Path, student: str, notebook: str) -> tuple[str, str]:
    """(the HTML, its visible text) of a student's feedback for one notebook."""
    from bs4 import BeautifulSoup
    html = (course / "feedback" / student / "week4" / f"{notebook}.html").read_text()
    return html, BeautifulSoup(html, "html.parser").get_text(" ")


# ------------------------------------------------------------------ the student's side

def test_nbgrader_validate_of_a_complete_part1_neither_trains_nor_touches_the_model(course, tmp_path):
    folder = shutil.copytree(course["students"]["honest"], tmp_path / "week4")
    model = folder / hw.MODEL_FILES[0]
    before = (sha(model), model.stat().st_mtime_ns)
    start = time.perf_counter()
    done = hw.nbgrader(folder, "validate", "part1_attack.ipynb", f"--Execute.timeout={VALIDATE_TIMEOUT_S}")
    seconds = time.perf_counter() - start
    log = done.stdout + done.stderr
    print(f"nbgrader validate part1_attack.ipynb: {seconds:.1f} s", file=sys.stderr)
    assert "Success! Your notebook passes all the tests." in log, log
    assert "Timeout" not in log, log
    assert (sha(model), model.stat().st_mtime_ns) == before, "validation rewrote the model file"
    assert sorted(p.name for p in folder.glob("backdoor_model*")) == sorted(hw.MODEL_FILES)

    # Without the model, validation fails and says what to do: run the training cell first.
    for name in hw.MODEL_FILES:
        (folder / name).unlink()
    done = subprocess.run([sys.executable, "-m", "nbgrader", "validate", "part1_attack.ipynb"], cwd=folder,
                          capture_output=True, text=True, env={k: v for k, v in os.environ.items()
                                                               if k != "NBGRADER_EXECUTION"})
    said = " ".join((done.stdout + done.stderr).split())
    assert "was not handed in: run the training cell" in said and "Task 3" in said, said[-3000:]
    assert not (folder / hw.MODEL_FILES[0]).exists(), "validation trained a model"


# ------------------------------------------------------------------ feedback

def test_feedback_of_a_student_with_pending_manual_grades_says_so(course):
    html, text = feedback_text(course["course"], "honest", "part3_analysis")
    assert "Grading pending: 10 point(s) of this notebook are not graded yet" in text
    assert text.count("Pending:") == 3, "one note above each of the three Part 3 answers"
    _, part1 = feedback_text(course["course"], "honest", "part1_attack")
    assert "pending" not in part1.lower(), "a notebook without manual grading has no pending note"


def test_a_failed_tests_feedback_lists_two_independent_problems(course):
    html, text = feedback_text(course["course"], "sloppy", "part1_attack")
    failure = text[text.index("GradingFailure", text.index("p1-test-distinct-triggers")):]
    failure = failure[:failure.index("Grade cell") if "Grade cell" in failure else None]
    assert re.search(r"\d problems:", failure), failure
    assert "trigger_custom gave a different result on a second call" in " ".join(failure.split())
    assert "trigger_custom changes the images too much" in " ".join(failure.split())
    assert 'class="ansi-red-fg">GradingFailure' in html, "a failure must look unlike a pass"
    for output in re.findall(r"<pre>(.*?)</pre>", html, flags=re.S):
        if "GradingFailure" in output:
            longest = max(len(line) for line in re.sub(r"<[^>]+>", "", output).splitlines())
            assert longest <= 80, "failure lines are wrapped"
    assert "NotImplementedError: \n" not in text


def test_summary_marks_manual_grading_and_skipped_rows_keep_their_failures(course):
    honest, sloppy = course["summaries"]["honest"], course["summaries"]["sloppy"]
    assert honest.pending == ["part3_analysis"] and not honest.failed
    assert {"p1-test-trigger-custom", "p1-test-distinct-triggers"} <= set(sloppy.failed)
    again = {s.student: s for s in hw.autograde_class(course["course"], workers=1)}
    assert again["sloppy"].skipped and again["sloppy"].failed == sloppy.failed
    assert "0/10 (needs manual grading)" in table(list(again.values()))


# ------------------------------------------------------------------ broken and hostile hand-ins

def test_broken_and_hostile_hand_ins_cost_only_their_own_points(course):
    """A notebook saved half-way and one with nbgrader metadata of a future version (each stopped
    the whole class before) score 0 for that notebook only, with a line for the instructor and a
    feedback that says why; files named like modules and a link to the answer key in the exchange
    change nothing (the link never reaches the submission)."""
    summaries, course_dir = course["summaries"], course["course"]
    full = summaries["honest"].scores
    assert full["part1_attack"] == (60, 60) and full["part2_detection"] == (30, 30)
    assert summaries["scripter"].scores == full and not summaries["scripter"].failed
    assert summaries["halfsaved"].scores["part1_attack"] == (0, 60)
    assert summaries["halfsaved"].scores["part2_detection"] == (30, 30)
    assert summaries["schema"].scores["part1_attack"] == (60, 60)
    assert summaries["schema"].scores["part2_detection"] == (0, 30)
    assert [s for s, summary in summaries.items() if summary.attention] == ["halfsaved", "schema"]
    assert "part1_attack.ipynb is unreadable" in summaries["halfsaved"].attention[0]
    assert "part2_detection.ipynb is unreadable" in summaries["schema"].attention[0]
    _, text = feedback_text(course_dir, "halfsaved", "part1_attack")
    assert "This is not the notebook you handed in" in text and "could not be graded" in text
    assert "NEEDS ATTENTION: scripter: answer_key.json: a symbolic link" in course["collected"]
    key = (course_dir / "grading" / "week4" / "answer_key.json").read_text()
    for path in (course_dir / "submitted" / "scripter").rglob("*"):
        assert not path.is_symlink() and (not path.is_file() or path.read_text(errors="replace") != key)
    html, text = feedback_text(course_dir, "scripter", "part3_analysis")
    assert "the blend is best" in text and "__pwned" in text      # the answer is there, as text
    from bs4 import BeautifulSoup
    page = BeautifulSoup(html, "html.parser")
    assert not [s for s in page.find_all("script") if "__pwned" in s.get_text()]
    assert not page.find_all(attrs={"onerror": True}) and not page.find_all("iframe")
    assert not [a for a in page.find_all("a") if a.get("href", "").startswith("javascript")]


def test_the_class_command_ends_with_the_hand_ins_that_need_attention(course, capsys):
    from course_lib.autograde import classroom
    with pytest.raises(SystemExit) as stopped:
        classroom.main(["week4", "--course", str(course["course"]), "--workers", "1"])
    said = capsys.readouterr().out
    assert stopped.value.code == classroom.NEEDS_ATTENTION
    assert "NEEDS ATTENTION: 2 of 5 hand-ins (halfsaved, schema)" in said, said[-2000:]
    assert "Traceback" not in said


# ------------------------------------------------------------------ the guide, as written

def guide_blocks() -> list[tuple[str, str]]:
    """(where, commands) of every bash block of the guide that says where it runs: its first
    line is ``# from the repository root`` or ``# as a student ...``."""
    blocks = re.findall(r"```bash\n(.*?)```", GUIDE.read_text(), flags=re.S)
    found = []
    for block in blocks:
        first = block.splitlines()[0]
        if first.startswith("# from the repository root"):
            found.append(("root", block))
        elif first.startswith("# as a student"):
            found.append(("student", block))
        elif first.startswith("# in assignments/") and "jupyter lab" in block:
            found.append(("formgrader", block))
    return found


def grade_pending(course: Path, student: str, points: float) -> None:
    """Give every answer of ``student`` that needs manual grading ``points``, as the Formgrader does."""
    with Gradebook(f"sqlite:///{course / 'gradebook.db'}") as gb:
        for notebook in gb.find_submission("week4", student).notebooks:
            for grade in notebook.grades:
                if grade.needs_manual_grade:
                    grade.manual_score = min(points, grade.max_score)
                    grade.needs_manual_grade = False
        gb.db.commit()


def test_the_guides_commands_in_order_give_a_grades_csv(course, tmp_path):
    """Runs every located block of the guide in order, in the folder it names: the instructor's in a
    fresh copy of the repository's course, the student's in a student's home. Three steps are not
    run as written and are done here instead: the zoo build (copied from the module's course: the
    same small zoo, minutes saved), the student's work (the reference solution and model) and the
    manual grading in the Formgrader (its browser test is below; here through the gradebook)."""
    root = tmp_path / "repo"
    course_dir = hw.copy_course(root / "assignments")
    shutil.copytree(course["course"] / "grading", course_dir / "grading")
    shutil.copytree(course["course"] / "source" / "week4" / "zoo", course_dir / "source" / "week4" / "zoo")
    (root / "scripts").symlink_to(ROOT / "scripts")
    home = tmp_path / "home"
    home.mkdir()
    student = getpass.getuser()      # nbgrader submits under the student's user name
    (root / "roster.csv").write_text(f"id,first_name,last_name,email\n{student},Alice,Liddell,alice@example.org\n")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               EXCHANGE=str(tmp_path / "exchange"), NBGRADER_EXCHANGE=str(tmp_path / "exchange"), ZOO_SEED="0")
    env.pop("NBGRADER_EXECUTION", None)
    blocks = guide_blocks()
    assert [where for where, _ in blocks].count("student") >= 2 and len(blocks) >= 5, blocks
    ran = []
    for where, block in blocks:
        if "zoo build" in block or "build-zoo" in block:   # minutes: the same small zoo is copied instead
            continue
        if where == "formgrader":      # the instructor grades Part 3 in the browser: done through its API here
            grade_pending(course_dir, student, points=2.0)
            continue
        cwd = root if where == "root" else home
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=1800)
        assert done.returncode == 0, (block, done.stdout[-3000:], done.stderr[-3000:])
        if "course_lib autograde" in block:
            assert "SAWarning" not in done.stderr, done.stderr[-3000:]
        ran.append(block)
        if "fetch_assignment" in block:   # the student does the homework
            work = home / "week4"
            solved = completed_release(work, tmp_path / "solved")
            shutil.rmtree(work)
            shutil.copytree(solved, work)
            for name in hw.MODEL_FILES:
                shutil.copy(course["models"] / name, work)
    assert any("export" in block for block in ran)
    with open(course_dir / "grades.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["student_id"] for row in rows] == [student]
    assert float(rows[0]["raw_score"]) > 0


# ------------------------------------------------------------------ Formgrader in JupyterLab

@pytest.mark.browser
def test_formgrader_manual_grade_and_comment_reach_gradebook_and_export(course, tmp_path):
    chromium = _ensure_chromium()
    from playwright.sync_api import sync_playwright

    course_dir = course["course"]
    port, token = _free_port(), "formgrader-test-token"
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(tmp_path / "config"), JUPYTER_RUNTIME_DIR=str(tmp_path / "rt"),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    command = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
               f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={course_dir}",
               f"--LabApp.workspaces_dir={tmp_path / 'workspaces'}", f"--LabApp.user_settings_dir={tmp_path / 's'}"]
    if os.geteuid() == 0:
        command.append("--allow-root")
    url = f"http://127.0.0.1:{port}"
    with open(tmp_path / "lab.log", "w") as log:
        server = subprocess.Popen(command, cwd=course_dir, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_for(url, token, server)
            SHOTS.mkdir(parents=True, exist_ok=True)
            with sync_playwright() as pw:
                browser = pw.chromium.launch_persistent_context(
                    str(tmp_path / "profile"), executable_path=str(chromium), headless=True, args=CHROMIUM_ARGS,
                    viewport={"width": 1400, "height": 1000})
                try:
                    page = browser.new_page()
                    _grade_part3(page, url, token, course_dir)
                    _hostile_part3_is_inert(browser.new_page(), url, token, course_dir)
                finally:
                    browser.close()
        finally:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()

    with Gradebook(f"sqlite:///{course_dir / 'gradebook.db'}") as gb:
        grade = gb.find_grade("p3-triggers", "part3_analysis", "week4", "honest")
        comment = gb.find_comment("p3-triggers", "part3_analysis", "week4", "honest")
        assert (grade.manual_score, comment.comment) == (3.0, "Good table; argue the choice from the threat model.")
        autograded = sum(g.score for nb in gb.find_submission("week4", "honest").notebooks for g in nb.grades
                         if g.name.startswith(("p1-", "p2-")))
    with pytest.raises(ValueError, match="still need manual grading"):
        steps.export(course_dir, tmp_path / "refused.csv")
    path = steps.export(course_dir, tmp_path / "grades.csv", allow_pending=True)
    rows = {row["student_id"]: row for row in csv.DictReader(path.open())}
    assert float(rows["honest"]["raw_score"]) == autograded + 3.0


def _wait_for(url: str, token: str, server, limit_s: float = 120) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail("JupyterLab exited before answering")
        try:
            urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"JupyterLab did not answer within {limit_s:.0f} s")


def _hostile_part3_is_inert(page, url: str, token: str, course_dir: Path) -> None:
    """The Formgrader's page of a Part 3 full of scripts, handlers and javascript: links: the
    answer is there to read and grade, and nothing the student wrote runs, even when clicked."""
    dialogs = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    with Gradebook(f"sqlite:///{course_dir / 'gradebook.db'}") as gb:
        submission_id = gb.find_submission_notebook("part3_analysis", "week4", "scripter").id
    page.goto(f"{url}/formgrader/submissions/{submission_id}/?token={token}")
    page.locator("input.score#p3-triggers").wait_for(timeout=120_000)
    assert page.get_by_text("the blend is best", exact=False).count() == 3
    for link in page.get_by_text("my table").all() + page.get_by_text("see", exact=True).all():
        link.click()
    page.wait_for_timeout(1000)
    assert page.evaluate("window.top.__pwned") is None and not dialogs
    assert page.locator("script:has-text('__pwned'), iframe[src^='javascript'], [onerror]").count() == 0
    page.screenshot(path=str(SHOTS / "formgrader-hostile-part3.png"), full_page=True)


def _grade_part3(page, url: str, token: str, course_dir: Path) -> None:
    """Open the Formgrader from JupyterLab's Nbgrader menu, open the honest student's Part 3 in it
    and enter a score and a comment for question 1 (the Formgrader saves a field when it changes)."""
    page.goto(f"{url}/lab?token={token}")
    page.wait_for_selector(".jp-LabShell", timeout=120_000)
    page.get_by_role("menuitem", name="Nbgrader", exact=True).click()
    page.get_by_role("menuitem", name="Formgrader", exact=True).click()
    frame = page.wait_for_selector("iframe[src*='formgrader']", timeout=60_000).content_frame()
    frame.wait_for_selector("text=Manage Assignments", timeout=120_000)
    with Gradebook(f"sqlite:///{course_dir / 'gradebook.db'}") as gb:
        submission_id = gb.find_submission_notebook("part3_analysis", "week4", "honest").id
    frame.goto(f"{url}/formgrader/submissions/{submission_id}/?token={token}")
    score = frame.locator("input.score#p3-triggers")
    score.wait_for(timeout=120_000)
    score.fill("3")
    score.press("Tab")
    comment = frame.locator("textarea#p3-triggers-comment")
    comment.fill("Good table; argue the choice from the threat model.")
    comment.press("Tab")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with Gradebook(f"sqlite:///{course_dir / 'gradebook.db'}") as gb:
            grade = gb.find_grade("p3-triggers", "part3_analysis", "week4", "honest")
            comment_text = gb.find_comment("p3-triggers", "part3_analysis", "week4", "honest").comment
            if grade.manual_score == 3.0 and comment_text:
                break
        time.sleep(1)
    page.screenshot(path=str(SHOTS / "formgrader.png"), full_page=True)
