"""The lecture notebooks: stored clean, executed top to bottom, and their key numbers in range.

Each notebook runs with nbclient on the default dataset (Fashion-MNIST, offline) in its own
folder (``notebooks/``), with ``RESULTS_DIR`` and ``CACHE_DIR`` injected after its
``parameters`` cell (papermill's convention) so that nothing is written into the repository.
The seven run in order and share one model cache, as they do in a lecture; notebook 7 then
gathers the results of the first six. Each notebook writes the numbers it measured to
``RESULTS_DIR/<name>.json`` (see :mod:`course_lib.lecture`); the checks below read them and
assert the claims that the notebooks' prose makes about this run's numbers. Each notebook runs
with the reference answers of its exercises filled in (``solutions/lecture/``, see
:mod:`course_lib.exercises`): every check must pass, and every wrong answer listed there must
fail with its message.

Set COURSE_NOTEBOOK_SAVE to a folder to keep the executed notebooks (outputs included) there.

The time limit per notebook is generous (COURSE_NOTEBOOK_LIMIT_S, default 600 s) because a
shared CI machine can be much slower than the 2-core laptop the notebooks are sized for
(3 minutes each there; README.md, "Lecture notebooks", lists measured times).
"""
from __future__ import annotations

import ast
import json
import os
import re
import time
from pathlib import Path

import nbformat
import numpy as np
import torch
import pytest

from course_lib.defenses import compare, matrix

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
OPTIONAL = sorted((ROOT / "notebooks").glob("[0-9][0-9][a-z]_*.ipynb"))   # not part of a lecture slot
LECTURE_DEFENSES = ("activation_clustering", "neural_cleanse", "fine_pruning", "lecture_transform_sanitization",
                    "dp_sgd", "lecture_batch_noise")   # notebook 6: the defenses the lecture names (and its DP sketch)
LIMIT_S = float(os.environ.get("COURSE_NOTEBOOK_LIMIT_S", 600))


def markdown_words(path: Path) -> int:
    """The words of a notebook's markdown (what a student reads before any code runs), without its optional
    parts: a cell whose heading starts with "## Optional" and the cells after it, up to the next "## " heading."""
    words, optional = 0, False
    for cell in nbformat.read(path, as_version=4).cells:
        if cell.cell_type != "markdown":
            continue
        if cell.source.startswith("## "):
            optional = cell.source.startswith("## Optional")
        words += 0 if optional else len(cell.source.split())
    return words


SLOT_WORDS = {"06": 2000}   # notebook 6 is the lecture's 25 minutes (issue 24)
WEEK_WORDS = 10_000         # the seven together (issue 24), the optional parts not counted


def test_lecture_notebooks_fit_their_slots():
    """Reading time is part of a notebook's slot: count the markdown words of each lecture notebook (printed:
    ``pytest tests/test_notebooks.py -k slots -s``); the optional notebooks (06b) are not counted."""
    counts = {p.stem: markdown_words(p) for p in NOTEBOOKS}
    for name, words in counts.items():
        print(f"{name}: {words:,} words of markdown")
    print(f"the seven lecture notebooks: {sum(counts.values()):,} words; optional ({', '.join(p.stem for p in OPTIONAL)}): "
          f"{sum(markdown_words(p) for p in OPTIONAL):,}")
    for name, words in counts.items():
        assert words <= SLOT_WORDS.get(name[:2], 2500), f"{name} has {words} words of markdown"
    assert sum(counts.values()) <= WEEK_WORDS


