"""The class tournament through its real command, on a small class whose code really runs sandboxed.

Autograding is not repeated here: what it records (each student's cached verdicts, the
handed-in model's metadata) is written directly, which is all the tournament reads. The
students' notebooks are real and run in the grading sandbox: an honest student, an evasive
trigger with a detector that answers in the wrong shape, a detector that flags everything,
one that crashes, one that hangs, one that hunts the grader's files for the ground truth,
a trigger too faint to plant a backdoor in its arena, and students who do not enter.
"""
from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from course_lib.autograde import sandbox
from course_lib.tournament import matches, pseudonyms, scoring
from course_lib.tournament.bench import write_class

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")

# student: (trigger or None, Part 1's witness passed, detector or None, Part 2's planted test passed, variant)
CLASS = {
    "alice": ("patch", True, "honest", True, 23),
    "bob": ("faint", True, "wrong_shape", True, 5),
    "carol": ("patch", False, "always", True, 0),
    "dave": (None, False, "crash", True, 0),
    "erin": (None, False, "hang", True, 0),
    "frank": (None, False, "reader", True, 0),
    "grace": ("too_weak", True, "honest", False, 0),
    "heidi": (None, False, None, False, 0),
}


def make_course(root: Path) -> Path:
    """A course folder as autograding leaves it, for the class above (the bench's own writer)."""
    return write_class(root, CLASS)


@pytest.fixture(scope="module")
def tournament(tmp_path_factory):
    """The real command on the class, once for the module (its seconds are printed)."""
    ok, why = sandbox.available()
    assert ok, why
    root = make_course(tmp_path_factory.mktemp("course"))
    out = root / "page"
    command = [sys.executable, "-m", "course_lib", "tournament", "week4", "--course", str(root), "--out", str(out),
               "--workers", "2", "--call-timeout", "5", "--house", "checkerboard", "--names"]
    start = time.perf_counter()
    run = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    print(run.stdout, f"({time.perf_counter() - start:.0f} s)")
    return root, out, json.loads((out / "results.json").read_text()), command


def _cells(results: dict, detector: str) -> list[dict]:
    return [c for c in results["cells"] if c["detector"] == detector]


def test_entrants_arenas_and_cells(tournament):
    root, out, results, _ = tournament
    arenas = {a["name"]: a for a in results["arenas"]}
    assert set(arenas) == {"house:checkerboard", "alice", "bob"}       # --names: ids as they are
    for arena in arenas.values():
        assert arena["asr"] >= 0.8 and arena["ca"] >= 0.75, arena
    why = {(n["name"], n["side"]): n["reason"] for n in results["not_entered"]}
    assert "failed in the tournament's arena" in why[("grace", "attack")]
    assert "ASR" in why[("grace", "attack")]
    assert "poisoning run did not pass" in why[("carol", "attack")]
    assert "planted-example test did not pass" in why[("grace", "detector")]
    assert "no result for part1_attack" in why[("dave", "attack")]
    expected = {"house:activation_clustering", "house:spectral_signatures", "control:always_flag", "control:random",
                *(f"{s}" for s in ("alice", "bob", "carol", "dave", "erin", "frank"))}
    assert set(results["detectors"]) == expected
    assert len(results["cells"]) == len(arenas) * len(expected)
    for detector in ("carol", "control:always_flag"):       # flags everything: exactly 0
        for cell in _cells(results, detector):
            assert (cell["tpr"], cell["fpr"], cell["score"]) == (1.0, 1.0, 0.0), cell
    for cell in _cells(results, "control:random"):
        assert abs(cell["score"]) < 0.1, cell
    for detector, message in (("dave", "my detector is broken"), ("bob", "boolean array with one entry per sample")):
        for cell in _cells(results, detector):
            assert cell["score"] is None and message in cell["error"], cell
    # the hanging detector: stopped at the call limit twice, then not called again (its sandbox's cost is bounded)
    hung = [c["error"] for c in _cells(results, "erin")]
    assert all(c["score"] is None for c in _cells(results, "erin"))
    assert sum("did not finish" in e for e in hung) == 2, hung
    assert sum("ran past its time limit on 2 calls" in e for e in hung) == len(arenas) - 2, hung
    for cell in _cells(results, "frank"):                 # found no ground truth to read
        assert cell["error"] == "" and cell["score"] == 0.0 and cell["flagged"] == 0, cell
    for detector in ("alice", "house:activation_clustering"):   # unaffected by the broken ones
        cells = {c["arena"]: c for c in _cells(results, detector)}
        assert all(c["error"] == "" for c in cells.values())
        assert cells["house:checkerboard"]["score"] > 0.5, cells
    board = {r["detector"]: r for r in results["detector_board"]}
    assert board["dave"]["errors"] == len(arenas) and board["dave"]["mean_score"] == 0.0
    assert board["house:activation_clustering"]["rank_low"] <= board["house:activation_clustering"]["rank"]
    cache = root / ".autograde" / "week4" / "tournament"          # what frank's detector looked for, in vain
    assert len(list(cache.glob("arenas/*/arena.safetensors"))) >= len(arenas)
    with open(out / "cells.csv") as handle:
        assert len(list(csv.DictReader(handle))) == len(results["cells"])
    paragraphs = {p["name"]: p["text"] for p in results["paragraphs"]}
    assert "Your trigger evaded" in paragraphs["alice"] and "Your detector" in paragraphs["alice"]
    assert "did not enter" in paragraphs["heidi"]


