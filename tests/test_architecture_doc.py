"""docs/architecture.md names every module of the project: each ``.py`` file under fd_onestep/, pipelines/,
train_scripts/ and benchmarks/ has its own table row (its path in backticks, then one line on what it is)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULE_FOLDERS = ("fd_onestep", "pipelines", "train_scripts", "benchmarks")


def _documented_rows() -> dict[str, str]:
    rows = {}
    for line in (ROOT / "docs" / "architecture.md").read_text().splitlines():
        match = re.match(r"^\| `([^`]+)` \| (.+) \|$", line)
        if match:
            rows[match.group(1)] = match.group(2).strip()
    return rows


def test_every_module_has_its_own_line_in_the_architecture_page():
    modules = sorted(str(path.relative_to(ROOT)) for folder in MODULE_FOLDERS for path in (ROOT / folder).rglob("*.py")
                     if "assets" not in path.parts and "__pycache__" not in path.parts)
    rows = _documented_rows()
    missing = [m for m in modules if m not in rows]
    assert not missing, f"docs/architecture.md has no row for {missing}: add one line each (| `path` | what |)"
    assert all(rows[m] for m in modules)


def test_the_architecture_page_names_no_module_that_is_gone():
    gone = [path for path in _documented_rows() if path.endswith(".py") and not (ROOT / path).is_file()]
    assert not gone, f"docs/architecture.md names modules that do not exist: {gone}"