def test_there_is_one_notebook_per_lecture_section():
    assert [p.name[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05", "06", "07"]


@pytest.mark.parametrize("path", NOTEBOOKS + OPTIONAL, ids=lambda p: p.stem)
def test_notebook_is_stored_clean_with_one_parameters_cell(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "store notebooks without outputs"
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged 'parameters'"
    params = {}
    exec(tagged[0].source, params)  # plain assignments only
    assert params["DATASET"] == "fashion-mnist" and params["FAST"] is True and "DEVICE" in params
    assert {"RESULTS_DIR", "CACHE_DIR"} <= set(params)
    text = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    if path in NOTEBOOKS:
        assert "Learning objectives" in nb.cells[0].source and "## Takeaways" in text


@pytest.fixture(scope="module")
def shared_dirs(tmp_path_factory):
    """One results folder and one model cache for the whole run of seven notebooks.

    The cache starts empty (a first lecture run), unless COURSE_NOTEBOOK_CACHE names a folder
    to keep it in: run the tests twice with it to time the warm case (the instructor's re-run).
    """
    base = tmp_path_factory.mktemp("lecture")
    cache = os.environ.get("COURSE_NOTEBOOK_CACHE")
    return base / "results", Path(cache) if cache else base / "models"


def execute(path: Path, results_dir: Path, cache_dir: Path) -> tuple[nbformat.NotebookNode, float]:
    """Run ``path`` in its folder with injected result/cache folders and the reference answers of its
    exercises filled in (:func:`with_reference_answers`); return it and its wall time."""
    from nbclient import NotebookClient

    nb = with_reference_answers(nbformat.read(path, as_version=4), path.stem)
    where = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    injected = nbformat.v4.new_code_cell(f'RESULTS_DIR = "{results_dir}"\nCACHE_DIR = "{cache_dir}"')
    injected.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(where + 1, injected)
    start = time.perf_counter()
    NotebookClient(nb, timeout=LIMIT_S, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    return nb, time.perf_counter() - start


# The exercises (course_lib/exercises.py documents the convention).

def exercise_cells(nb) -> list[tuple[str, int]]:
    """(exercise id, index of its check cell) for every answer cell tagged ``exercise``."""
    found = []
    for i, cell in enumerate(nb.cells):
        if "exercise" in cell.metadata.get("tags", []):
            name = cell.metadata["exercise"]
            check = next(j for j in range(i + 1, len(nb.cells)) if nb.cells[j].cell_type == "code")
            assert f'check("{name}"' in nb.cells[check].source, f"the cell after answer cell {name} must check it"
            found.append((name, check))
    return found


def solutions_of(stem: str) -> dict:
    from course_lib.exercises import load_solutions
    return load_solutions(ROOT / "solutions" / "lecture" / f"{stem}.py")


def with_reference_answers(nb, stem: str):
    """The notebook with each answer cell replaced by its reference answer and, at the end, each wrong
    answer followed by a copy of its check cell (at the end, so that no wrong answer reaches a later cell)."""
    exercises = exercise_cells(nb)
    if not exercises:
        return nb
    solutions = solutions_of(stem)
    checks = {name: nb.cells[at].source for name, at in exercises}
    for cell in nb.cells:
        if "exercise" in cell.metadata.get("tags", []):
            cell.source = solutions[cell.metadata["exercise"]]["answer"]
    for name, _ in exercises:
        wrong = nbformat.v4.new_code_cell(solutions[name]["wrong"] + "\n" + checks[name])
        wrong.metadata.update(tags=["exercise-wrong"], exercise=name)
        nb.cells.append(wrong)
    return nb


def check_exercises(nb, stem: str) -> None:
    """Each reference answer passes its check; each wrong answer fails it, with the message the solutions expect."""
    exercises = exercise_cells(nb)
    solutions = solutions_of(stem) if exercises else {}
    for name, at in exercises:
        assert f"✔ {name}: right." in text_of(nb.cells[at]), f"the reference answer of {name} fails its check"
    for cell in nb.cells:
        if "exercise-wrong" in cell.metadata.get("tags", []):
            name, shown = cell.metadata["exercise"], text_of(cell)
            assert f"✘ {name}: not yet." in shown, f"a wrong answer to {name} passes its check"
            assert solutions[name]["wrong_says"] in shown, shown


def text_of(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.get("output_type") == "stream")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_ends_with_exercises_whose_answers_live_in_solutions(path):
    """2-4 exercises at the end (checked ones and open questions); every one has its reference answer in
    solutions/lecture/, none in the notebook; the check cells use the one checker, course_lib.exercises."""
    nb = nbformat.read(path, as_version=4)
    checked = [name for name, _ in exercise_cells(nb)]
    questions = [c.metadata["question"] for c in nb.cells if "question" in c.metadata.get("tags", [])]
    assert 2 <= len(checked) + len(questions) <= 4, "each notebook ends with 2-4 exercises"
    assert len(set(checked + questions)) == len(checked + questions), "exercise ids must be unique"
    assert all(name.startswith(path.name[:2] + "-") for name in checked + questions)
    solutions = solutions_of(path.stem)
    for name in checked:
        assert {"answer", "wrong", "wrong_says"} <= set(solutions[name]) and solutions[name]["wrong_says"], name
    for name in questions:
        assert len(solutions[name].get("written", "")) > 80, f"question {name} needs a written answer in solutions/"
    takeaways = next(i for i, c in enumerate(nb.cells) if "## Takeaways" in c.source)
    first = min(i for i, c in enumerate(nb.cells) if {"exercise", "question"} & set(c.metadata.get("tags", [])))
    assert first > takeaways, "the exercises come at the end, after the takeaways"


def outputs(nb, key: str) -> list:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if key in o.get("data", {})]


def results_of(results_dir: Path, name: str) -> dict:
    return json.loads((results_dir / f"{name}.json").read_text())["results"]


def check_01(r):
    assert r["clean_acc"] >= 0.85
    # erratum 12, as the text says: the lecture's clamp sets every pixel darker than mid-grey to mid-grey
    assert r["erratum_12"]["dark_set_to_grey"] == 1.0 and r["erratum_12"]["dark_share"] > 0.2
    assert r["rates"]["0.01"]["asr"] >= 0.9
    assert all(abs(v["clean_acc"] - r["clean_acc"]) < 0.02 for v in r["rates"].values())
    asr = [r["rates"][k]["asr"] for k in ("0.001", "0.005", "0.01")]
    assert asr == sorted(asr), "the takeaway: the ASR climbs with the poisoning rate"


def check_02(r):
    assert r["kit_flip_kept"] == pytest.approx(0.8, abs=1e-3)
    assert r["lecture_recipe_kept"] > 0.81          # the lecture's recipe keeps ~1 in 10 "flipped" labels
    acc = {float(k): v for k, v in r["availability"].items()}
    assert acc[0.0] >= 0.85 > acc[0.6]
    assert acc[0.0] - acc[0.2] < 0.02, "the text: 20% flipped costs a point or two (under 2 points on every recorded run)"
    # the collapse point the notebook prints is the first rate below halfway between clean and chance,
    # and it comes before the 90% at which the labels stop carrying any signal (the text's argument)
    halfway = (acc[0.0] + 0.1) / 2
    assert r["collapse"]["halfway"] == pytest.approx(halfway)
    assert r["collapse"]["rate"] == min(k for k, v in acc.items() if v < halfway) == 0.7  # takeaway: 70% on every recorded run
    assert acc[0.9] < halfway
    # the takeaway: targeted flipping shows in the headline accuracy as about a tenth of the source class's loss
    t = r["targeted"]
    assert t["source_drop"] >= 0.3 and abs(t["overall_drop"] - t["source_drop"] / 10) < 0.02
    assert r["per_class_drop_60"]["max"] - r["per_class_drop_60"]["min"] > 0.1, "the damage is uneven"
    assert r["targeted"]["0.5"]["source_to_target"] >= 0.3
    assert r["backdoor_preview"]["asr"] >= 0.9


def check_03(r):
    assert r["badnets"]["asr"] >= 0.9 and r["badnets"]["clean_acc"] >= 0.85
    assert r["badnets"]["lecture_draw_noops"] > 0
    assert r["badnets"]["same_draw"]        # the BadNets row pairs the poisoned set shown with the victim trained on it
    assert r["label_consistent"]["asr"] >= 0.5
    # the takeaway: the trigger alone already planted a backdoor, and the PGD hardening added to it
    assert 0.5 <= r["label_consistent"]["control_asr"] < r["label_consistent"]["asr"]
    assert r["lecture_variant"]["asr_to_target"] <= 0.2


def check_04(r):
    assert r["framework"]["pixel 5x5"]["asr"] >= 0.9
    assert 0.05 <= r["clean_model_asr_lecture_counting"] <= 0.2
    assert r["asr_lecture_counting"] > r["framework"]["pixel 5x5"]["asr"] - 0.01
    assert r["rate_sweep"]["0.05"]["asr"] >= 0.9
    # erratum 4, as the notebook shows it: the lecture's sign leaves its patch no better than the random start
    # at the corner it trains for, fixing the sign alone helps there, and only the kit's way works anywhere
    patch = r["physical_patch_on_clean_model"]
    written, fixed = patch["lecture's recipe, as written"], patch["lecture's recipe, sign fixed"]
    start, kit = patch["random start (not optimized)"], patch["PhysicalPatch.optimize"]
    assert written["corner"] <= start["corner"] < fixed["corner"]
    assert kit["random"] > max(fixed["random"], written["random"], start["random"])
    # the takeaway: the ASR jumps between two neighbouring rates while the clean accuracy hardly moves
    sweep = r["rate_sweep"]
    low, high = r["rate_sweep_largest_step"]
    assert sweep[high]["asr"] - sweep[low]["asr"] >= 0.5
    assert max(v["clean_acc"] for v in sweep.values()) - min(v["clean_acc"] for v in sweep.values()) < 0.02
    # the takeaway on the lecture's transferability claim: fine-tuning alone, both compressions and JPEG inputs
    # left the backdoor in place
    survival = r["transferability"]
    assert len(survival) == 5 and all(v["asr"] >= 0.9 for v in survival.values())


def check_05(r):
    assert r["effectiveness"]["pixel 3x3 (default)"]["asr"] >= 0.9
    assert 0 < r["stealth"]["blend a=0.1"]["psnr"] < 60 and 0 < r["stealth"]["pixel 3x3 (default)"]["ssim"] <= 1
    assert set(r["robustness"]["pixel 3x3 (default)"]) >= {"none", "jpeg75", "rotate+15"}
    assert r["opacity_asr"]["1.0"] >= 0.9 and "psnr" in r["explorer_state"]
    assert max(r["checklist"].values()) < r["checklist_criteria"], "the takeaway says no trigger meets them all"
    check_05_ssim(r)
    # section 1 and the takeaway: the faintest trigger (highest PSNR, small L-inf) gets a worse windowed SSIM than
    # the visible pasted square: no single number is "visibility"
    st = r["stealth"]
    faint = max(st, key=lambda n: st[n]["psnr"])
    square = max(("pixel 3x3 (default)", "dynamic", "distributed", "sample-specific"), key=lambda n: st[n]["ssim"])
    assert st[faint]["linf"] < st[square]["linf"] and st[faint]["ssim"] < st[square]["ssim"]
    # erratum 13, the control: the same transformation without the trigger, on the same images and crops
    alone = r["robustness_alone"]
    assert set(alone) == set(r["robustness"]) and all(set(alone[n]) == set(r["robustness"][n]) for n in alone)
    # the takeaway: "a transformation alone can send clean images to the target"
    assert max(v for rob in alone.values() for t, v in rob.items() if t != "none") > 0.2
    net = {n: {t: r["robustness"][n][t] - alone[n][t] for t in alone[n]} for n in alone}
    # the scatter and the checklist judge robustness by the trigger's share, never above the raw ASR
    assert all(net[n][t] <= r["robustness"][n][t] for n in net for t in net[n])
    # the takeaway: triggers that work on clean copies can fail after a rotation or a crop (the trigger's share)
    assert any(e["asr"] > 0.9 and min(net[name][t] for t in ("rotate+15", "rotate-15", "crop_resize")) <= 0.8
               for name, e in r["effectiveness"].items())
    # section 5's third question: no trigger, strong or faint, passes all four robustness columns of the checklist
    groups = (("rotate+15", "rotate-15"), ("brightness+20%", "brightness-20%"), ("crop_resize",), ("jpeg75",))
    assert all(min(net[n][t] for group in groups for t in group) <= 0.8 for n in net)


def check_06(r):
    """Notebook 6's claims, against this run's numbers (issue 17: the text states no result the run does
    not print; these are the relations its markdown and takeaways rely on)."""
    assert r["badnets"]["asr"] >= 0.9
    assert r["budget"] == "quick" and set(r["cached"]) <= set(compare.DEFENSES)
    ac = r["activation_clustering"]
    assert ac["lecture_rule_fpr"] > 0.2 > ac["fpr"], "the lecture's rule throws away far more clean data"
    assert ac["analysis"] == "trusted" and ac["flagged"] == [0] and ac["flagged_on_clean_model"] == []
    nc = r["neural_cleanse"]
    # the signed index of the bar chart is the flag rule: a label is flagged exactly when its bar passes 2
    assert nc["flagged"] == [k for k, a in enumerate(nc["anomaly_index"]) if a > 2]
    # "the clean labels' masks differ by factors"
    assert max(nc["clean_norms"]) / min(nc["clean_norms"]) >= 2
    assert 0.15 < nc["chance_false_alarm_rate"] < 0.5, "the MAD rule's chance rate with 10 labels, as simulated"
    # the unlearning's control: the same fine-tuning without the reversed-trigger stamps leaves the backdoor
    assert nc["unlearning_control"]["asr"] >= 0.9 and nc["unlearning_control"]["ca"] > 0.85
    fp = r["fine_pruning"]
    before, pruned, _ = fp["val_acc"]
    assert pruned >= before - 0.10, "the stated stopping rule: within 10 points of the unpruned model"
    assert fp["tuned_images"] == fp["trusted_images"] - round(0.2 * fp["trusted_images"]), "20% held out"
    assert fp["asr"] < 0.5 and r["dp_sgd"]["epsilon"] > 0
    # section 5's control, DP-SGD without the noise on the same budget, trains a working model
    assert r["dp_sgd"]["control_no_noise"]["ca"] > 0.5 and 0 <= r["dp_sgd"]["control_no_noise"]["asr"] <= 1
    # "the reason is the pruning curve": within a 4-point budget, before fine-tuning, much of the backdoor is left
    curve = fp["curve"]
    within_4 = max(i for i, a in enumerate(curve["clean_acc"]) if a >= curve["clean_acc"][0] - 0.04)
    assert curve["asr"][within_4] > 0.5
    rows = r["comparison"]
    assert [row["defense"] for row in rows] == list(LECTURE_DEFENSES), "one row per defense the lecture names"
    for row in rows:  # built by the bench's runner: its paper, its fields, and no empty row in the figure
        assert row["paper"] == compare.PAPERS[row["defense"]] and "cpu_seconds" in row
        assert row["ca_after"] is not None and row["asr_after"] is not None, f"{row['defense']} has an empty row"
    by_name = {row["defense"]: row for row in rows}
    # section 2's printed verdict: the stamps, not the fine-tuning alone, removed the backdoor
    assert nc["unlearning_control"]["asr"] - by_name["neural_cleanse"]["asr_after"] > 0.5
    # section 5: the lecture's batch noise ruins the model
    assert by_name["lecture_batch_noise"]["ca_after"] < 0.5
    # section 7: the lecture's chain, stage by stage, with its controls (each stage alone) from the same runners
    chain = r["lecture_chain"]
    assert chain["ca_before"] == by_name["dp_sgd"]["ca_before"] and chain["epsilon"] > 0
    assert chain["pruned"] == bool(chain["flagged"]) and chain["target_flagged"] == (0 in chain["flagged"])
    # section 7's takeaway: stages 1-2 together (sanitize, then DP-SGD) beat either defense alone in this run
    assert chain["asr_trained"] < min(by_name["lecture_transform_sanitization"]["asr_after"], by_name["dp_sgd"]["asr_after"])
    if not chain["pruned"]:
        assert (chain["ca_after"], chain["asr_after"]) == (chain["ca_trained"], chain["asr_trained"])
    assert chain["seconds"] == pytest.approx(chain["seconds_train"] + chain["seconds_detect"] + chain["seconds_prune"], abs=0.11)


def check_06b(r):
    """The optional notebook 6b: every defense of bench defenses, the kit's pipeline, the saved matrix."""
    rows = r["comparison"]
    assert [row["defense"] for row in rows] == list(compare.DEFENSES), \
        "the measured comparison table must have a row per defense of bench defenses"
    by_name = {row["defense"]: row for row in rows}
    # the pipeline: its first stages are AC's runner (same numbers), then STRIP in front of the retrained model
    p = r["pipeline"]
    ac_row = by_name["activation_clustering"]
    assert (p["ca_retrained"], p["asr_retrained"], p["f1"]) == (ac_row["ca_after"], ac_row["asr_after"], ac_row["f1"])
    assert p["asr_retrained"] <= 0.1 and p["asr_filtered"] <= p["far"] + 1e-9 and p["frr"] <= 0.05
    assert p["seconds"] == pytest.approx(p["seconds_retrain"] + p["seconds_strip"], abs=0.11)
    # the saved matrix: the whole plan (every family at every rate, the five clean models)
    assert r["matrix"]["source"] == "cached" and r["matrix"]["models"] == len(matrix.plan())
    # every detector with a class verdict has its false-alarm rate over the clean models
    assert set(r["matrix"]["false_alarm_rates"]) == {"activation_clustering", "spectral_signatures", "neural_cleanse"}
    check_06_matrix_claims()


def check_06_matrix_claims():
    """The markdown of notebook 6 about the saved detection matrix (docs/detection_matrix.jsonl)."""
    rows = matrix.load_rows(ROOT / "docs" / "detection_matrix.jsonl")
    ac_5 = [x for x in rows if x["defense"] == "activation_clustering" and x["rate"] == 0.05]
    # "why the trusted share is the default": it beats Chen et al.'s analyses on the spread-out triggers
    for x in ac_5:
        if x["trigger"] in ("blend", "sig", "wanet"):
            assert x["f1_by_analysis"]["trusted"] > x["f1_by_analysis"]["silhouette+exclusionary"], x["trigger"]
    # NC: the log index flags more patch targets than Wang et al.'s index on the norms
    nc = [x for x in rows if x["defense"] == "neural_cleanse" and x["trigger"] in ("checkerboard", "square", "corners")]
    assert sum(x["target"] in x["flagged"] for x in nc) > sum(x["target"] in x["flagged_linear"] for x in nc)
    # ... "and its price": on the clean models it raises a false alarm on more models than Wang et al.'s index
    nc_clean = [x for x in rows if x["defense"] == "neural_cleanse" and x["trigger"] == "clean"]
    assert sum(bool(x["flagged"]) for x in nc_clean) > sum(bool(x["flagged_linear"]) for x in nc_clean)
    # SS: squaring ranks the clean tail high too; the paper's removal from every class costs clean accuracy
    ss = [x for x in rows if x["defense"] == "spectral_signatures" and x["rate"] == 0.05 and x["trigger"] != "clean"]
    assert all(x["f1_by_score"]["one_sided"] >= x["f1_by_score"]["squared"] for x in ss)
    assert all(x["ca_after_every_class"] < x["ca_before"] - 0.1 for x in ss)
    # "the matrix shows whole trigger families that some detectors never catch" (NC never flags SIG's target)
    families = {x["trigger"] for x in rows if x["trigger"] != "clean"}
    missed = {f for f in families
              if all(x["target"] not in x["flagged"] for x in rows if x["trigger"] == f and x["defense"] == "neural_cleanse")}
    assert missed >= {"sig"}


def check_07b(r):
    """The optional notebook 7b: the class tournament's results (here the house-only run, no results file given)."""
    assert r["source"] in ("class", "house-only") and r["arenas"] >= 2 and r["detectors"] >= 4
    assert r["always_flag_scores"] == [0.0], "flagging everything scores exactly 0"
    assert abs(r["random_mean"]) < 0.1, "flagging at random scores about 0"
    if r["source"] == "house-only":
        assert r["first_detector"].startswith("house:") and set(r["house_families"]) <= {
            "checkerboard", "blend", "sig", "wanet", "corners", "clean_label"}
        assert "checkerboard" in r["house_families"], "the patch family enters its arena"


@pytest.mark.parametrize("name, defenses", [("06_detection_mitigation", "LECTURE_DEFENSES"),
                                             ("06b_defenses_in_depth", "compare.DEFENSES")])
def test_notebook_6_rows_come_from_the_bench_runners(name, defenses):
    """Notebooks 6 and 6b run every defense through compare.run_defense, the function behind ``bench defenses``
    and ``bench matrix``: they never call a defense or build a row by hand, so no row can drift."""
    nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "compare.run_defense(" in code and "defense_row(" not in code
    by_hand = ["activation_clustering", "spectral_signatures", "isolation_forest_outliers", "neural_cleanse",
               "unlearn", "fine_prune", "fit_strip", "lecture_transform_sanitize", "train_dp_sgd",
               "lecture_batch_noise_training", "retrain_without", "remove"]
    assert not [f for f in by_hand if re.search(rf"\bD\.{f}\(", code)], "a defense is called by hand"
    # one cell runs the defenses through the runner, behind one progress bar
    runs = [c.source for c in nb.cells if c.cell_type == "code" and "compare.run_defense(" in c.source]
    assert len(runs) == 1 and f"lecture.progress({defenses}" in runs[0] and "cache_dir=CACHE_DIR" in runs[0]
    if name.startswith("06b"):
        assert "D.run_pipeline(case" in code, "the kit's pipeline runs through the function bench pipeline calls"
    else:
        assert "pipeline.run_lecture_chain(case" in code, "the lecture's chain runs through the kit's function"
    # a table that is not a cell's last expression is never shown: every other one goes through display()
    for cell in (c.source for c in nb.cells if c.cell_type == "code"):
        body = ast.parse("\n".join(line for line in cell.splitlines() if not line.lstrip().startswith("%"))).body
        dropped = [node for node in body[:-1] if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)
                   and getattr(node.value.func, "attr", None) in ("table", "versus")]
        assert not dropped, f"a table in the middle of a cell is silently dropped: {cell[:80]}"


def check_05_ssim(r):
    """The text: the two SSIMs agree on the local triggers; where they disagree, the trigger is spread out."""
    local = ["pixel 3x3 (default)", "dynamic", "distributed", "sample-specific"]
    gaps = {name: abs(s["lecture_ssim"] - s["ssim"]) for name, s in r["stealth"].items()}
    assert all(gaps[name] <= 0.05 for name in local)
    assert any(gap > 0.05 for gap in gaps.values()), "some spread-out trigger must show the disagreement"
    # the text: where they disagree, the lecture's global formula reports the trigger as the less visible one
    assert all(s["lecture_ssim"] > s["ssim"] for name, s in r["stealth"].items() if gaps[name] > 0.05)


def check_07(r):
    assert len(r["gathered"]) == 6
    f = r["formalization"]
    assert f["alpha"] == pytest.approx(0.05, abs=1 / f["N"]) and f["D_clean"] + f["D_poison"] == f["N"]
    assert f["utility_met"] and f["effectiveness_met"]
    said = [s for q, s in r["lecture_says"].items() if not q.startswith("defense:") and s != "(not stated)"]
    assert said and all(s.startswith('"') and s.endswith('"') for s in said), "quote the lecture or say it does not"


def check_07_against_06(r, results_dir):
    """Appendix A.2: a detection score, TPR - FPR, for every row of notebook 6 that has both."""
    rows = results_of(results_dir, "06_detection_mitigation")["comparison"]
    expected = {row["defense"]: row["tpr"] - row["fpr"] for row in rows
                if row.get("tpr") is not None and row.get("fpr") is not None}
    assert expected, "notebook 6 should score at least one detector"
    assert {d["defense"]: d["detection score"] for d in r["detection_scores"]} == pytest.approx(expected)


CHECKS = {p.stem: globals()[f"check_{p.name[:2]}"] for p in NOTEBOOKS}


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_and_measures(path, shared_dirs):
    results_dir, cache_dir = shared_dirs
    nb, seconds = execute(path, results_dir, cache_dir)
    print(f"{path.name}: {seconds:.1f} s")
    if os.environ.get("COURSE_NOTEBOOK_SAVE"):   # a folder to keep the executed notebooks in, to read them
        Path(os.environ["COURSE_NOTEBOOK_SAVE"]).mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, Path(os.environ["COURSE_NOTEBOOK_SAVE"]) / path.name)
    check_live_use(nb)
    if path.name[:2] != "07":
        assert len(outputs(nb, "image/png")) >= 2, "the notebook should show pictures"
    if path.name[:2] in EXPLORERS:
        check_html_export_keeps_the_explorer(nb, EXPLORERS[path.name[:2]])
    CHECKS[path.stem](results_of(results_dir, path.stem))
    check_exercises(nb, path.stem)
    if path.name[:2] == "07":
        check_07_against_06(results_of(results_dir, path.stem), results_dir)


EXPLORERS = {"04": "attack success rate", "05": "PSNR"}  # notebook -> text its explorer's snapshot shows


@pytest.mark.slow
@pytest.mark.parametrize("path", OPTIONAL, ids=lambda p: p.stem)
def test_optional_notebook_runs_and_measures(path, shared_dirs):
    """The optional notebooks (6b), after the lecture's: they read the defenses notebook 6 cached."""
    results_dir, cache_dir = shared_dirs
    nb, seconds = execute(path, results_dir, cache_dir)
    print(f"{path.name}: {seconds:.1f} s")
    if os.environ.get("COURSE_NOTEBOOK_SAVE"):
        nbformat.write(nb, Path(os.environ["COURSE_NOTEBOOK_SAVE"]) / path.name)
    check_live_use(nb)
    assert "**Optional.**" in nb.cells[0].source, "an optional notebook says so at its top"
    globals()[f"check_{path.stem.split('_')[0]}"](results_of(results_dir, path.stem))


def check_live_use(nb) -> None:
    """No progress bar frozen at its first frame, no wall of text: what a class sees is readable."""
    texts = [o.get("text") or o.get("data", {}).get("text/plain", "")
             for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [t for t in texts if re.search(r"\| *\d+/\d+ \[", t)], "a tqdm bar was saved in its first state"
    assert all(len(line) < 400 for t in texts for line in t.splitlines()), "an output line is a wall of text"
    busy = [c.source for c in nb.cells if c.cell_type == "code" and trains_in_a_loop(c.source)]
    assert all("lecture.progress(" in source for source in busy), "a cell training several models needs a bar"


TRAINERS = {"run_clean", "run_backdoor", "run_poisoned", "optimize"}


def trains_in_a_loop(source: str) -> bool:
    """Whether a cell calls a training function inside a for loop or a comprehension."""
    tree = ast.parse("\n".join(line for line in source.splitlines() if not line.lstrip().startswith("%")))
    loops = [n for n in ast.walk(tree) if isinstance(n, (ast.For, ast.ListComp, ast.DictComp, ast.GeneratorExp))]
    parts = [part for loop in loops for part in (loop.body if isinstance(loop, ast.For) else
                                                 [getattr(loop, "elt", None), getattr(loop, "value", None)]) if part]
    return any(isinstance(node, ast.Call) and getattr(node.func, "attr", None) in TRAINERS
               for part in parts for node in ast.walk(part))


def check_html_export_keeps_the_explorer(nb, text: str) -> None:
    """nbconvert's HTML export (offline, no widget JavaScript) keeps the explorer's static snapshot."""
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_notebook_node(nb)
    start = body.index('class="explorer-snapshot"')
    snapshot = body[start:body.index("</div></div>", start)]
    assert "data:image/png;base64," in snapshot and text in snapshot


# The notebooks' helpers, on tiny synthetic data (fast).

@pytest.fixture(scope="module")
def tiny_runs():
    from course_lib.data import synthetic_dataset
    from course_lib.experiments import run_backdoor

    train, test = synthetic_dataset(300, seed=0), synthetic_dataset(100, seed=1)
    return test, {rate: run_backdoor(train, test, rate=rate, epochs=1, progress=False) for rate in (0.05, 0.2)}


def test_trigger_explorer_updates_and_degrades_to_a_static_view(tiny_runs):
    from course_lib.widgets import TRIGGER_KINDS, TriggerExplorer

    test, runs = tiny_runs
    explorer = TriggerExplorer(test.images[:4], runs[0.2].model, classes=test.classes, target=0)
    full = explorer.state["l2"]
    assert explorer.set(opacity=0.25)["l2"] == pytest.approx(full / 4, rel=1e-4)  # the mix is linear
    for kind in TRIGGER_KINDS:
        assert "ssim" in explorer.set(kind=kind, opacity=1.0)
    shown = displayed(explorer)
    assert "application/vnd.jupyter.widget-view+json" in shown[0] and "PSNR" in shown[0]["text/plain"]
    assert "explorer-snapshot" in shown[1]["text/html"] and "model:" in shown[1]["text/html"]
    exported = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("explorer", outputs=[
        nbformat.v4.new_output("display_data", data=bundle) for bundle in shown])])
    check_html_export_keeps_the_explorer(exported, "PSNR")
    with pytest.raises(ValueError, match="kind"):
        TriggerExplorer(test.images[:4], kind="sticker")


