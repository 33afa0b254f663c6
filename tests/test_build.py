"""The build: switching MSYNCEXT_DEBUG always rebuilds; -Werror only on request.

Builds the source tree beside this directory (a repository checkout or an
unpacked sdist) with ``setup.py build`` in a temporary copy, three times
in a row sharing one build/ directory, and loads each result to ask it
which mode it was compiled in.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    not (ROOT / "setup.py").is_file() or not (ROOT / "csrc").is_dir(),
    reason="the source tree is not beside the tests",
)


def _build(src: Path, **env: str) -> tuple[str, str]:
    """Build in src with env; returns (BUILD_MODE of the result, build log)."""
    done = subprocess.run(
        [sys.executable, "setup.py", "build"],
        cwd=src,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (built,) = src.glob("build/lib*/msyncext/_msync*.so")
    probe = (
        "import importlib.util, sys\n"
        "name, path = 'msyncext._msync', sys.argv[1]\n"
        "spec = importlib.util.spec_from_file_location(name, path)\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "print(module.BUILD_MODE)\n"
    )
    mode = subprocess.run(
        [sys.executable, "-I", "-c", probe, str(built)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.strip()
    return mode, done.stdout + done.stderr


def test_switching_debug_mode_always_rebuilds(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src)
    for name in ("csrc", "msyncext"):
        shutil.copytree(ROOT / name, src / name)
    mode, log = _build(src, MSYNCEXT_DEBUG="0", MSYNCEXT_WERROR="0")
    assert mode == "release"
    assert "-Werror" not in log  # users' builds never fail on a new warning
    assert "-O0" not in log
    mode, log = _build(src, MSYNCEXT_DEBUG="1", MSYNCEXT_WERROR="1")
    assert mode == "debug"
    assert "-Werror" in log
    assert "-O0" in log
    mode, _ = _build(src, MSYNCEXT_DEBUG="0")
    assert mode == "release"
