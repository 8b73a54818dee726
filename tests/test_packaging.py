"""The conda environment and pyproject.toml must list the same packages and bounds."""
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pyproject_requirements():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return set(project["dependencies"]).union(*project["optional-dependencies"].values())


def _environment_requirements():
    lines = (ROOT / "environment.yml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "- pip:")
    reqs = set()
    for line in lines[start + 1:]:
        item = re.match(r"\s+- (.+)", line)
        if item and item.group(1) != "-e .":
            reqs.add(item.group(1).strip())
    return reqs


def test_environment_yml_matches_pyproject():
    assert _environment_requirements() == _pyproject_requirements()


def test_torch_lower_bound_excludes_the_broken_cpu_wheel():
    torch_req = next(r for r in _pyproject_requirements() if r.startswith("torch>"))
    version = tuple(int(p) for p in re.search(r">=?\s*([\d.]+)", torch_req).group(1).split("."))
    assert version > (2, 13, 0)


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/kit.sh test" in readme and "bash scripts/kit.sh test" in ci
