"""msyncext in a chroot: the mount that holds the root is one it cannot see.

/proc/self/mountinfo lists only the mounts that can be named from the
process's root, so in a chroot (a build root, the CI's Debian sid tree) the
mount that holds the root itself has no line. Before msyncext described
that mount from the root (mounts.c, add_hidden_root), every file in the
chroot was on "no mount shown": while any write-back failure was recorded,
every healthy flush there was refused, and MS_ASYNC started no write-out
for any of them (seen first as 38 failures of the suite in the sid chroot).

Each scenario runs in a fresh ``python -I`` child (blockdev.run_isolated),
which imports everything it needs and then chroots into a directory of the
test's own, with /proc mounted in it; the parent mounts and unmounts. Needs
root and MSYNCEXT_TEST_MOUNTS=1.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import blockdev
import pytest
import test_faults as faults
import test_record as record

PAGE = mmap.PAGESIZE
NPAGES = 64
WRITTEN_BOUND = 10.0  # s: far below the flusher's 30 s

# test_record's failing device: ext4 without a journal over a full tmpfs.
failing_ext4 = record.failing_ext4

pytestmark = [
    pytest.mark.skipif(
        not sys.platform.startswith("linux"), reason="chroot and /proc are Linux's here"
    ),
    record.needs_mounts,
]


def _chroot_dir(tmp_path: Path, on_overlay: bool) -> Iterator[str]:
    """A directory on the test's own disk (or inside an overlay mount made
    there), with /proc mounted in it."""
    if os.geteuid() != 0:
        pytest.skip("chroot(2) and mount(2) need root")
    reason = blockdev.cachestat_unavailable(str(tmp_path))
    if reason is not None:
        pytest.skip(reason)
    blockdev.refuse_unless_asked()
    with contextlib.ExitStack() as stack:
        base = tmp_path
        if on_overlay:
            for layer in ("lower", "upper", "work", "merged"):
                (tmp_path / layer).mkdir()
            options = (
                f"lowerdir={tmp_path}/lower,upperdir={tmp_path}/upper,"
                f"workdir={tmp_path}/work"
            )
            merged = str(tmp_path / "merged")
            blockdev._run("mount", "-t", "overlay", "overlay", "-o", options, merged)
            stack.callback(blockdev._run, "umount", merged)
            base = tmp_path / "merged"
        root = base / "root"
        (root / "proc").mkdir(parents=True)
        blockdev._run("mount", "-t", "proc", "proc", str(root / "proc"))
        stack.callback(blockdev._run, "umount", str(root / "proc"))
        yield str(root)


@pytest.fixture
def chroot_dir(tmp_path: Path) -> Iterator[str]:
    yield from _chroot_dir(tmp_path, on_overlay=False)


@pytest.fixture(params=["plain", "overlay"])
def any_chroot_dir(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    """A chroot on the disk's own file system, or inside an overlay (whose
    layers the chroot cannot see: the view is then the file)."""
    yield from _chroot_dir(tmp_path, on_overlay=request.param == "overlay")


def _enter(root: str) -> None:
    # stdin becomes a pipe: the child's own (a terminal, /dev/null) lies on
    # a mount that this chroot, with no /dev, does not show, and a
    # descriptor on a mount msyncext cannot see keeps the write-out from
    # starting at all (writeout_status says so). stdout and stderr are
    # run_isolated's pipes already.
    read_end, write_end = os.pipe()
    os.dup2(read_end, 0)
    os.close(read_end)
    os.close(write_end)
    os.chroot(root)
    os.chdir("/")
    with open("/proc/self/mountinfo") as f:
        shown = [line.split()[4] for line in f]
    # The premise: the root's own mount is not among the mounts shown.
    assert "/" not in shown, shown


def _new_map(path: str) -> tuple[int, mmap.mmap]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    os.ftruncate(fd, NPAGES * PAGE)
    return fd, mmap.mmap(fd, NPAGES * PAGE)


def _dirty(m: mmap.mmap) -> None:
    for offset in range(0, len(m), PAGE):
        m[offset] = (m[offset] + 1) & 0xFF


def _written_early(fd: int) -> str:
    deadline = time.monotonic() + WRITTEN_BOUND
    while (dirty := blockdev.cachestat(fd).dirty) != 0:
        if time.monotonic() > deadline:
            return f"{dirty} pages still dirty after {WRITTEN_BOUND:.0f} s"
        time.sleep(0.005)
    return "yes"


def child_the_record_in_a_chroot(failing: str, root: str) -> None:
    import msyncext

    fd, m, _ = faults._dirty_file(failing)
    first = faults._first_failure(m)
    _enter(root)
    hfd, healthy = _new_map("/healthy")
    healthy[:5] = b"fresh"
    seen = {
        "a healthy file's flush": record._outcome(lambda: msyncext.flush(healthy)),
        "its range": record._outcome(lambda: msyncext.flush(healthy, PAGE, 9)),
        "its clear": repr(msyncext.clear_writeback_error(healthy)),
        "the failed file's flush": record._outcome(lambda: msyncext.flush(m, 0, 1)),
    }
    refused = f"WritebackError({errno.errorcode[first]})"
    assert seen == {
        "a healthy file's flush": "ok",
        "its range": "ok",
        "its clear": "None",
        "the failed file's flush": refused,
    }, seen
    healthy.close()
    os.close(hfd)
    m.close()
    os.close(fd)


@faults.needs_loop
def test_a_healthy_file_in_a_chroot_flushes_while_a_failure_is_recorded(
    failing_ext4: object, any_chroot_dir: str
) -> None:
    """A failure is recorded for a file on the failing device, then the child
    enters the chroot: a file there is told apart from it (its mount is the
    root's, described from the root), and the failed map is still refused.
    The old code (ff35a85) refused the healthy file ("cannot see through an
    overlay mount"), on a plain file system and in an overlay alike."""
    assert isinstance(failing_ext4, blockdev.LoopFS)
    blockdev.run_isolated(
        "test_chroot",
        "child_the_record_in_a_chroot",
        f"{failing_ext4.mountpoint}/big",
        any_chroot_dir,
    )


def child_the_write_out_in_a_chroot(root: str) -> None:
    import msyncext

    _enter(root)
    fd, m = _new_map("/data")
    _dirty(m)
    msyncext.flush(m, flags=msyncext.MS_ASYNC)
    seen = {"MS_ASYNC: written early": _written_early(fd)}
    _dirty(m)
    msyncext.flush(m, evict=True)
    counts = blockdev.cachestat(fd)
    # Eviction is best effort under load (test_writeout.py): nothing dirty,
    # at most a sixteenth still cached.
    seen["evict=True: nothing dirty, little cached"] = (
        "yes" if counts.dirty == 0 and counts.cached <= NPAGES // 16 else str(counts)
    )
    assert seen == {
        "MS_ASYNC: written early": "yes",
        "evict=True: nothing dirty, little cached": "yes",
    }, seen
    m.close()
    os.close(fd)


def test_ms_async_starts_the_write_out_in_a_chroot(chroot_dir: str) -> None:
    """The write-out reaches a file on the root's mount from the root (the
    old code found no mount for it, and started nothing: all 64 pages still
    dirty 10 s later)."""
    blockdev.run_isolated("test_chroot", "child_the_write_out_in_a_chroot", chroot_dir)
