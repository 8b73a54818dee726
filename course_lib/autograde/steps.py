"""The nbgrader steps an instructor runs, from any folder: ``python -m course_lib STEP ...``.

nbgrader reads ``nbgrader_config.py`` from the folder it is started in, and resolves every
path (``source/``, ``gradebook.db``, an export's file name) against that folder. Started
anywhere else it finds no course: ``generate_feedback`` matches no notebook, and ``export``
writes a header-only CSV from a new, empty ``gradebook.db``. Each step below therefore runs
nbgrader *in* the course folder given by ``--course`` (paths you pass are taken relative to
where you are), with this interpreter's ``bin/`` first on PATH (nbgrader starts ``alembic``
from there):

    python -m course_lib release  week4 --course assignments      nbgrader release_assignment (to the exchange)
    python -m course_lib roster   roster.csv --course assignments nbgrader db student import (id,first_name,...)
    python -m course_lib collect  week4 --course assignments      nbgrader collect
    python -m course_lib feedback week4 --course assignments      nbgrader generate_feedback + release_feedback
    python -m course_lib export   --course assignments [--to F]   nbgrader export (refused while grades are pending)

Answers that need manual grading (Part 3) count as 0 points until they are graded: the
feedback says so at the top of each such notebook (:class:`.preprocessor.MarkPending`), and
``export`` refuses to write a grades file that would list them as final, unless
``--allow-pending``.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

COURSE_CONFIG = "nbgrader_config.py"


def course_folder(course, argument: str = "course") -> Path:
    """``course`` as an absolute path, checked to be an nbgrader course folder (``argument``: its name)."""
    folder = Path(course).resolve()
    if not (folder / COURSE_CONFIG).is_file():
        raise ValueError(f"{argument}: {course} is not an nbgrader course folder (no {COURSE_CONFIG} in it); pass "
                         f"the folder that holds it: --course assignments from the repository root, --course . "
                         f"from inside it")
    return folder


def nbgrader(course, *args: str, timeout: float | None = None) -> subprocess.CompletedProcess:
    """Run ``nbgrader ARGS`` in the course folder with this Python; raise with its log if it fails."""
    return run_nbgrader(course_folder(course), *args, timeout=timeout)


def run_nbgrader(folder, *args: str, timeout: float | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``nbgrader ARGS`` in ``folder`` (a course folder, or a student's for fetch and submit)."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("NBGRADER_EXECUTION", None)
    done = subprocess.run([sys.executable, "-m", "nbgrader", *args], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise RuntimeError(f"nbgrader {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done


def pending_grades(course, assignment: str | None = None) -> dict:
    """{student: [grade ids that still need manual grading]} in the course's gradebook
    (of ``assignment``, or of every assignment), only students with at least one."""
    from nbgrader.api import Gradebook
    folder = course_folder(course)
    if not (folder / "gradebook.db").is_file():
        return {}
    pending: dict = {}
    with Gradebook(f"sqlite:///{folder / 'gradebook.db'}") as gb:
        for name in [assignment] if assignment else [a.name for a in gb.assignments]:
            for submission in gb.find_assignment(name).submissions:
                ids = [g.name for nb in submission.notebooks for g in nb.grades if g.needs_manual_grade]
                if ids:
                    pending.setdefault(submission.student.id, []).extend(ids)
    return pending


def release(course, assignment: str) -> str:
    """Copy the generated release (``release/ASSIGNMENT``) to the exchange; returns nbgrader's log."""
    if not (course_folder(course) / "release" / assignment).is_dir():
        raise ValueError(f"assignment: {course}/release/{assignment} does not exist; generate it first with "
                         f"`python scripts/homework.py release`")
    done = nbgrader(course, "release_assignment", assignment, "--force")
    return done.stdout + done.stderr


def roster(course, csv_file) -> str:
    """Add (or update) the students listed in a CSV file: columns id, first_name, last_name, email."""
    path = Path(csv_file).resolve()
    if not path.is_file():
        raise ValueError(f"csv_file: {csv_file} does not exist")
    done = nbgrader(course, "db", "student", "import", str(path))
    return done.stdout + done.stderr