def displayed(obj) -> list[dict]:
    """The mime bundles that showing ``obj`` as a cell's result publishes, in order."""
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    bundles = []
    publish = shell.display_pub.publish
    shell.display_pub.publish = lambda data, *args, **kwargs: bundles.append(data)
    try:
        shell.display_formatter.format(obj)  # runs _ipython_display_, which displays the outputs itself
    finally:
        shell.display_pub.publish = publish
    return bundles


def test_rate_explorer_answers_from_precomputed_models(tiny_runs):
    from course_lib.widgets import RateExplorer

    test, runs = tiny_runs
    explorer = RateExplorer(runs, test, runs[0.2].poison.trigger, 0)
    start = time.perf_counter()
    text = explorer.set(0.05)
    assert time.perf_counter() - start < 2.0 and "poisoning rate <b>5%</b>" in text
    shown = displayed(explorer)
    assert "clean accuracy" in shown[0]["text/plain"] and "<table>" in shown[1]["text/html"]
    with pytest.raises(ValueError, match="rate"):
        explorer.set(0.5)


def test_lab_records_results_for_the_summary_notebook(tmp_path, monkeypatch):
    from course_lib import lecture
    from course_lib.data import synthetic_dataset

    data = synthetic_dataset(200, seed=0)
    monkeypatch.setattr(lecture, "load_splits", lambda name: (data, data))
    lab = lecture.start("99_test", results_dir=tmp_path, cache_dir=None)
    lab.record(asr=0.5, rates={"0.1": 0.9})
    with pytest.raises(TypeError, match="'model'"):
        lab.record(model=object())
    assert lab.finish()["asr"] == 0.5
    saved = lecture.load_results(tmp_path)["99_test"]
    assert saved["results"]["rates"] == {"0.1": 0.9} and saved["results"]["cpu_seconds"] >= 0
    assert "91.2%" == lecture.pct(0.9123) and lecture.pct(None) == "n/a"


