"""The tables of docs/benchmarks.md, made from the JSON the bench commands printed.

A figure in the docs must be the figure the command printed: each measured table in
docs/benchmarks.md is generated from a saved JSON output (a file under docs/benchmarks/, or
docs/detection_matrix.jsonl) and sits between two markers naming its source::

    <!-- table: docs/benchmarks/bench-class-e7641b5.json -->
    ...generated table...
    <!-- end table -->

    python scripts/bench_table.py FILE.json [FILE.json ...]   print the table of one or more runs
    python scripts/bench_table.py --write docs/benchmarks.md   regenerate every marked table in place
    python scripts/bench_table.py --check docs/benchmarks.md   fail if any marked table differs from its JSON

Which table a file gives depends on what printed it: ``bench matrix --json`` lines (rows with a
``trigger``) give the detection matrix (course_lib.defenses.matrix.to_markdown), ``bench defenses
--json`` lines (rows with a ``paper``) the comparison (course_lib.defenses.compare.to_markdown);
any other JSON object (``bench attack|poison|predict``, ``scripts/homework.py bench-*``) gives one
row per figure, nested figures flattened (``phases.grade``), one column per file or line.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(<!-- table: (?P<sources>[^>]+?) -->\n)(?P<table>.*?)(<!-- end table -->)", re.S)


def runs_of(path: Path) -> list[dict]:
    """The JSON objects of a saved output: one object, or one per line (JSON lines)."""
    text = Path(path).read_text()
    try:
        loaded = json.loads(text)
        return loaded if isinstance(loaded, list) else [loaded]
    except json.JSONDecodeError:
        return [json.loads(line) for line in text.splitlines() if line.strip()]


def flatten(run: dict, prefix: str = "") -> dict:
    """``{"phases": {"grade": 1}}`` -> ``{"phases.grade": 1}``."""
    flat = {}
    for key, value in run.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def figures_table(runs: list[dict], names: list[str]) -> str:
    """One row per figure, one column per run."""
    flat = [flatten(run) for run in runs]
    keys = list(dict.fromkeys(key for run in flat for key in run))
    lines = ["| figure | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for key in keys:
        lines.append(f"| {key} | " + " | ".join(json.dumps(run.get(key, "-")).strip('"') for run in flat) + " |")
    return "\n".join(lines)


def table(paths: list[Path]) -> str:
    """The markdown table of the saved outputs ``paths`` (see the module docstring)."""
    if not paths:
        raise ValueError("paths: give at least one saved JSON output")
    runs = [run for path in paths for run in runs_of(path)]
    if all("trigger" in run for run in runs if run.get("defense") != "total"):
        from course_lib.defenses import matrix
        return matrix.to_markdown([r for r in runs if r.get("defense") != "total"])
    if all("paper" in run for run in runs if run.get("defense") not in ("total", "setup")):
        from course_lib.defenses import compare
        return compare.to_markdown([r for r in runs if r.get("defense") != "total"])
    names = [f"{Path(p).stem}" if len(runs_of(p)) == 1 else f"{Path(p).stem} #{i + 1}"
             for p in paths for i in range(len(runs_of(p)))]
    return figures_table(runs, names)


def regenerate(doc: Path) -> tuple[str, list[str]]:
    """The document with every marked table regenerated, and the sources whose table changed."""
    text, changed = Path(doc).read_text(), []

    def fresh(match):
        sources = [ROOT / s for s in match["sources"].split()]
        new = table(sources) + "\n"
        if new != match["table"]:
            changed.append(match["sources"])
        return match.group(1) + new + match.group(4)

    return BLOCK.sub(fresh, text), changed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python scripts/bench_table.py", description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", type=Path, help="saved JSON outputs of one bench command")
    parser.add_argument("--write", type=Path, metavar="DOC", help="regenerate the marked tables of DOC in place")
    parser.add_argument("--check", type=Path, metavar="DOC", help="exit 1 if a marked table of DOC has drifted")
    args = parser.parse_args(argv)
    if args.write or args.check:
        doc = args.write or args.check
        text, changed = regenerate(doc)
        if args.write:
            doc.write_text(text)
        print(("regenerated: " if args.write else "drifted: ") + (", ".join(changed) or "none"))
        return 1 if args.check and changed else 0
    print(table(args.files))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