def collect(course, assignment: str) -> str:
    """Collect the submissions from the exchange into ``submitted/``."""
    done = nbgrader(course, "collect", assignment)
    return done.stdout + done.stderr


def feedback(course, assignment: str, *, exchange: bool = True) -> str:
    """Generate every graded student's feedback HTML and (with ``exchange``) release it. A student
    whose feedback nbgrader cannot make is a ``NEEDS ATTENTION`` line; the others' feedback is
    made and released all the same (nbgrader goes on past a failed student, then exits 1)."""
    log = run_nbgrader(course_folder(course), "generate_feedback", assignment, "--force", check=False)
    text = log.stdout + log.stderr
    failed = re.findall(r"There was an error processing assignment '[^']*' for student '([^']*)'", text)
    if log.returncode != 0 and not failed:
        raise RuntimeError(f"nbgrader generate_feedback failed ({log.returncode}):\n{text}")
    text += "".join(f"\nNEEDS ATTENTION: {student}: nbgrader could not make this student's feedback (see the "
                    f"log above)" for student in sorted(set(failed)))
    if exchange:
        done = nbgrader(course, "release_feedback", assignment)
        text += done.stdout + done.stderr
    return text


def export(course, to, *, allow_pending: bool = False) -> Path:
    """Write the grades of every student and assignment to the CSV file ``to``.

    Refused while answers still need manual grading (they would count as 0 points), unless
    ``allow_pending``.
    """
    pending = pending_grades(course)
    if pending and not allow_pending:
        listed = ", ".join(f"{s} ({len(ids)})" for s, ids in sorted(pending.items()))
        raise ValueError(f"{len(pending)} student(s) still need manual grading and would be exported with 0 "
                         f"points for it: {listed}. Grade them in the Formgrader, or pass --allow-pending")
    path = Path(to).resolve()
    nbgrader(course, "export", f"--to={path}")
    path.chmod(0o600)                 # names, emails and grades: the instructor's alone
    return path


def main(step: str, argv=None) -> None:
    """``python -m course_lib STEP``: one of release, roster, collect, feedback, export."""
    parser = argparse.ArgumentParser(prog=f"python -m course_lib {step}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--course", type=Path, default=Path("."),
                        help="the nbgrader course folder, e.g. assignments (default: .)")
    if step == "roster":
        parser.add_argument("csv_file", type=Path, help="CSV with columns id, first_name, last_name, email")
    elif step == "export":
        parser.add_argument("--to", type=Path, default=None, help="CSV file (default: COURSE/grades.csv)")
        parser.add_argument("--allow-pending", action="store_true",
                            help="export even while answers still need manual grading (counted as 0)")
    else:
        parser.add_argument("assignment", help="the nbgrader assignment, e.g. week4")
    if step == "feedback":
        parser.add_argument("--no-exchange", action="store_true",
                            help="only generate the HTML in COURSE/feedback (for an LMS), do not release it")
    args = parser.parse_args(argv)
    try:
        if step == "release":
            print(release(args.course, args.assignment))
        elif step == "roster":
            print(roster(args.course, args.csv_file))
        elif step == "collect":
            print(collect(args.course, args.assignment))
        elif step == "feedback":
            print(feedback(args.course, args.assignment, exchange=not args.no_exchange))
            pending = pending_grades(args.course, args.assignment)
            if pending:
                print(f"note: {len(pending)} student(s) still need manual grading; their feedback says which "
                      f"answers are pending: {', '.join(sorted(pending))}")
        elif step == "export":
            path = export(args.course, args.to or Path(args.course) / "grades.csv", allow_pending=args.allow_pending)
            print(f"wrote {path}")
        else:
            parser.error(f"unknown step {step!r}")
    except (ValueError, RuntimeError) as err:
        parser.error(str(err))