def test_exercise_checks_pass_right_answers_and_explain_wrong_ones(capsys):
    """course_lib.exercises on small real data: a pass line, a hint that does not give the answer, bad input named."""
    from course_lib import exercises
    from course_lib.data import load_splits
    from course_lib.poisoning import flip_labels_random

    labels = load_splits("fashion-mnist")[1].labels[:1000]
    exercises.check("02-flip", lambda y, r, seed: flip_labels_random(y, r, num_classes=10, seed=seed)[0], labels=labels)
    def lecture_flip(y, r, seed):  # the lecture's sketch: the new label may be the old one
        rng = np.random.default_rng(seed)
        y = y.numpy().copy()
        chosen = rng.choice(len(y), int(r * len(y)), replace=False)
        y[chosen] = rng.integers(0, 10, len(chosen))
        return y
    exercises.check("02-flip", lecture_flip, labels=labels)
    exercises.check("02-flip", lambda y, r, seed: 1 / 0, labels=labels)
    exercises.check("01-example", 20, expected=20)
    exercises.check("01-example", 25, expected=20)
    exercises.check("01-example", ..., expected=20)
    shown = capsys.readouterr().out.splitlines()
    assert shown[0] == "✔ 02-flip: right." and shown[1].startswith("✘ 02-flip: not yet. it keeps some chosen labels")
    assert "ZeroDivisionError" in shown[2] and shown[4] == "✘ 01-example: not yet. too high"
    assert "not answered yet" in shown[5] and "20" not in shown[4]
    with pytest.raises(ValueError, match="expected"):
        exercises.check("01-unknown", 3)
    with pytest.raises(ValueError, match="tolerance"):
        exercises.check("01-example", 3, expected=3, tolerance=-1)
    with pytest.raises(ValueError, match="name"):
        exercises.exercise("flip", "a task")
    # a choice from the run's statistics: the rule's own threshold raises too many false alarms, a higher one than
    # needed gives up detections, an off-grid one is refused (notebook 6, exercise 1)
    for answer in (2.0, 10.0, 3.1, "4"):
        exercises.check("06-threshold", answer, n_labels=10)
    shown = capsys.readouterr().out.splitlines()
    assert "too low" in shown[0] and "smaller threshold" in shown[1] and "multiple of 0.25" in shown[2]
    assert "expected a positive number" in shown[3]


