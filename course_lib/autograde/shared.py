"""A course on one shared machine keeps its secrets: who may read what, checked and applied.

When the students are accounts of the instructor's machine, the file modes are the only wall
between them and the answers. nbgrader's folders hold them all: ``source/`` (solutions and
hidden tests), ``release/``, ``grading/`` (the answer key, the reference model), ``submitted/``,
``autograded/`` and ``feedback/`` (every student's work and grades), ``.autograde/`` (the
grader's inputs and cached verdicts), ``gradebook.db`` and exported grades; the repository's
``solutions/`` holds the reference solutions. Students need none of them: they fetch and
submit through the exchange, which nbgrader gives its own permissions (they may write their
submission into ``inbound/`` but not list it, and read only the released ``outbound/``), and
they get their feedback through it too.

So the layout this module checks (``python -m course_lib permissions --course assignments``)
and applies (``--fix``) is simple: the course folder, the repository's ``solutions/`` and the
repository itself (its ``.git`` holds every committed source notebook) are the instructor's alone (mode 0700, nothing for group or others), and the exchange lives
*outside* them (nbgrader's default, ``/srv/nbgrader/exchange``, or ``NBGRADER_EXCHANGE``),
open to every account as nbgrader documents. The grading sandbox does not need the course
folder's modes: it is given its inputs by bind mounts (:mod:`.sandbox`), and it only needs
the virtual environment and ``course_lib`` readable by others, which is checked too.
"""
from __future__ import annotations

import argparse
import stat
import sys
from pathlib import Path

from .steps import course_folder

PRIVATE_MODE = 0o700


def _open_to_others(path: Path) -> bool:
    return bool(path.stat().st_mode & 0o077)


def exchange_root(course: Path) -> Path:
    """The exchange the course's nbgrader_config.py names (nbgrader's default if none)."""
    from traitlets.config.loader import PyFileConfigLoader
    config = PyFileConfigLoader("nbgrader_config.py", path=str(course)).load_config()
    return Path(config.Exchange.get("root", "/srv/nbgrader/exchange")).resolve()


def _repository(course: Path) -> Path | None:
    """The git repository the course folder lies in (its history holds every committed answer)."""
    for folder in course.parents:
        if (folder / ".git").exists():
            return folder
    return None


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def audit(course, solutions=None) -> list[str]:
    """What lets a student read or change what they must not, one line each (empty: none).

    ``solutions``: the repository's reference solutions (default: ``solutions/`` beside the
    course folder, if there is one)."""
    course = course_folder(course)
    solutions = Path(solutions) if solutions is not None else course.parent / "solutions"
    problems = []
    if _open_to_others(course):
        problems.append(f"{course} is open to other accounts (mode {stat.filemode(course.stat().st_mode)}): students "
                        f"can reach source/, grading/, autograded/, feedback/, the gradebook and the grades; make it "
                        f"0700 (--fix)")
    if solutions.is_dir() and _open_to_others(solutions):
        problems.append(f"{solutions} (the reference solutions) is open to other accounts; make it 0700 (--fix)")
    repository = _repository(course)
    if repository is not None and _open_to_others(repository):
        problems.append(f"{repository} (the kit's repository: its .git holds the source notebooks with "
                        f"solutions and hidden tests) is open to other accounts; make it 0700 (--fix)")
    exchange = exchange_root(course)
    if _inside(exchange, course) or (solutions.is_dir() and _inside(exchange, solutions.parent)):
        problems.append(f"the exchange {exchange} is inside the course folder or the repository: students must "
                        f"reach it, so its parents cannot be private. Set NBGRADER_EXCHANGE to a folder outside "
                        f"(nbgrader's default: /srv/nbgrader/exchange)")
    elif not exchange.is_dir():
        problems.append(f"the exchange {exchange} does not exist: create it once as root, writable for all "
                        f"(mkdir -p {exchange} && chmod 1777 {exchange})")
    elif exchange.stat().st_mode & 0o007 != 0o007:
        problems.append(f"the exchange {exchange} is not writable for every account (mode "
                        f"{stat.filemode(exchange.stat().st_mode)}): students cannot submit; chmod 1777 it")
    problems += _sandbox_needs()
    return problems


def _sandbox_needs() -> list[str]:
    """The grading sandbox runs as an unprivileged uid: it must read the environment and the kit."""
    import course_lib
    needed = [Path(sys.prefix), Path(course_lib.__file__).resolve().parent]
    return [f"{path} is not readable by other accounts: the grading sandbox (its own uid) cannot import the kit; "
            f"chmod -R o+rX {path}" for path in needed
            if path.is_dir() and (path.stat().st_mode & 0o005) != 0o005]


def secure(course, solutions=None) -> list[str]:
    """Make the course folder and the reference solutions the instructor's alone; returns what
    it changed (the exchange and the sandbox's needs are reported by :func:`audit`, not changed)."""
    course = course_folder(course)
    solutions = Path(solutions) if solutions is not None else course.parent / "solutions"
    changed = []
    for folder in (course, solutions, _repository(course)):
        if folder is None:
            continue
        if folder.is_dir() and _open_to_others(folder):
            folder.chmod(PRIVATE_MODE)
            changed.append(f"{folder}: now 0700")
    return changed


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m course_lib permissions", description=__doc__.split("\n\n")[0])
    parser.add_argument("--course", type=Path, default=Path("."), help="the nbgrader course folder (default: .)")
    parser.add_argument("--solutions", type=Path, default=None,
                        help="the reference solutions (default: solutions/ beside the course folder)")
    parser.add_argument("--fix", action="store_true", help="make the course folder and solutions/ private (0700)")
    args = parser.parse_args(argv)
    try:
        if args.fix:
            for line in secure(args.course, args.solutions):
                print(f"changed: {line}")
        problems = audit(args.course, args.solutions)
    except ValueError as err:
        parser.error(str(err))
    for line in problems:
        print(f"NEEDS ATTENTION: {line}")
    print("a student account can read only the exchange (and its own feedback through it)" if not problems
          else f"{len(problems)} problem(s)")
    if problems:
        sys.exit(3)
