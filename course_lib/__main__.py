"""Command line: ``python -m course_lib {demo,bench,zoo} ...``.

    python -m course_lib demo [--dataset fashion-mnist|mnist|cifar10] [--out DIR]
    python -m course_lib bench attack --json      BadNets: clean accuracy, ASR, training seconds
    python -m course_lib bench poison --json      batched poisoning vs the lecture's loop
    python -m course_lib bench defenses --json    every defense on one backdoored model
    python -m course_lib bench matrix [--fast] --json   every detector on many backdoored and clean models
    python -m course_lib bench pipeline --json    detect, remove, retrain, then STRIP at run time, on one model
    python -m course_lib zoo build --out DIR      the homework's model zoo
    python -m course_lib autograde week4 --course assignments [--workers N] [--dask-scheduler ADDRESS]
                                                  trusted, sandboxed, parallel autograding (nbgrader)
    python -m course_lib {release,collect,feedback} week4 --course assignments
    python -m course_lib roster ROSTER.csv --course assignments
    python -m course_lib export --course assignments [--to FILE] [--allow-pending]
                                                  nbgrader's steps, run in the course folder from anywhere
    python -m course_lib permissions --course assignments [--fix]
                                                  a shared machine: can students read only what they may?
    python -m course_lib student-setup [--exchange DIR]
                                                  a student's account: nbgrader's exchange, no instructor menus
    python -m course_lib tournament week4 --course assignments [--workers N] [--dask-scheduler ADDRESS] [--out DIR]
                                                  the class tournament, after autograding (docs/tournament.md)
    python -m course_lib site --out DIR (--notebooks EXECUTED_DIR | --execute) [--tournament RESULTS_DIR]
                                                  the lecture as a static website (Jupyter Book)
"""
from __future__ import annotations

import sys

USAGE = __doc__
STEPS = ("release", "roster", "collect", "feedback", "export")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "demo":
        from .demo import main as run
    elif command == "bench" and rest[:1] == ["defenses"]:
        from .defenses.compare import main as run
        rest = rest[1:]
    elif command == "bench" and rest[:1] == ["matrix"]:
        from .defenses.matrix import main as run
        rest = rest[1:]
    elif command == "bench" and rest[:1] == ["pipeline"]:
        from .defenses.pipeline import main as run
        rest = rest[1:]
    elif command == "bench":
        from .bench import main as run
    elif command == "zoo":
        from .zoo import main as run
    elif command == "site":
        from .site import main as run
    elif command == "autograde":
        from .autograde.classroom import main as run
    elif command == "permissions":
        from .autograde.shared import main as run
    elif command == "student-setup":
        from .student_setup import main as run
    elif command == "tournament" and rest[:1] == ["bench"]:
        from .tournament.bench import main as run
        rest = rest[1:]
    elif command == "tournament":
        from .tournament.command import main as run
    elif command in STEPS:
        from functools import partial

        from .autograde.steps import main as step
        run = partial(step, command)
    else:
        print(f"unknown command {command!r}\n{USAGE}", file=sys.stderr)
        return 2
    run(rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