def test_the_new_exercise_checks_on_small_inputs(capsys):
    """The predictions and choices that replaced the one-character repairs (issue 24): each check passes the right
    answer and says what is wrong with a wrong one, without the answer (the notebooks run them on real data)."""
    from course_lib import exercises
    from course_lib.data import synthetic_dataset

    exercises.check("01-white", (1 / 1.3 + 1) / 2)
    exercises.check("01-white", 1 / 1.3)                       # the threshold read in the wrong pixel space
    clean, honest = [0.9, 0.8, 0.7], [0.88, 0.75, 0.70]          # the honest model's largest drop: 5 points
    attacked = {0.1: [0.87, 0.8, 0.7], 0.5: [0.5, 0.8, 0.7]}     # drops of 3 and 40 points in class 0
    exercises.check("02-alarm", (5, {0.1: False, 0.5: True}), clean=clean, honest=honest, attacked=attacked)
    exercises.check("02-alarm", (4, {0.1: False, 0.5: True}), clean=clean, honest=honest, attacked=attacked)
    exercises.check("02-alarm", (6, {0.1: False, 0.5: True}), clean=clean, honest=honest, attacked=attacked)
    exercises.check("02-alarm", (5, {0.1: True, 0.5: True}), clean=clean, honest=honest, attacked=attacked)
    images = synthetic_dataset(20, seed=0).images
    moved = (images + 0.1 * torch.sign(torch.randn(images.shape, generator=torch.Generator().manual_seed(0)))).clamp(0, 1)
    exercises.check("03-bound", (20.0, True), eps=0.1, clean=images, poisoned=moved)
    exercises.check("03-bound", (20.0, False), eps=0.1, clean=images, poisoned=moved)
    exercises.check("03-bound", (10.0, True), eps=0.1, clean=images, poisoned=moved)
    weight = torch.tensor([[0.5, -1.27], [0.2, 0.0]])
    exercises.check("04-quant", 1.27 / 254, weight=weight)
    exercises.check("04-quant", 1.27 / 127, weight=weight)
    exercises.check("07-floor", 2.0, accuracy=0.89, n=2000)     # two standard errors of a drop: 1.98 points
    exercises.check("07-floor", 1.5, accuracy=0.89, n=2000)     # one accuracy's two standard errors (1.40): too low
    exercises.check("07-floor", 0.02, accuracy=0.89, n=2000)
    shown = capsys.readouterr().out.splitlines()
    assert [line[0] for line in shown] == list("✔✘✔✘✘✘✔✘✘✔✘✔✘✘")
    assert "too low" in shown[1] and "too low" in shown[3] and "smaller whole number" in shown[4]
    assert "rate 0.1" in shown[5] and "not what this run shows" in shown[7] and "too low" in shown[8]
    assert "too high" in shown[10] and "too low" in shown[12] and "multiple of 0.5" in shown[13]
    assert not any(answer in line for line in shown for answer in ("0.884", "0.005", "2.0 "))


