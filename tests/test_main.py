"""``python -m msyncext [PATH]``: the diagnostic for bug reports."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import pytest

import msyncext
from msyncext import _msync


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # -I and an empty working directory: the installed package, not the
    # source folder (which has no compiled module).
    run_dir = tmp_path / "cwd"
    run_dir.mkdir(exist_ok=True)
    return subprocess.run(
        [sys.executable, "-I", "-m", "msyncext", *args],
        cwd=run_dir,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _fields(stdout: str) -> dict[str, str]:
    rows = (
        re.match(r"^(\S[^:]*|  [^:]+):\s+(.*)$", line) for line in stdout.splitlines()
    )
    return {m[1].strip(): m[2] for m in rows if m}


def test_without_a_path(tmp_path: Path) -> None:
    done = _run(tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    got = _fields(done.stdout)
    assert got["msyncext"] == f"{msyncext.__version__} ({_msync.BUILD_MODE} build)"
    assert got["extension"] == _msync.__file__
    assert sys.version.split()[0] in got["python"]
    assert got["PAGESIZE"] == str(msyncext.PAGESIZE)
    # The child imported nothing that needs the GIL: off on free-threaded
    # builds unless PYTHON_GIL=1 turns it on.
    free_threaded = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))
    gil_now = not free_threaded or os.environ.get("PYTHON_GIL") == "1"
    build = "free-threaded build" if free_threaded else "GIL build"
    assert got["threading"] == f"{build}, GIL {'on' if gil_now else 'off'} now"
    assert os.uname().release in got["platform"]
    for value in msyncext.VALID_FLAGS:
        assert f"({value})" in got["VALID_FLAGS"]
    assert "MS_SYNC (" in got["VALID_FLAGS"]
    assert got["write-back failures"].startswith(_msync.writeback_tracking())


def _digest(path: Path) -> tuple[str, int]:
    return hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns


def test_with_a_path_times_flushes_and_writes_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data.bin"
    data.write_bytes(os.urandom(3 * msyncext.PAGESIZE + 5))
    before = _digest(data)
    done = _run(tmp_path, str(data))
    assert done.returncode == 0, done.stderr
    got = _fields(done.stdout)
    assert got["file"] == f"{data} ({3 * msyncext.PAGESIZE + 5} bytes, 4 pages)"
    if os.path.exists("/proc/self/mountinfo"):
        # In a chroot (the CI matrix's) the mount that holds the file may lie
        # outside the root, and mountinfo does not show it: said so, then.
        assert ", mounted at /" in got["file system"] or got["file system"] == (
            "unknown (no mount in /proc/self/mountinfo holds it)"
        ), got["file system"]
    for row in ("first flush", "one page", "whole map"):
        assert re.match(r"\d+\.\d µs", got[row]), (row, done.stdout)
    assert "not writable" not in done.stdout
    assert _digest(data) == before


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: None, "cannot open {}: No such file or directory"),
        (lambda p: p.write_bytes(b""), "{} is empty: there is nothing to map"),
        (lambda p: p.mkdir(), "cannot open {}: Is a directory"),
    ],
    ids=["missing", "empty", "directory"],
)
def test_a_path_that_cannot_be_mapped(
    tmp_path: Path, make: object, message: str
) -> None:
    target = tmp_path / "target"
    assert callable(make)
    make(target)
    done = _run(tmp_path, str(target))
    assert done.returncode == 2
    # Nothing of the report before the error, and the error names the path.
    assert done.stdout == ""
    assert done.stderr.startswith("python -m msyncext: error: ")
    assert message.format(target) in done.stderr
    # Nothing was made.
    if message.startswith("cannot open {}: No such"):
        assert not target.exists()


def test_not_a_regular_file(tmp_path: Path) -> None:
    done = _run(tmp_path, os.devnull)
    assert done.returncode == 2
    assert f"{os.devnull} is not a regular file" in done.stderr


@contextlib.contextmanager
def _immutable(path: Path) -> Iterator[None]:
    """``chattr +i``: not even root may open it for writing (or skip)."""
    if shutil.which("chattr") is None or os.geteuid() != 0:
        pytest.skip("needs root and chattr to make a file unwritable for root")
    done = subprocess.run(
        ["chattr", "+i", str(path)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        pytest.skip(f"chattr +i refused here: {done.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_a_file_it_may_not_write_is_still_timed_and_says_so(tmp_path: Path) -> None:
    data = tmp_path / "data.bin"
    data.write_bytes(b"x" * 100)
    with _immutable(data):
        done = _run(tmp_path, str(data))
    assert done.returncode == 0, done.stderr
    assert "not writable" in done.stdout
    assert "one page:" in done.stdout