def test_model_level_defenses_meet_every_arena(tournament):
    _, out, results, _ = tournament
    rows = {r["arena"]: r for r in results["model_defenses"]}
    arenas = {a["name"]: a for a in results["arenas"]}
    assert set(rows) == set(arenas)
    for name, row in rows.items():
        assert row["error"] == "", row
        assert row["nc_target_flagged"] in ("yes", "no") and all(0 <= label < 10 for label in row["nc_flagged"])
        # the false alarms are the flagged labels other than the target: all of them, and nothing else
        assert set(row["nc_false_alarms"]) <= set(row["nc_flagged"])
        assert len(row["nc_false_alarms"]) == len(row["nc_flagged"]) - (row["nc_target_flagged"] == "yes"), row
        assert 0 <= row["strip_far"] <= 1 and row["strip_frr"] <= 0.1, row
        assert row["fp_ca_after"] > 0.5, row         # the pruned and fine-tuned model still classifies
    # the house checkerboard's backdoor does not survive pruning and two epochs of clean fine-tuning
    assert rows["house:checkerboard"]["fp_asr_after"] < 0.5 < arenas["house:checkerboard"]["asr"], rows
    page = (out / "index.html").read_text()
    assert "Model-level defenses" in page and "60 optimization steps per label" in page
    assert "<th>NC false alarms</th>" in page


def test_no_grade_changes_and_a_rerun_is_served_from_the_cache(tournament):
    root, out, results, command = tournament
    recorded = {p: p.read_text() for p in (root / ".autograde" / "week4" / "results").rglob("*.json")}
    cache = root / ".autograde" / "week4" / "tournament"
    stamps = {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()}
    again = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert again.returncode == 0, again.stdout + again.stderr
    # nothing recomputed (no sandbox, no training): the cache holds the same files, none rewritten
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()} == stamps
    assert json.loads((out / "results.json").read_text())["cells"] == results["cells"]
    assert {p: p.read_text() for p in recorded} == recorded


def test_pseudonyms_are_stable_and_secret(tmp_path):
    secret = pseudonyms.course_secret(tmp_path / "grading")
    assert pseudonyms.course_secret(tmp_path / "grading") == secret
    assert (tmp_path / "grading" / pseudonyms.SECRET_FILE).stat().st_mode & 0o077 == 0
    name = pseudonyms.pseudonym(secret, "alice")
    assert name == pseudonyms.pseudonym(secret, "alice") != pseudonyms.pseudonym(b"x" * 32, "alice")
    assert "alice" not in name
    with pytest.raises(ValueError, match="student"):
        pseudonyms.pseudonym(secret, "")