def test_the_trigger_design_check_measures_stealth_before_training(capsys):
    """05-design refuses a trigger over the stealth budget, or one that changes nothing, without training a model."""
    from course_lib import exercises

    class NoLab:   # training would fail the test: the budget is checked first
        def run_poisoned(self, *args, **kwargs):
            pytest.fail("trained a model for a trigger over the budget")

    images = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    exercises.check("05-design", lambda x: 1 - x, lab=NoLab(), images=images, target=0, rate=0.1)
    exercises.check("05-design", lambda x: x.clone(), lab=NoLab(), images=images, target=0, rate=0.1)
    exercises.check("05-design", 3, lab=NoLab(), images=images, target=0, rate=0.1)
    shown = capsys.readouterr().out.splitlines()
    assert "below the budget" in shown[0] and "changes nothing" in shown[1] and "expected a trigger" in shown[2]


def test_the_lecture_chain_refuses_what_it_cannot_measure():
    """pipeline.run_lecture_chain (notebook 6, section 7) names its bad argument."""
    from course_lib.defenses import pipeline
    with pytest.raises(TypeError, match="case"):
        pipeline.run_lecture_chain("a model")


ABBREVIATIONS = ("AC", "SS", "NC", "STRIP", "FAR", "FRR", "TPR", "FPR", "MAD", "PSNR", "SSIM", "ASR", "CA")


