"""docs/benchmarks.md: every table made from a saved JSON output says what that output says."""
import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bench_table", ROOT / "scripts" / "bench_table.py")
bench_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_table)


def test_every_generated_table_matches_its_json():
    text, drifted = bench_table.regenerate(ROOT / "docs" / "benchmarks.md")
    assert drifted == [], f"regenerate with: python scripts/bench_table.py --write docs/benchmarks.md ({drifted})"
    assert text.count("<!-- table: ") >= 3


def test_a_changed_figure_is_caught(tmp_path, monkeypatch):
    saved = tmp_path / "docs" / "benchmarks"
    saved.mkdir(parents=True)
    run = json.loads((ROOT / "docs" / "benchmarks" / "bench-poison-2026-11-23.json").read_text())
    (saved / "poison.json").write_text(json.dumps(run))
    doc = tmp_path / "doc.md"
    doc.write_text("<!-- table: docs/benchmarks/poison.json -->\n<!-- end table -->\n")
    monkeypatch.setattr(bench_table, "ROOT", tmp_path)
    written, _ = bench_table.regenerate(doc)
    assert f"| speedup | {run['speedup']} |" in written
    doc.write_text(written.replace(f"| speedup | {run['speedup']} |", "| speedup | 100.0 |"))
    assert bench_table.regenerate(doc)[1] == ["docs/benchmarks/poison.json"]
    assert bench_table.main(["--check", str(doc)]) == 1