def test_scores_and_rank_intervals():
    labels, truth = np.zeros(10, dtype=np.int64), np.arange(10) < 3
    assert scoring.score_flags(np.ones(10, dtype=bool), labels, truth)["score"] == 0.0
    assert scoring.score_flags(truth, labels, truth)["score"] == 1.0
    with pytest.raises(AssertionError, match="boolean array"):
        scoring.score_flags(np.ones(10), labels, truth)
    assert list(scoring.ranks(np.array([0.5, 0.9, 0.5]))) == [2, 1, 2]
    clear = scoring.detector_board(np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3]]), ["a", "b", "c"], ["x", "y"])
    assert [(r["detector"], r["rank"], r["rank_low"], r["rank_high"]) for r in clear] == [("x", 1, 1, 1),
                                                                                         ("y", 2, 2, 2)]
    close = scoring.detector_board(np.array([[0.9, 0.1], [0.1, 0.9], [0.6, 0.5]]), ["a", "b", "c"], ["x", "y"])
    assert [(r["detector"], r["rank"], r["rank_low"], r["rank_high"]) for r in close] == [("x", 1, 1, 2),
                                                                                         ("y", 2, 1, 2)]


def test_a_schedule_meets_every_arena_as_often_and_scores_only_the_cells_it_played():
    arenas, detectors = [f"a{i}" for i in range(30)], [f"d{i}" for i in range(30)]
    drawn = matches.schedule(arenas, detectors, 4, seed=7)
    assert drawn == matches.schedule(arenas, detectors, 4, seed=7) != matches.schedule(arenas, detectors, 4, seed=8)
    assert all(len(set(met)) == 4 for met in drawn.values())
    met = [a for chosen in drawn.values() for a in chosen]
    assert {met.count(a) for a in arenas} == {4}                 # 30 detectors x 4 arenas over 30 arenas
    assert matches.schedule(arenas, detectors, 40, seed=7) == {d: arenas for d in detectors}
    # a cell not played counts in no mean; an error still counts as 0
    matrix = np.array([[1.0, np.nan], [np.nan, 0.5], [0.0, 0.5]])
    played = np.array([[True, True], [False, True], [True, True]])
    board = {r["detector"]: r for r in scoring.detector_board(matrix, ["a", "b", "c"], ["x", "y"], played=played)}
    assert board["x"]["mean_score"] == 0.5 and board["x"]["arenas"] == 2
    assert board["y"]["mean_score"] == pytest.approx(1 / 3) and board["y"]["errors"] == 1
    cells = [{"arena": "a", "detector": "x", "score": 1.0}, {"arena": "b", "detector": "y", "score": None}]
    assert scoring.played_matrix(cells, ["a", "b"], ["x", "y"]).tolist() == [[True, False], [False, True]]


def test_the_page_renders_offline_in_chromium(tournament):
    root, out, _, _ = tournament
    results = json.loads((out / "results.json").read_text())
    playwright = pytest.importorskip("playwright.sync_api")
    if not CHROMIUM.exists():
        pytest.skip("Chromium is not installed at /usr/bin/chromium")
    html = (out / "index.html").read_text()
    assert "<script" not in html and "http://" not in html and "https://" not in html
    requests = []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM),
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        page = browser.new_page()
        page.on("request", lambda r: requests.append(r.url))
        page.goto((out / "index.html").as_uri())
        page.wait_for_load_state("load")
        assert page.title() == "Tournament week4"
        images = page.eval_on_selector_all("img", "els => els.map(e => [e.getAttribute('src'), e.complete, "
                                                  "e.naturalWidth])")
        assert len(images) == 1 + len(results["arenas"])
        assert all(complete and width > 0 for _, complete, width in images), images
        text = page.inner_text("body")
        assert "Detector leaderboard" in text and "alice" in text and "Your trigger evaded" in text
        browser.close()
    assert all(url.startswith("file://") for url in requests), requests