def defines(text: str, abbreviation: str) -> bool:
    """Whether ``text`` defines ``abbreviation``: "attack success rate (ASR)", "(ASR: ...)", "**PSNR**, the ...",
    "TPR = ..."."""
    a = re.escape(abbreviation)
    return bool(re.search(rf"\({a}[:)]|\*\*{a}\*\*[,:]? |\b{a} = |\b{a}\*?\*?, the \*", text))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_abbreviation_is_defined_where_it_is_first_used(path):
    """Each notebook reads on its own: the first markdown cell that uses AC, SS, NC, STRIP, FAR, FRR, TPR, FPR,
    MAD, PSNR, SSIM, ASR or CA defines it there or in an earlier cell."""
    cells = [c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "markdown"]
    for abbreviation in ABBREVIATIONS:
        first = next((i for i, text in enumerate(cells) if re.search(rf"\b{abbreviation}\b", text)), None)
        if first is not None:
            assert any(defines(text, abbreviation) for text in cells[:first + 1]), \
                f"{abbreviation} is used in markdown cell {first} before it is defined"


def test_a_cached_model_keeps_what_it_measured_and_lab_caches_deterministic_results(tmp_path, monkeypatch):
    """A lecture re-run reads a cached model's clean accuracy and ASR instead of measuring them again, keyed by the
    test images and the code; Lab.cached computes once per inputs and code, and recomputes when they change."""
    from course_lib import experiments, lecture
    from course_lib.data import synthetic_dataset

    from course_lib.cache import load

    train, test = synthetic_dataset(300, seed=0), synthetic_dataset(100, seed=1)
    first = experiments.run_backdoor(train, test, rate=0.2, epochs=1, progress=False, cache_dir=tmp_path)
    records = sorted((tmp_path / "results").glob("measured-*.pt"))
    assert len(records) == 1 and load(records[0]) == (first.clean_acc, first.asr)
    monkeypatch.setattr(experiments, "clean_accuracy", lambda *a, **k: pytest.fail("measured again"))
    again = experiments.run_backdoor(train, test, rate=0.2, epochs=1, progress=False, cache_dir=tmp_path)
    assert (again.history, again.clean_acc, again.asr) == (None, first.clean_acc, first.asr)
    monkeypatch.undo()
    other = synthetic_dataset(100, seed=2)             # other test images: measured, not read
    experiments.run_backdoor(train, other, rate=0.2, epochs=1, progress=False, cache_dir=tmp_path)
    assert len(list((tmp_path / "results").glob("measured-*.pt"))) == 2
    with pytest.raises(ValueError, match="trigger and target"):
        experiments.run_clean(train, test, epochs=1, progress=False, trigger=experiments.default_trigger())

    monkeypatch.setattr(lecture, "load_splits", lambda name: (train, test))
    lab = lecture.start("99_test", results_dir=tmp_path / "results", cache_dir=tmp_path / "models")
    calls = []
    def work(size, scale):
        calls.append(size)
        return {"pixels": torch.full((size,), scale)}
    assert torch.equal(lab.cached("work", work, size=3, scale=0.5)["pixels"], torch.full((3,), 0.5))
    lab.cached("work", work, size=3, scale=0.5)
    lab.cached("work", work, size=4, scale=0.5)
    assert calls == [3, 4], "computed once per inputs"
    def helper(size):
        return size
    def work_with_helper(size):
        calls.append(helper(size))
        return size
    lab.cached("helped", work_with_helper, depends=(helper,), size=3)
    lab.cached("helped", work_with_helper, depends=(helper,), size=3)
    def helper(size):  # noqa: F811 - the helper edited: what it computes must be computed again
        return size * 10
    lab.cached("helped", work_with_helper, depends=(helper,), size=3)
    assert calls == [3, 4, 3, 30], "computed once per code, recomputed when a dependency's code changes"
    with pytest.raises(ValueError, match="name"):
        lab.cached("no such/name", work, size=3, scale=0.5)
