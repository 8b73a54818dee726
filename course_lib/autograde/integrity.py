"""An integrity report for the instructor: hand-ins that look copied. Reported, never penalized.

The grader certifies what each hand-in does, not who wrote it; two students who hand in the
same model and the same triggers both earn full marks. After each class run the class command
therefore compares the hand-ins with each other and lists, for the instructor to look at:

- model files that are byte for byte identical (SHA-256);
- models within :data:`COPY_DISTANCE` of another student's, in the zoo check's measure (the
  relative L2 distance of their parameters, :func:`course_lib.zoo.relative_distance`): a copy
  that was trained a little further, or had noise added, is still that close, while two
  honest students' models trained from the homework's fixed initialization are not
  (``python scripts/homework.py bench-integrity`` measures how far apart they are);
- trigger code that is the same program (the same syntax tree: renamed comments, blank lines
  and spacing do not hide a copy), unless it is the released skeleton itself.

Nothing here changes a grade: a pair may be two students who worked together as allowed.
"""
from __future__ import annotations

import ast
import hashlib
import itertools
from pathlib import Path

import torch
from safetensors.torch import load_file

COPY_DISTANCE = 0.05
TRIGGER_CELL = "p1-triggers"
MODEL_FILE = "backdoor_model.safetensors"


def model_parameters(path: Path) -> dict | None:
    """A handed-in model's tensors (plain data, no code), or None if it is not a readable file."""
    try:
        return {k: v.float() for k, v in load_file(str(path)).items() if v.is_floating_point()}
    except Exception:
        return None


def relative_distances(models: dict) -> dict:
    """{(a, b): ||w_a - w_b|| / ||w_b||} for every pair of models with the same tensors, computed
    from one Gram matrix (a class of hundreds stays one matrix product)."""
    groups: dict = {}
    for student, weights in models.items():
        shape = tuple((k, tuple(v.shape)) for k, v in sorted(weights.items()))
        groups.setdefault(shape, []).append(student)
    distances = {}
    for shape, students in groups.items():
        if len(students) < 2:
            continue
        matrix = torch.stack([torch.cat([models[s][k].flatten() for k, _ in shape]) for s in students])
        gram = (matrix @ matrix.T).double()
        norms = gram.diagonal()
        squared = (norms[:, None] + norms[None, :] - 2 * gram).clamp(min=0)
        for i, j in itertools.combinations(range(len(students)), 2):
            distances[(students[i], students[j])] = (squared[i, j].sqrt() / norms[j].sqrt()).item()
    return distances


def code_fingerprint(source: str) -> str | None:
    """The syntax tree of a cell's code, hashed (None for code that does not parse)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    for node in ast.walk(tree):      # docstrings are prose, not the program
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module)) and node.body \
                and isinstance(node.body[0], ast.Expr) and isinstance(getattr(node.body[0], "value", None),
                                                                       ast.Constant):
            node.body = node.body[1:] or [ast.Pass()]
    return hashlib.sha256(ast.dump(tree).encode()).hexdigest()


def cell_source(nb, grade_id: str) -> str | None:
    for cell in nb.cells if nb is not None else []:
        if cell.get("metadata", {}).get("nbgrader", {}).get("grade_id") == grade_id:
            return cell.source
    return None


def report(model_files: dict, part1_notebooks: dict, released_part1=None, *,
           threshold: float = COPY_DISTANCE) -> list[str]:
    """The report's lines: ``model_files`` {student: path}, ``part1_notebooks`` {student:
    sanitized Part 1 notebook}, ``released_part1`` the released notebook (its skeleton is not a copy)."""
    lines = []
    hashes: dict = {}
    for student, path in sorted(model_files.items()):
        if Path(path).is_file():
            hashes.setdefault(hashlib.sha256(Path(path).read_bytes()).hexdigest(), []).append(student)
    identical = {tuple(group) for group in hashes.values() if len(group) > 1}
    for group in sorted(identical):
        lines.append(f"identical model files: {', '.join(group)}")
    models = {s: w for s, p in sorted(model_files.items()) if (w := model_parameters(Path(p))) is not None}
    for (a, b), distance in sorted(relative_distances(models).items()):
        if distance < threshold and not any(a in g and b in g for g in identical):
            lines.append(f"models {distance:.4f} apart (relative L2; honest models are farther than "
                         f"{threshold}): {a}, {b}")
    skeleton = code_fingerprint(cell_source(released_part1, TRIGGER_CELL) or "") if released_part1 else None
    triggers: dict = {}
    for student, nb in sorted(part1_notebooks.items()):
        fingerprint = code_fingerprint(cell_source(nb, TRIGGER_CELL) or "")
        if fingerprint is not None and fingerprint != skeleton:
            triggers.setdefault(fingerprint, []).append(student)
    for group in triggers.values():
        if len(group) > 1:
            lines.append(f"the same trigger code: {', '.join(group)}")
    return lines
