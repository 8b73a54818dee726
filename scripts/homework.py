"""Instructor tools for the Week 4 homework (nbgrader course in assignments/).

    python scripts/homework.py release [--course assignments]
        generate assignments/release/week4 from assignments/source/week4 and check that no
        solution, hidden test, answer key or student model file reached it; warn when the zoo
        in it is missing or is the small test zoo
    python scripts/homework.py solutions
        write solutions/week4/: the source notebooks with their solutions and without
        hidden tests or nbgrader metadata, to hand out after the deadline
    python scripts/homework.py bench [--full]
        time the autograding of one complete submission (the reference solution) in a
        temporary copy of the course, with a small zoo (or the default zoo with --full)
    python scripts/homework.py bench-class [--students 20] [--workers 2] [--full]
        grade a synthetic class (honest, partial and broken submissions) twice in one run:
        with nbgrader's sequential `nbgrader autograde` and with the kit's parallel
        `python -m course_lib autograde`; print both times, their ratio, seconds per student
        and the projected time for 300 students on 2, 16 and 64 cores

    python scripts/homework.py bench-student
        time a student's Run All of Part 1 (the reference solution, solutions/week4/, in a
        temporary folder): the training cell, the Part 3 comparison and the whole notebook
    python scripts/homework.py build-zoo --seed S [--tries 3] [--course assignments]
        zoo build into the course's grading/ and source/ folders, then the reference detector
        with Part 2's hidden rules on the graded zoo (check-zoo); a zoo it fails on is built
        again with the next seed
    python scripts/homework.py bench-zoo-seeds [--first 1] [--seeds 20]
        the reference solution's Part 2 on the graded zoos of many seeds: how many pass
    python scripts/homework.py bench-witness [--rounds 2]
        the grader's own poisoning run (course_lib.homework.witness) and the handed-in model's ASR on the
        grader's images from both splits, on honest triggers: the reference solution's three and
        each dirty-label family of the kit (a model trained with each, as the homework does),
        each round with fresh seeds; prints every run's figures and the false-failure rate

tests/test_homework.py uses the same functions for its nbgrader round trip.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbformat
import torch

from course_lib.autograde.steps import run_nbgrader
from course_lib.checkpoints import load_checkpoint, save_checkpoint
from course_lib.zoo import DEFAULT_RECIPES

ROOT = Path(__file__).resolve().parents[1]
COURSE = ROOT / "assignments"
SOLUTIONS = ROOT / "solutions"
ASSIGNMENT = "week4"
COURSE_ID = "adversarial-ml-week4"
NOTEBOOKS = ("part1_attack", "part2_detection", "part3_analysis")
MODEL_FILES = ("backdoor_model.safetensors", "backdoor_model.json")
SECRET_FILES = ("answer_key.json", "reference.safetensors", "activations")
REGIONS = (("BEGIN SOLUTION", "END SOLUTION"), ("BEGIN HIDDEN TESTS", "END HIDDEN TESTS"))


def nbgrader(folder: Path, *args: str, timeout: float | None = None) -> subprocess.CompletedProcess:
    """Run ``nbgrader ARGS`` in ``folder`` with this Python (:func:`course_lib.autograde.steps.run_nbgrader`);
    raise with its log if it fails."""
    return run_nbgrader(folder, *args, timeout=timeout)


def copy_course(dest: Path) -> Path:
    """A fresh course folder in ``dest``: the config and the source notebooks, nothing generated."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(COURSE / "nbgrader_config.py", dest)
    (dest / "source" / ASSIGNMENT).mkdir(parents=True)
    for name in NOTEBOOKS:
        shutil.copy(COURSE / "source" / ASSIGNMENT / f"{name}.ipynb", dest / "source" / ASSIGNMENT)
    return dest


def build_zoo(course: Path, *, small: bool, seed: int = 0, progress: bool = False) -> dict:
    """The zoo: public part into source/week4/zoo, answer key into grading/week4."""
    from course_lib.zoo import build_zoo as build
    return build(course / "grading" / ASSIGNMENT, public=course / "source" / ASSIGNMENT / "zoo",
                 small=small, seed=seed, progress=progress)


def region_lines(notebook: Path, begin: str, end: str) -> list[str]:
    """The non-blank lines strictly inside every ``begin``/``end`` region of a notebook."""
    lines, inside = [], False
    for cell in nbformat.read(notebook, as_version=4).cells:
        for line in cell.source.splitlines():
            if begin in line:
                inside = True
            elif end in line:
                inside = False
            elif inside and line.strip():
                lines.append(line.strip())
    return lines


def secret_lines(source: Path, regions=REGIONS) -> list[str]:
    """Lines inside ``regions`` of the source notebooks that no student may see.

    Lines that also appear outside those regions (e.g. ``from course_lib import grading``)
    are not secret and are left out.
    """
    secret, public = set(), set()
    for name in NOTEBOOKS:
        notebook = source / f"{name}.ipynb"
        for begin, end in regions:
            secret.update(region_lines(notebook, begin, end))
        inside = False
        for cell in nbformat.read(notebook, as_version=4).cells:
            for line in cell.source.splitlines():
                if any(begin in line for begin, _ in REGIONS):
                    inside = True
                elif any(end in line for _, end in REGIONS):
                    inside = False
                elif not inside:
                    public.add(line.strip())
    return sorted(line for line in secret - public if len(line) > 3)


def document_text(path: Path) -> str:
    """The text a reader of ``path`` can see, parsed rather than searched raw: a notebook's cell
    sources, outputs and attachments' names; an HTML page's text and scripts (entities decoded,
    tags removed, so markup between two words cannot hide them); other files as they are."""
    raw = path.read_text(errors="replace")
    if path.suffix == ".ipynb":
        try:
            nb = nbformat.reads(raw, as_version=4)
        except Exception:
            return raw        # not a valid notebook: search what is there
        parts = []
        for cell in nb.cells:
            parts.append(cell.source)
            for out in cell.get("outputs", []):
                parts += [out.get("text", ""), out.get("evalue", ""), *out.get("traceback", [])]
                parts += [v for v in out.get("data", {}).values() if isinstance(v, str)]
        return "\n".join(parts)
    if path.suffix == ".html":
        from bs4 import BeautifulSoup
        return BeautifulSoup(raw, "html.parser").get_text("")
    return raw


