"""A student's account, set up for the homework in one step: ``python -m course_lib student-setup``.

JupyterLab's *Assignments* tab (nbgrader's fetch, validate and submit buttons) needs to know
the course and where its exchange is; without that it says "The exchange directory does not
exist". nbgrader reads it from the student's own ``~/.jupyter/nbgrader_config.py``, which this
command writes (the course id, when given the exchange, and a cell timeout for *Validate* that
a slow laptop can meet: ``VALIDATE_TIMEOUT_S``). It also switches off, for this
account only, the nbgrader parts a student has no use for: the Formgrader, *Create Assignment*
and the course list (nbgrader's documentation: "Disabling extensions"), so that a student sees
the *Assignments* tab and the *Validate* button, not the instructor's menus.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

COURSE_ID = "adversarial-ml-week4"
# nbgrader's Validate gives each cell 30 s by default. Part 1's validate cell runs the grader's poisoning run
# (two small trainings): on two idle cores the whole validate takes about 40 s, and beside another job that
# one cell ran past 30 s (2026-12-07). A student's laptop gets the autograder's own cell limit instead.
VALIDATE_TIMEOUT_S = 120
MARK = "# written by python -m course_lib student-setup"
LAB_PLUGINS = ("@jupyter/nbgrader:formgrader", "@jupyter/nbgrader:create-assignment", "@jupyter/nbgrader:course-list")
SERVER_EXTENSIONS = ("nbgrader.server_extensions.formgrader", "nbgrader.server_extensions.course_list")


def config_text(course_id: str, exchange: str | None) -> str:
    lines = [MARK, "c = get_config()  # noqa: F821", f"c.CourseDirectory.course_id = {course_id!r}",
             f"c.Execute.timeout = {VALIDATE_TIMEOUT_S}  # seconds per cell when validating (nbgrader's default: 30)"]
    if exchange:
        lines.append(f"c.Exchange.root = {exchange!r}")
    return "\n".join(lines) + "\n"


def write_config(home: Path, course_id: str = COURSE_ID, exchange: str | None = None) -> Path:
    """Write ``home/.jupyter/nbgrader_config.py``; refuses to replace one the student wrote."""
    if not course_id or not isinstance(course_id, str):
        raise ValueError(f"course_id must be a non-empty string, got {course_id!r}")
    if exchange is not None and not Path(exchange).is_absolute():
        raise ValueError(f"exchange must be an absolute path, got {exchange!r}")
    path = Path(home) / ".jupyter" / "nbgrader_config.py"
    if path.is_file() and not path.read_text().startswith(MARK):
        raise ValueError(f"{path} exists and was not written by this command: add these lines to it yourself:\n"
                         + config_text(course_id, exchange))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config_text(course_id, exchange))
    return path


def hide_instructor_menus() -> list[str]:
    """Switch the instructor's nbgrader parts off for this account (JupyterLab and server)."""
    jupyter = [sys.executable, "-m", "jupyter"]
    commands = [[*jupyter, "labextension", "disable", "--level=user", plugin] for plugin in LAB_PLUGINS]
    commands += [[*jupyter, "server", "extension", "disable", "--user", name] for name in SERVER_EXTENSIONS]
    failed = []
    for command in commands:
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            failed.append(f"{' '.join(command[3:])}: {(done.stderr or done.stdout).strip()[-200:]}")
    return failed


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m course_lib student-setup", description=__doc__.split("\n\n")[0])
    parser.add_argument("--exchange", default=os.environ.get("NBGRADER_EXCHANGE"),
                        help="the course's exchange folder, e.g. /srv/nbgrader/exchange (default: "
                             "$NBGRADER_EXCHANGE, else nbgrader's default)")
    parser.add_argument("--course-id", default=COURSE_ID, help=f"default {COURSE_ID}")
    args = parser.parse_args(argv)
    try:
        path = write_config(Path.home(), args.course_id, args.exchange)
    except ValueError as err:
        parser.error(str(err))
    print(f"wrote {path}: course {args.course_id}, exchange {args.exchange or 'nbgrader default'}")
    failed = hide_instructor_menus()
    for line in failed:
        print(f"could not switch off {line}")
    print("the instructor's menus are hidden for this account" if not failed else "see above")
