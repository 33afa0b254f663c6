"""The documentation's code runs as written.

Every ```python block of README.md, and every program in docs/recipes/, runs
in a fresh interpreter (this one, isolated, warnings as errors) from an empty
directory, and must exit 0. Blocks that are not meant to run (signatures, a
session) are fenced ```text. The recipes must also print something and leave
no file behind. When the tests run from somewhere without the documents (a
wheel's test run elsewhere), these tests skip.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import NUMPY_MISSING, np

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
RECIPES = ROOT / "docs" / "recipes"
TIMEOUT = 120  # seconds per program; each takes well under one here

# A fence opens at the start of a line with ```python and closes at the next
# line that is only ```.
PYTHON_BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)


def readme_blocks() -> list[object]:
    if not README.is_file():
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"no {README}"))]
    text = README.read_text(encoding="utf-8")
    return [
        pytest.param(m[1], id=f"README.md:{text.count(chr(10), 0, m.start()) + 1}")
        for m in PYTHON_BLOCK.finditer(text)
    ]


def recipes() -> list[object]:
    found = sorted(RECIPES.glob("*.py"))
    if not found:
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"no {RECIPES}"))]
    return [pytest.param(p, id=p.name) for p in found]


def skip_if_it_needs_missing_numpy(code: str) -> None:
    """Code that imports numpy skips where numpy is not installed."""
    if np is None and re.search(r"^\s*(import|from) numpy\b", code, re.M):
        pytest.skip(NUMPY_MISSING)


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run this Python, isolated from the source folder, in ``cwd``."""
    env = {**os.environ, "TMPDIR": str(cwd)}  # temporary files land in cwd too
    return subprocess.run(
        [sys.executable, "-I", "-W", "error", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def test_readme_has_python_blocks() -> None:
    """The quickstart at least: a fence typo would otherwise skip every block."""
    if not README.is_file():
        pytest.skip(f"no {README}")
    assert PYTHON_BLOCK.search(README.read_text(encoding="utf-8"))


@pytest.mark.parametrize("code", readme_blocks())
def test_readme_block_runs(code: str, tmp_path: Path) -> None:
    skip_if_it_needs_missing_numpy(code)
    done = run(["-c", code], tmp_path)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n--- code:\n{code}"


@pytest.mark.parametrize("recipe", recipes())
def test_recipe_runs(recipe: Path, tmp_path: Path) -> None:
    skip_if_it_needs_missing_numpy(recipe.read_text(encoding="utf-8"))
    done = run([str(recipe)], tmp_path)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    assert done.stdout.strip(), "a recipe says what it did"
    assert not list(tmp_path.iterdir()), "a recipe cleans up after itself"