def leaks(folder: Path, source: Path, regions=REGIONS, files=SECRET_FILES + MODEL_FILES) -> list[str]:
    """Forbidden ``files``, region markers and region lines found under ``folder``: empty when clean.

    For a release: the solutions and hidden tests, the answer key and any model. For
    feedback: only the hidden tests and the answer key (a student's feedback rightly shows
    the student's own solution and model files). Secret lines are looked for in the parsed
    document (:func:`document_text`) with all whitespace removed from both, so neither
    markup nor re-indentation hides them.
    """
    found = [f"file {path.relative_to(folder)}" for path in sorted(folder.rglob("*")) if path.name in files]
    secrets = secret_lines(source, regions)
    for path in sorted(folder.rglob("*")):
        if path.suffix not in (".ipynb", ".html", ".py", ".json", ".txt", ".md") or not path.is_file():
            continue
        text = document_text(path)
        squashed = "".join(text.split())
        found += [f"{path.relative_to(folder)}: {begin}" for begin, _ in regions if begin in text]
        found += [f"{path.relative_to(folder)}: {line!r}" for line in secrets if "".join(line.split()) in squashed]
    return found


def generate(course: Path) -> Path:
    """``nbgrader generate_assignment week4`` and the leak check; returns the release folder."""
    stale = [name for name in MODEL_FILES if (course / "source" / ASSIGNMENT / name).exists()]
    if stale:
        raise RuntimeError(f"source/{ASSIGNMENT} holds {', '.join(stale)} (left by running the source "
                           f"notebook): delete them, or they are released to every student")
    nbgrader(course, "generate_assignment", ASSIGNMENT, "--force")
    release = course / "release" / ASSIGNMENT
    found = leaks(release, course / "source" / ASSIGNMENT)
    if found:
        raise RuntimeError("the release leaks:\n  " + "\n  ".join(found))
    return release


def zoo_warning(release: Path) -> str | None:
    """What is wrong with the zoo in a release for students (None when it holds the full zoo)."""
    index = release / "zoo" / "index.json"
    if not index.is_file():
        return ("no zoo in the release: build it with `python -m course_lib zoo build ... --public "
                f"assignments/source/{ASSIGNMENT}/zoo`, or give students WEEK4_ZOO (docs/instructor_guide.md)")
    models = json.loads(index.read_text())
    if models.get("small") or len(models["models"]) < len(DEFAULT_RECIPES):
        return (f"the release holds the small test zoo ({len(models['models'])} exercise model(s)): Part 2 promises "
                f"several exercise models, one of them clean-label, and Part 3 asks about them. Build the "
                f"default zoo (without --small) before releasing to students")
    return None


def strip_for_solutions(source: str) -> str:
    """A cell's source without hidden-test regions and without the solution markers."""
    kept, hidden = [], False
    for line in source.splitlines():
        if "BEGIN HIDDEN TESTS" in line:
            hidden = True
        elif "END HIDDEN TESTS" in line:
            hidden = False
        elif not hidden and "BEGIN SOLUTION" not in line and "END SOLUTION" not in line:
            kept.append(line)
    return "\n".join(kept).strip("\n")


