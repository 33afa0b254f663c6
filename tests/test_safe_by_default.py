"""Tests that mount file systems or attach loop devices run only when asked.

Being root is not asking: such a test changes the machine (briefly), so it
runs only with MSYNCEXT_TEST_MOUNTS=1 (.ci/run sets it) and otherwise skips
saying how to run it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import blockdev
import pytest

TESTS = Path(__file__).resolve().parent
HOW = "set MSYNCEXT_TEST_MOUNTS=1 to run tests that mount file systems (needs root)"
# Every test module that uses a way to mount (the helpers of blockdev,
# powercut and errfs, or the tools themselves), found by its text so that a
# new one is checked too.
MOUNTING = re.compile(r'blockdev\.tmpfs|loop_ext4|powercut|errfs|"mount"|losetup|mkfs')
MOUNTING_MODULES = sorted(
    p.name
    for p in TESTS.glob("test_*.py")
    if p.name != Path(__file__).name and MOUNTING.search(p.read_text())
)
assert {"test_crash.py", "test_durability.py", "test_faults.py"} <= {*MOUNTING_MODULES}


def _mount_points_under(directory: Path) -> list[str]:
    """Mount points below ``directory`` (other processes may mount elsewhere)."""
    try:
        with open("/proc/self/mountinfo") as f:
            points = [line.split()[4] for line in f]
    except OSError:
        return []
    # Field 5 escapes space, tab, newline and backslash in octal.
    decoded = (p.encode().decode("unicode_escape") for p in points)
    return [p for p in decoded if p.startswith(f"{directory}/")]


@pytest.mark.parametrize("value", [None, "", "0", "yes"])
def test_only_1_asks(monkeypatch: pytest.MonkeyPatch, value: str | None) -> None:
    if value is None:
        monkeypatch.delenv(blockdev.MOUNTS_VARIABLE, raising=False)
    else:
        monkeypatch.setenv(blockdev.MOUNTS_VARIABLE, value)
    assert blockdev.mounts_not_asked() == HOW
    with pytest.raises(RuntimeError, match="without checking its gate"):
        blockdev.refuse_unless_asked()
    monkeypatch.setenv(blockdev.MOUNTS_VARIABLE, "1")
    assert blockdev.mounts_not_asked() is None


def test_mounting_tests_skip_unless_asked(tmp_path: Path) -> None:
    # The modules that mount, run as a user would: nothing asked, so every
    # test that mounts skips with the reason (the helpers that mount refuse
    # to, unasked). Their temporary directories, and so their mount points,
    # are below tmp_path: nothing may be left mounted there.
    env = {k: v for k, v in os.environ.items() if k != blockdev.MOUNTS_VARIABLE}
    env["TMPDIR"] = str(tmp_path / "tmp")
    (tmp_path / "tmp").mkdir()
    (tmp_path / "run").mkdir()
    done = subprocess.run(
        [
            sys.executable, "-Im", "pytest", "-p", "no:cacheprovider", "-q", "-rs",
            *(str(TESTS / name) for name in MOUNTING_MODULES),
        ],
        cwd=tmp_path / "run",
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    mounted = _mount_points_under(tmp_path)
    assert not mounted, f"left mounted without being asked: {mounted}"
    skips = [line for line in done.stdout.splitlines() if line.startswith("SKIPPED")]
    assert skips, output
    for module in MOUNTING_MODULES:
        assert any(module in line and HOW in line for line in skips), (module, output)
