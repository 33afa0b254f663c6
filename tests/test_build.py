"""The build: switching MSYNCEXT_DEBUG always rebuilds; -Werror only on request.

Builds the source tree beside this directory (a repository checkout or an
unpacked sdist) with ``setup.py build`` in a temporary copy, three times
in a row sharing one build/ directory, and loads each result to ask it
which mode it was compiled in.
"""

from __future__ import annotations

import os
import shutil
import struct
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


def _section_names(path: Path) -> list[str] | None:
    """The section names of an ELF file; None for another format (Mach-O)."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF":
        return None
    order = "<" if data[5] == 1 else ">"
    # Where the 64-bit (or 32-bit) header and section headers keep the offsets.
    if data[4] == 2:
        word, shoff_at, counts_at, sh_offset_at = "Q", 0x28, 0x3A, 0x18
    else:
        word, shoff_at, counts_at, sh_offset_at = "I", 0x20, 0x2E, 0x10
    (shoff,) = struct.unpack_from(order + word, data, shoff_at)
    size, count, names_index = struct.unpack_from(order + "HHH", data, counts_at)
    names_header = shoff + names_index * size
    (strings,) = struct.unpack_from(order + word, data, names_header + sh_offset_at)
    names = []
    for i in range(count):
        (name,) = struct.unpack_from(order + "I", data, shoff + i * size)
        start = strings + name
        names.append(data[start : data.index(b"\0", start)].decode())
    return names


def _debug_sections(src: Path) -> list[str] | None:
    (built,) = src.glob("build/lib*/msyncext/_msync*.so")
    names = _section_names(built)
    if names is None:
        return None
    assert ".text" in names  # the reader works
    return [n for n in names if n.startswith((".debug_", ".zdebug_"))]


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
    # Release builds (the wheels) carry no debug information (ELF only:
    # a Mach-O object keeps it out of the module anyway).
    assert _debug_sections(src) in (None, [])
    mode, log = _build(src, MSYNCEXT_DEBUG="1", MSYNCEXT_WERROR="1")
    assert mode == "debug"
    assert "-Werror" in log
    assert "-O0" in log
    debug_sections = _debug_sections(src)
    assert debug_sections is None or ".debug_info" in debug_sections
    mode, _ = _build(src, MSYNCEXT_DEBUG="0")
    assert mode == "release"