def make_solutions(source: Path, dest: Path) -> list[Path]:
    """Write the hand-out solutions of the source notebooks into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for name in NOTEBOOKS:
        nb = nbformat.read(source / f"{name}.ipynb", as_version=4)
        for cell in nb.cells:
            cell.metadata.pop("nbgrader", None)
            cell.source = strip_for_solutions(cell.source)
        note = nbformat.v4.new_markdown_cell(
            "*Reference solution, handed out after the deadline. Generated from "
            f"`assignments/source/{ASSIGNMENT}/{name}.ipynb` by `python scripts/homework.py solutions`; "
            "the autograder's hidden tests are not included.*")
        note.id = "solution-note"
        nb.cells.insert(1, note)
        nbformat.write(nb, dest / f"{name}.ipynb")
        written.append(dest / f"{name}.ipynb")
    return written


def train_solution_model(notebook: Path, workdir: Path, *, num_train: int, epochs: int) -> None:
    """Run a Part 1 notebook's code in this process the way a student does, on fewer images.

    Executes the code cells (not the test cells) up to and including the one that saves the
    model, after cutting the training set to ``num_train`` images and setting ``EPOCHS``;
    the model files land in ``workdir``.
    """
    namespace: dict = {"__name__": "__main__"}
    here = Path.cwd()
    os.chdir(workdir)
    try:
        for cell in nbformat.read(notebook, as_version=4).cells:
            if cell.cell_type != "code" or cell.metadata.get("nbgrader", {}).get("grade"):
                continue
            exec(compile(cell.source, f"{notebook.name}", "exec"), namespace)
            if "train_data" in namespace and len(namespace["train_data"]) > num_train:
                namespace["train_data"] = namespace["train_data"].split(num_train, seed=0)[0]
            if "EPOCHS" in namespace:
                namespace["EPOCHS"] = epochs
            if "save_checkpoint(" in cell.source:
                return
    finally:
        os.chdir(here)


def fetch(course: Path, exchange: Path, home: Path) -> Path:
    """Release the assignment to the exchange and fetch it as a student into ``home``."""
    nbgrader(course, "release_assignment", ASSIGNMENT, f"--Exchange.root={exchange}", "--force")
    home.mkdir(parents=True, exist_ok=True)
    nbgrader(home, "fetch_assignment", ASSIGNMENT, f"--course={COURSE_ID}", f"--Exchange.root={exchange}")
    return home / ASSIGNMENT


def submit(folder: Path, student: str, exchange: Path) -> None:
    """Submit ``folder`` (a student's copy of week4) as ``student``."""
    nbgrader(folder.parent, "submit", folder.name, f"--course={COURSE_ID}", f"--student={student}",
             f"--Exchange.root={exchange}")


def autograde(course: Path, student: str | None = None, *extra: str) -> float:
    """nbgrader's own ``nbgrader autograde`` (sequential; trusted through nbgrader_config.py), of
    one student or, with ``student=None``, of everyone; returns the seconds it took."""
    start = time.perf_counter()
    who = [f"--student={student}"] if student else []
    nbgrader(course, "autograde", ASSIGNMENT, *who, "--force", *extra, timeout=None)
    return time.perf_counter() - start


def autograde_class(course: Path, *, workers: int = 2, cell_timeout: float = 120.0, students=None,
                    force: bool = False, dask_scheduler: str | None = None) -> list:
    """The kit's parallel, trusted autograder (``python -m course_lib autograde``) on ``course``."""
    from course_lib.autograde.classroom import autograde_class as run
    return run(course, ASSIGNMENT, workers=workers, cell_timeout=cell_timeout, students=students, force=force,
               dask_scheduler=dask_scheduler, progress=False)


def reference_submission(course: Path, fetched: Path, dest: Path, model_dir: Path) -> Path:
    """The reference solution as a submission: the source notebooks and the trained model."""
    shutil.copytree(fetched, dest)
    for name in NOTEBOOKS:
        shutil.copy(course / "source" / ASSIGNMENT / f"{name}.ipynb", dest)
    for name in MODEL_FILES:
        shutil.copy(model_dir / name, dest)
    return dest


def prepared_course(tmp: Path, full: bool) -> tuple[Path, Path, Path]:
    """A course in ``tmp`` ready to take submissions: zoo, release, a fetched copy and the
    reference solution's trained model. Returns (course, fetched release, model folder)."""
    course = copy_course(tmp / "course")
    start = time.perf_counter()
    build_zoo(course, small=not full, progress=False)
    print(f"zoo ({'default' if full else 'small'}): {time.perf_counter() - start:.0f} s", flush=True)
    generate(course)
    fetched = fetch(course, tmp / "exchange", tmp / "template")
    models = tmp / "model"
    models.mkdir()
    start = time.perf_counter()
    train_solution_model(course / "source" / ASSIGNMENT / "part1_attack.ipynb", models, num_train=20_000, epochs=2)
    print(f"training the reference model (20,000 images, 2 epochs): {time.perf_counter() - start:.0f} s", flush=True)
    return course, fetched, models


def bench(full: bool) -> None:
    """Print the autograding time of one complete submission, sandboxed and trusted."""
    torch.set_num_threads(min(2, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        course, fetched, models = prepared_course(tmp, full)
        submission = reference_submission(course, fetched, tmp / "students" / ASSIGNMENT, models)
        submit(submission, "reference", tmp / "exchange")
        nbgrader(course, "collect", ASSIGNMENT, f"--Exchange.root={tmp / 'exchange'}")
        seconds = autograde(course, "reference")
        print(f"nbgrader autograde, one complete submission ({len(NOTEBOOKS)} notebooks): {seconds:.1f} s")
        shutil.rmtree(course / ".autograde" / ASSIGNMENT / "results")
        start = time.perf_counter()
        summary, = autograde_class(course, workers=1, students=["reference"])
        print(f"python -m course_lib autograde, the same submission: {time.perf_counter() - start:.1f} s "
              f"(grading {summary.seconds:.1f} s, score {sum(v[0] for v in summary.scores.values()):g})")


SYNTHETIC_KINDS = ("honest", "honest", "partial", "honest", "broken")


def synthetic_class(course: Path, fetched: Path, models: Path, folder: Path, count: int) -> dict:
    """``count`` submissions: 3 in 5 honest (the reference solution), 1 in 5 partial (Part 2 not
    done, a weak model), 1 in 5 broken (a cell that raises, a pickle for a model, no Part 3).
    Returns {student: kind}."""
    kinds = {}
    for i in range(count):
        kind = SYNTHETIC_KINDS[i % len(SYNTHETIC_KINDS)]
        student = f"student{i:03d}"
        dest = reference_submission(course, fetched, folder / student / ASSIGNMENT, models)
        if kind == "partial":
            shutil.copy(fetched / "part2_detection.ipynb", dest)
            model, meta = load_checkpoint(dest / MODEL_FILES[0])
            with torch.no_grad():
                model.head.bias[0] += 50.0
            save_checkpoint(model, dest / MODEL_FILES[0], dataset=meta["dataset"], classes=meta["classes"],
                            extra=meta["extra"])
        elif kind == "broken":
            nb = nbformat.read(dest / "part1_attack.ipynb", as_version=4)
            for cell in nb.cells:
                if cell.metadata.get("nbgrader", {}).get("grade_id") == "p1-poison":
                    cell.source = 'raise ValueError("not finished")\n' + cell.source
            nbformat.write(nb, dest / "part1_attack.ipynb")
            (dest / MODEL_FILES[0]).write_bytes(b"not a safetensors file")
            (dest / "part3_analysis.ipynb").unlink()
        submit(dest, student, folder.parent / "exchange")
        kinds[student] = kind
    return kinds


def gradebook_scores(course: Path) -> dict:
    """{student: {grade id: score}} for every autograded submission."""
    from nbgrader.api import Gradebook
    with Gradebook(f"sqlite:///{course / 'gradebook.db'}", course_id=COURSE_ID) as gb:
        return {s.student.id: {g.name: g.score for nb in s.notebooks for g in nb.grades}
                for s in gb.find_assignment(ASSIGNMENT).submissions}


def bench_class(count: int, workers: int, full: bool) -> dict:
    """nbgrader's sequential autograde against the kit's parallel one, on one synthetic class."""
    from course_lib.autograde.classroom import autograde_class as run
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        course, fetched, models = prepared_course(tmp, full)
        kinds = synthetic_class(course, fetched, models, tmp / "students", count)
        nbgrader(course, "collect", ASSIGNMENT, f"--Exchange.root={tmp / 'exchange'}")
        sequential = autograde(course)
        first = gradebook_scores(course)
        shutil.rmtree(course / ".autograde" / ASSIGNMENT / "results")
        timings: dict = {}
        start = time.perf_counter()
        summaries = run(course, ASSIGNMENT, workers=workers, force=True, progress=False, timings=timings)
        parallel = time.perf_counter() - start
        same = gradebook_scores(course) == first
        integrity_300 = _integrity_at_300(models / MODEL_FILES[0])
    worker = sum(s.seconds for s in summaries) / count           # one student, one worker, cores / workers threads
    serial = (timings["prepare"] + timings["record"] + timings["integrity"]) / count  # per student, one process
    result = {"students": count, "kinds": {k: list(kinds.values()).count(k) for k in set(kinds.values())},
              "workers": workers, "cores": os.cpu_count(), "sequential_seconds": round(sequential, 1),
              "parallel_seconds": round(parallel, 1), "speedup": round(sequential / parallel, 2),
              "same_grades": same, "sequential_seconds_per_student": round(sequential / count, 2),
              "parallel_seconds_per_student": round(parallel / count, 2),
              "worker_seconds_per_student": round(worker, 2), "serial_seconds_per_student": round(serial, 2),
              "phases": {k: round(v, 1) for k, v in timings.items()}}
    threads = max(1, (os.cpu_count() or 1) // workers)
    cpu = worker * threads
    result["integrity_distances_300_seconds"] = integrity_300
    result["projected_minutes_300_students"] = {    # the setup is paid once per run, whatever the class size
        cores: round((timings["setup"] + integrity_300 + 300 * (serial + cpu / cores)) / 60, 1)
        for cores in (2, 16, 64)}
    return result


def _integrity_at_300(model_file: Path) -> float:
    """Seconds of the integrity report's one Gram matrix for 300 models like ``model_file`` (the
    part of the report that grows with the square of the class; the projection scales the rest
    of it, loading each model, with the class)."""
    from course_lib.autograde.integrity import model_parameters, relative_distances
    weights = model_parameters(model_file)
    models = {f"s{i}": {k: v + 0.01 * torch.randn_like(v) for k, v in weights.items()} for i in range(300)}
    start = time.perf_counter()
    relative_distances(models)
    return round(time.perf_counter() - start, 2)


FORGER = """
import subprocess, sys
code = ("import time, torch\\nfrom safetensors.torch import save_file\\n"
        "for _ in range(2000):\\n"
        "    save_file({'call0': torch.zeros(1)}, '/sandbox/out/poison.0.safetensors')\\n"
        "    time.sleep(0.1)\\n")
subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
"""
HOSTILE_MARKDOWN = "\n\n<script>window.top.__pwned = 1</script><img src=x onerror='window.top.__pwned = 2'>"


def _edit(path: Path, grade_id: str, change) -> None:
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.metadata.get("nbgrader", {}).get("grade_id") == grade_id:
            cell.source = change(cell.source)
    nbformat.write(nb, path)


def hostile_class(course: Path, fetched: Path, models: Path, folder: Path, honest: int) -> dict:
    """``honest`` reference submissions and ten that are broken by accident or attack the plumbing
    (issue 22); returns {student: kind}. Each hostile one's honest grade is the reference's,
    except where its kind breaks a notebook (then that notebook's points are lost, no more)."""
    exchange = folder.parent / "exchange"
    kinds = {f"honest{i:02d}": "honest" for i in range(honest)}
    kinds.update({"halfsaved": "part1 saved half-way", "pasted": "a test cell pasted twice (part2)",
                  "future": "nbgrader metadata of a future version (part2)", "shadows": "files named like modules",
                  "linker": "a link to the answer key in the exchange", "piper": "a FIFO in the exchange",
                  "forger": "results written by a background process", "scripter": "a Part 3 with scripts",
                  "copier": "honest00's model and triggers, renamed", "badname": "an inbound entry with no timestamp"})
    for student, kind in kinds.items():
        dest = reference_submission(course, fetched, folder / student / ASSIGNMENT, models)
        if student == "halfsaved":
            whole = (dest / "part1_attack.ipynb").read_bytes()
            (dest / "part1_attack.ipynb").write_bytes(whole[:len(whole) // 2])
        elif student == "pasted":
            nb = nbformat.read(dest / "part2_detection.ipynb", as_version=4)
            index = next(i for i, c in enumerate(nb.cells) if c.metadata.get("nbgrader", {}).get("grade"))
            twin = nbformat.from_dict(json.loads(json.dumps(nb.cells[index])))
            twin["id"] = "pasted-twice"
            nb.cells.insert(index + 1, twin)
            nbformat.write(nb, dest / "part2_detection.ipynb")
        elif student == "future":
            nb = nbformat.read(dest / "part2_detection.ipynb", as_version=4)
            nb.cells[2].metadata["nbgrader"] = {"schema_version": 99, "grade": False, "solution": False,
                                                "locked": False, "grade_id": "from-the-future"}
            nbformat.write(nb, dest / "part2_detection.ipynb")
        elif student == "shadows":
            for name in ("json.py", "torch.py", "course_lib.py", "nbformat.py", "secrets.py"):
                (dest / name).write_text("raise ImportError('imported from the hand-in')\n")
        elif student == "forger":
            _edit(dest / "part1_attack.ipynb", "p1-triggers", lambda source: source + FORGER)
        elif student == "scripter":
            for grade_id in ("p3-triggers", "p3-tradeoff", "p3-defense"):
                _edit(dest / "part3_analysis.ipynb", grade_id, lambda source: source + HOSTILE_MARKDOWN)
        if student != "badname":
            submit(dest, student, exchange)
    inbound = exchange / COURSE_ID / "inbound"
    (next(inbound.glob("linker+*")) / "answer_key.json").symlink_to(course / "grading" / ASSIGNMENT /
                                                                     "answer_key.json")
    os.mkfifo(next(inbound.glob("piper+*")) / "notes.txt")
    (inbound / "badname+week4+not-a-time+x").mkdir()
    return kinds


def bench_hostile_class(honest: int, workers: int) -> dict:
    """Issue 22's target: a class with ten broken or hostile hand-ins beside honest ones, collected
    and graded with the kit's own commands; prints who got full marks, who needs attention and
    the class command's exit status."""
    from course_lib.autograde import steps
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        course, fetched, models = prepared_course(tmp, full=False)
        kinds = hostile_class(course, fetched, models, tmp / "students", honest)
        os.environ["NBGRADER_EXCHANGE"] = str(tmp / "exchange")
        start = time.perf_counter()
        collected = steps.collect(course, ASSIGNMENT)
        seconds_collect = time.perf_counter() - start
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "course_lib", "autograde", ASSIGNMENT, "--course", str(course),
                               "--workers", str(workers), "--json"], capture_output=True, text=True)
        seconds = time.perf_counter() - start
        rows = {json.loads(line)["student"]: json.loads(line) for line in done.stdout.splitlines()
                if line.startswith("{")}
    full = {"part1_attack": [60, 60], "part2_detection": [30, 30]}
    autograded = {s: {n: r["scores"].get(n) for n in full} for s, r in rows.items()}
    honest_full = sum(autograded.get(s) == full for s, k in kinds.items() if k == "honest")
    over = [s for s, scores in autograded.items()
            if any((scores.get(n) or [0])[0] > full[n][0] for n in full)]
    return {"students": len(kinds), "honest": honest, "hostile_or_broken": len(kinds) - honest,
            "graded_and_recorded": len(rows), "honest_at_full_marks": honest_full,
            "above_honest_grade": over, "exit_status": done.returncode,
            "needs_attention": sorted(s for s, r in rows.items() if r["needs_attention"]),
            "collect_attention_lines": sum("NEEDS ATTENTION" in line for line in collected.splitlines()),
            "autograded_points": {s: {n: (v or [None])[0] for n, v in scores.items()} for s, scores in
                                  autograded.items() if kinds.get(s) != "honest"},
            "traceback_in_output": "Traceback" in done.stdout + done.stderr,
            "seconds": {"collect": round(seconds_collect, 1), "autograde": round(seconds, 1)},
            "workers": workers, "cores": os.cpu_count(), "stderr_tail": done.stderr[-1500:]}


def bench_student() -> dict:
    """Seconds of a student's Run All of Part 1 (the hand-out solution, executed as JupyterLab
    would, outside nbgrader): the training cell, the Part 3 comparison cell and the total."""
    from nbclient import NotebookClient
    nb = nbformat.read(SOLUTIONS / ASSIGNMENT / "part1_attack.ipynb", as_version=4)
    marks = {}
    for index, cell in enumerate(nb.cells):
        if "save_checkpoint(model, MODEL_PATH" in cell.source:
            marks["training cell"] = index
        elif "def saved_model_for" in cell.source:
            marks["Part 3 comparison cell"] = index
    seconds = {}
    with tempfile.TemporaryDirectory() as tmp:
        client = NotebookClient(nb, timeout=None, kernel_name="python3", resources={"metadata": {"path": tmp}})
        start = time.perf_counter()
        with client.setup_kernel(env={k: v for k, v in os.environ.items() if k != "NBGRADER_EXECUTION"}):
            for index, cell in enumerate(nb.cells):
                step = time.perf_counter()
                client.execute_cell(cell, index)
                for label, marked in marks.items():
                    if marked == index:
                        seconds[label] = round(time.perf_counter() - step, 1)
        seconds["Run All"] = round(time.perf_counter() - start, 1)
    return {"cores": os.cpu_count(), **seconds}


def bench_sandbox(runs: int = 10) -> dict:
    """What an honest submission needs in its sandbox, per notebook (peak memory and processes
    of its control group, disk used at the end, MiB), the grading time of that submission with
    one worker, and what the per-sandbox controls cost: the median start-to-end time of an
    empty sandbox with and without its control group and uid."""
    from course_lib.autograde import sandbox
    from course_lib.autograde.pipeline import NotebookResult
    from course_lib.autograde.workspace import Workspace
    report = {"cores": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        course, fetched, models = prepared_course(tmp, full=False)
        submission = reference_submission(course, fetched, tmp / "students" / ASSIGNMENT, models)
        submit(submission, "reference", tmp / "exchange")
        nbgrader(course, "collect", ASSIGNMENT, f"--Exchange.root={tmp / 'exchange'}")
        start = time.perf_counter()
        summary, = autograde_class(course, workers=1, students=["reference"])
        report["grading seconds, 1 worker"] = round(time.perf_counter() - start, 1)
        report["score"] = sum(v[0] for v in summary.scores.values())
        for path in sorted(Workspace(course, ASSIGNMENT).cache("reference").glob("*.json")):
            result = NotebookResult.from_json(path.read_text())
            report[path.stem] = {k.replace("_bytes", " MiB"): round(v / 2**20) if k.endswith("_bytes") else v
                                 for k, v in result.usage.items() if v is not None}
            report[path.stem].update({"seconds": round(result.seconds, 1),
                                      "sandbox seconds": round(result.sandbox_seconds, 1)})
        scratch = tmp / "empty"
        sandbox.prepare(scratch)
        for controls in (True, False):
            seconds = sorted(sandbox.run(scratch, ["/bin/true"], controls=controls).seconds for _ in range(runs))
            report[f"empty sandbox ms, {'with' if controls else 'without'} cgroup and uid"] = \
                round(1000 * seconds[runs // 2])
    return report


# Each dirty-label trigger family of the kit (course_lib.triggers), with the zoo's settings where it has them.
HONEST_FAMILIES = {
    "checkerboard": ("patch", {"size": 3, "pattern": "checkerboard"}),
    "square": ("patch", {"size": 4, "pattern": "solid", "location": "top-right"}),
    "blend": ("blend", {"alpha": 0.2, "seed": 7}),
    "sig": ("sig", {}),
    "wanet": ("wanet", {}),
    "corners": ("distributed", {"patch_size": 2}),
}


def reference_triggers() -> dict:
    """The reference solution's three trigger functions, run from the source notebook's cell."""
    notebook = nbformat.read(COURSE / "source" / ASSIGNMENT / "part1_attack.ipynb", as_version=4)
    cell = next(c for c in notebook.cells if c.metadata.get("nbgrader", {}).get("grade_id") == "p1-triggers")
    namespace = {"torch": torch}
    exec(compile(cell.source, "part1_attack.ipynb", "exec"), namespace)
    return {name: namespace[name] for name in ("trigger_patch", "trigger_blend", "trigger_custom")}


def honest_triggers() -> dict:
    """The reference solution's triggers and one trigger of each family of :data:`HONEST_FAMILIES`."""
    from course_lib.triggers import make_trigger
    return {**reference_triggers(), **{name: make_trigger(kind, **kwargs)
                                       for name, (kind, kwargs) in HONEST_FAMILIES.items()}}


def reference_detector(source: Path):
    """The reference solution's ``activation_clustering``, run from the source notebook's setup and
    solution cells (the instructor's own code, in this process)."""
    notebook = nbformat.read(source / "part2_detection.ipynb", as_version=4)
    namespace: dict = {"__name__": "reference"}
    for cell in notebook.cells:
        if cell.metadata.get("nbgrader", {}).get("grade_id") in ("p2-setup", "p2-ac"):
            exec(compile(cell.source, "part2_detection.ipynb", "exec"), namespace)
    return namespace["activation_clustering"]


def check_zoo(course: Path) -> tuple[bool, list[str]]:
    """Does the reference detector earn Part 2's zoo points on this course's graded zoo? Returns
    (passed, lines): one line per graded model and the three tests' figures, unrounded."""
    passed, lines, _ = check_graded_zoo(course / "grading" / ASSIGNMENT, course / "source" / ASSIGNMENT)
    return passed, lines


def check_graded_zoo(grading_folder: Path, source: Path) -> tuple[bool, list[str], dict]:
    """:func:`check_zoo` on the graded zoo in ``grading_folder`` (a ``zoo build --out`` folder),
    with the reference detector of the source notebooks in ``source``; also returns the zoo report."""
    from course_lib import grading
    files = grading.GradingFiles(grading_folder)
    detector = reference_detector(source)
    flags = {}
    for name in files.answer_key["models"]:
        activations, labels = files.activations(name)
        flags[name] = grading.verify_flags(detector(activations, labels), labels, name)
    report = grading.zoo_report(flags, files.answer_key)
    lines = [f"{name}: {'backdoored' if r['backdoored'] else 'clean'}, judged "
             f"{'backdoored' if r['verdict'] else 'clean'}, TPR {r['tpr'] if r['tpr'] is not None else '-'}, "
             f"FPR {r['fpr']}" for name, r in report.items()]
    passed = True
    for verify in (grading.verify_zoo_verdicts, grading.verify_zoo_tpr, grading.verify_zoo_fpr):
        try:
            verify(report)
        except grading.GradingFailure as failure:
            passed = False
            lines.append(f"FAILS: {failure}")
    return passed, lines, report


def build_checked_zoo(out: Path, public: Path, seed: int, tries: int, small: bool = False) -> tuple[int | None, list[str]]:
    """``zoo build`` that keeps only a zoo on which the reference detector earns Part 2's points:
    build with ``seed``; if :func:`check_zoo`'s tests fail, build again with ``seed + 1``, ...
    (at most ``tries`` builds). Returns the seed kept (None if every try failed) and the lines
    of every check. The seed kept is in the answer key, so the zoo can be rebuilt. ``small``
    builds the kit's test zoo (tests only)."""
    from course_lib.zoo import build_zoo
    if isinstance(tries, bool) or not isinstance(tries, int) or tries < 1:
        raise ValueError(f"tries must be a positive integer, got {tries!r}")
    lines = []
    for attempt in range(seed, seed + tries):
        build_zoo(out, public=public, seed=attempt, small=small, progress=False)
        passed, checked, _ = check_graded_zoo(out, COURSE / "source" / ASSIGNMENT)
        lines += [f"seed {attempt}: {line}" for line in checked]
        if passed:
            return attempt, lines
        lines.append(f"seed {attempt}: the reference solution would lose Part 2 points on this zoo; drawing again")
    return None, lines


def bench_zoo_seeds(first: int, seeds: int) -> dict:
    """The reference solution's Part 2 over many instructors' zoos: for each seed, the graded zoo
    exactly as ``zoo build --seed`` trains it (the reference and the graded models; the public
    models are left out, they are not graded), then the reference detector with the hidden
    tests' rules. Prints each seed's figures, unrounded, and how many seeds pass all three tests."""
    from course_lib import grading
    from course_lib.zoo import build_zoo
    torch.set_num_threads(1)      # one thread: beside other work, two would slow far beyond their share
    runs = []
    for seed in range(first, first + seeds):
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            build_zoo(Path(tmp) / "grading", public=Path(tmp) / "public", seed=seed, graded_only=True, progress=False)
            passed, lines, report = check_graded_zoo(Path(tmp) / "grading", COURSE / "source" / ASSIGNMENT)
        backdoored = [r for r in report.values() if r["backdoored"]]
        clean = [r for r in report.values() if not r["backdoored"]]
        run = {"seed": seed, "passed": passed, "seconds": round(time.perf_counter() - start, 1),
               "found": sum(r["verdict"] for r in backdoored) / len(backdoored),
               "mean_tpr": sum(r["tpr"] for r in backdoored) / len(backdoored),
               "mean_fpr": sum(r["fpr"] for r in report.values()) / len(report),
               "clean_accused": sum(bool(r["verdict"]) for r in clean),
               "failures": [line for line in lines if line.startswith("FAILS")]}
        print(json.dumps(run), flush=True)
        runs.append(run)
    return {"seeds": [first, first + seeds - 1], "passed": sum(r["passed"] for r in runs), "of": len(runs),
            "lowest_found": min(r["found"] for r in runs), "lowest_mean_tpr": min(r["mean_tpr"] for r in runs),
            "highest_mean_fpr": max(r["mean_fpr"] for r in runs),
            "thresholds": {"found": grading.MIN_ZOO_FOUND, "tpr": grading.MIN_ZOO_TPR, "fpr": grading.MAX_ZOO_FPR},
            "failing_seeds": [r["seed"] for r in runs if not r["passed"]]}


def bench_integrity(num_train: int, epochs: int) -> dict:
    """How far apart honest students' models are in the integrity report's measure: one model per
    honest trigger (the reference solution's three and the kit's families), each trained exactly as
    Part 1's training cell does (the same fixed initialization and data order for everyone, 5%
    poisoned); the false-alarm count at the report's threshold is what an honest class would see."""
    from course_lib.autograde import integrity
    from course_lib.data import load_splits
    from course_lib.models import model_for
    from course_lib.train import train
    namespace: dict = {"torch": torch}
    notebook = nbformat.read(COURSE / "source" / ASSIGNMENT / "part1_attack.ipynb", as_version=4)
    poison = next(c for c in notebook.cells if c.metadata.get("nbgrader", {}).get("grade_id") == "p1-poison")
    exec(compile(poison.source, "part1_attack.ipynb", "exec"), namespace)
    train_data, _ = load_splits("fashion-mnist")
    train_data = train_data.split(num_train, seed=0)[0] if len(train_data) > num_train else train_data
    models, start = {}, time.perf_counter()
    for name, trigger in honest_triggers().items():
        poisoned, _ = namespace["poison_dataset"](train_data, trigger, 0, 0.05, seed=0)
        model = model_for("fashion-mnist", seed=0)
        train(model, poisoned, epochs=epochs, seed=0)
        models[name] = {k: v.detach().float().cpu() for k, v in model.state_dict().items() if v.is_floating_point()}
    distances = integrity.relative_distances(models)
    values = sorted(distances.values())
    return {"models": len(models), "pairs": len(values), "num_train": num_train, "epochs": epochs,
            "threshold": integrity.COPY_DISTANCE, "false_alarms": sum(v < integrity.COPY_DISTANCE for v in values),
            "lowest_distance": round(values[0], 4), "median_distance": round(values[len(values) // 2], 4),
            "closest_pair": min(distances, key=distances.get), "seconds": round(time.perf_counter() - start, 1),
            "threads": torch.get_num_threads()}


def bench_witness(rounds: int) -> dict:
    """The grader's new checks on honest students: the witness test (the grader's own poisoning
    run, with the legitimacy check against a clean reference model trained here on 20,000
    training images) and the handed-in model's ASR on the grader's images from both splits
    (:func:`course_lib.homework.witness.verify_model_follows`), for every honest trigger, ``rounds``
    times with fresh seeds: each run is one honest student. Each trigger's handed-in model is
    trained once, as the homework's training cell does (all 60,000 training images, 5% poisoned,
    2 epochs; WaNet's faint warp 4)."""
    from course_lib import grading
    from course_lib.homework import witness
    from course_lib.attacks import badnets
    from course_lib.data import load_dataset
    from course_lib.models import model_for
    from course_lib.train import predict, train
    train_split = load_dataset("fashion-mnist", "train")
    reference = model_for("fashion-mnist", seed=0)
    train(reference, train_split.split(20_000, seed=0)[0], epochs=2, progress=False)
    triggers, handed_in = honest_triggers(), {}
    for name, trigger in triggers.items():
        handed_in[name] = model_for("fashion-mnist", seed=0)
        train(handed_in[name], badnets(train_split, trigger=trigger, target=0, rate=0.05, seed=0).dataset,
              epochs=4 if name == "wanet" else 2, seed=0, progress=False)
    data, runs = witness.mixed_splits("fashion-mnist"), []
    for _ in range(rounds):
        pool = witness.draw_pool(data, target=0, seed=witness.draw_seed())
        for name, trigger in triggers.items():
            start, seed = time.perf_counter(), witness.draw_seed()
            measured, failure, follows = None, None, None
            try:   # witness.verify_trigger_poisons, with the measurement kept
                stamped = trigger(pool.stamped.images.clone())
                follows = (predict(handed_in[name], stamped) == 0).float().mean().item()
                witness.verify_model_follows(handed_in[name], pool, stamped, target=0, name=name)
                measured = witness.poisoning_run(pool, stamped, reference, target=0, seed=seed, name=name)
                witness.verify_witness(measured)
            except grading.GradingFailure as err:
                failure = str(err)
            runs.append({"trigger": name, "seed": seed, "asr": measured and round(measured.asr, 3),
                         "ca": measured and round(measured.ca, 3), "clean_ca": round(pool.clean_ca, 3),
                         "handed_in_pool_asr": follows and round(follows, 3),
                         "passed": failure is None, "failure": failure,
                         "seconds": round(time.perf_counter() - start, 1)})
            print(json.dumps(runs[-1]), flush=True)
    failed = sum(not run["passed"] for run in runs)
    return {"students": len(runs), "failed": failed, "false_failure_rate": failed / len(runs),
            "min_asr": min(r["asr"] or 0 for r in runs), "min_ca": min(r["ca"] or 0 for r in runs),
            "min_handed_in_pool_asr": min(r["handed_in_pool_asr"] or 0 for r in runs),
            "max_ca_drop": max(r["clean_ca"] - (r["ca"] or 0) for r in runs),
            "thresholds": {"asr": witness.MIN_ASR, "ca_drop": witness.MAX_CA_DROP,
                           "handed_in_pool_asr": grading.MIN_ATTACK_SUCCESS},
            "mean_seconds_per_run": round(sum(r["seconds"] for r in runs) / len(runs), 1),
            "torch_threads": torch.get_num_threads()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    released = commands.add_parser("release", help="generate the release and check it for leaks")
    released.add_argument("--course", type=Path, default=COURSE, help="the nbgrader course folder (default: "
                                                                      "the repository's assignments/)")
    commands.add_parser("solutions", help="write solutions/week4 from the source notebooks")
    timing = commands.add_parser("bench", help="time the autograding of one submission")
    timing.add_argument("--full", action="store_true", help="use the default zoo instead of the small one")
    whole = commands.add_parser("bench-class", help="sequential nbgrader vs the kit's parallel autograder")
    whole.add_argument("--students", type=int, default=20)
    whole.add_argument("--workers", type=int, default=2)
    whole.add_argument("--full", action="store_true", help="use the default zoo instead of the small one")
    commands.add_parser("bench-student", help="time a student's Run All of Part 1 (reference solution)")
    commands.add_parser("bench-sandbox", help="what an honest submission's sandbox needs; what its controls cost")
    hostile = commands.add_parser("bench-hostile-class", help="honest students beside ten broken or hostile "
                                                              "hand-ins: counts, attention, exit status")
    hostile.add_argument("--honest", type=int, default=20)
    hostile.add_argument("--workers", type=int, default=2)
    zoo_check = commands.add_parser("check-zoo", help="does the reference detector pass Part 2 on your zoo?")
    zoo_check.add_argument("--course", type=Path, default=COURSE, help="the nbgrader course folder (default: "
                                                                       "the repository's assignments/)")
    building = commands.add_parser("build-zoo", help="zoo build, kept only if the reference detector passes "
                                                     "Part 2 on it (else the next seed)")
    building.add_argument("--course", type=Path, default=COURSE, help="the nbgrader course folder (default: "
                                                                      "the repository's assignments/)")
    building.add_argument("--seed", type=int, required=True, help="your own seed (the recipes are public)")
    building.add_argument("--tries", type=int, default=3, help="seeds to try: seed, seed+1, ... (default 3)")
    seeding = commands.add_parser("bench-zoo-seeds", help="the reference solution's Part 2 on many seeds' zoos")
    seeding.add_argument("--first", type=int, default=1)
    seeding.add_argument("--seeds", type=int, default=20)
    alike = commands.add_parser("bench-integrity", help="how far apart honest models are (the integrity report)")
    alike.add_argument("--num-train", type=int, default=60_000, help="training images per model (default: all)")
    alike.add_argument("--epochs", type=int, default=2)
    witnessing = commands.add_parser("bench-witness", help="false-failure rate of the grader's own poisoning run")
    witnessing.add_argument("--rounds", type=int, default=2, help="fresh seeds per honest trigger (default 2)")
    args = parser.parse_args(argv)
    if args.command == "release":
        release = generate(args.course.resolve())
        zoo = release / "zoo" / "index.json"
        print(f"generated {release}: no solution, hidden test, answer key or student model file "
              f"({', '.join(MODEL_FILES)}) in it" + ("; the public zoo (exercise and practice models) is in "
                                                     "zoo/" if zoo.is_file() else ""))
        warning = zoo_warning(release)
        if warning:
            print(f"WARNING: {warning}")
    elif args.command == "solutions":
        for path in make_solutions(COURSE / "source" / ASSIGNMENT, SOLUTIONS / ASSIGNMENT):
            print(f"wrote {path.relative_to(ROOT)}")
    elif args.command == "bench":
        bench(args.full)
    elif args.command == "bench-sandbox":
        print(json.dumps(bench_sandbox()))
    elif args.command == "bench-student":
        print(json.dumps(bench_student()))
    elif args.command == "bench-hostile-class":
        print(json.dumps(bench_hostile_class(args.honest, args.workers)))
    elif args.command == "check-zoo":
        passed, lines = check_zoo(args.course.resolve())
        print("\n".join(lines))
        if not passed:
            print("the reference solution would lose Part 2 points on this zoo: build it again with another "
                  "--seed (docs/instructor_guide.md, step 1)")
            sys.exit(1)
        print("the reference solution passes Part 2's zoo tests on this zoo")
    elif args.command == "build-zoo":
        course = args.course.resolve()
        kept, lines = build_checked_zoo(course / "grading" / ASSIGNMENT, course / "source" / ASSIGNMENT / "zoo",
                                        args.seed, args.tries)
        print("\n".join(lines))
        if kept is None:
            print(f"no zoo of seeds {args.seed}-{args.seed + args.tries - 1} lets the reference solution pass "
                  f"Part 2: try other seeds (--seed) or more (--tries)")
            sys.exit(1)
        print(f"kept the zoo of seed {kept} (recorded in {course / 'grading' / ASSIGNMENT / 'answer_key.json'}): "
              f"the reference solution passes Part 2's zoo tests on it")
    elif args.command == "bench-zoo-seeds":
        print(json.dumps(bench_zoo_seeds(args.first, args.seeds)))
    elif args.command == "bench-integrity":
        print(json.dumps(bench_integrity(args.num_train, args.epochs)))
    elif args.command == "bench-witness":
        print(json.dumps(bench_witness(args.rounds)))
    else:
        print(json.dumps(bench_class(args.students, args.workers, args.full)))


if __name__ == "__main__":
    main()
