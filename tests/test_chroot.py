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
import test_side_effects as side

PAGE = mmap.PAGESIZE
NPAGES = 64

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
    # stdin becomes /dev/null, opened before the chroot: on the host's /dev,
    # a mount the chroot does not show (as for a CI job's stdin). A device
    # closes through its driver, whatever its file system, so it must not
    # keep the write-out from starting. stdout and stderr are pipes.
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.chroot(root)
    os.chdir("/")
    with open("/proc/self/mountinfo") as f:
        shown = [line.split()[4] for line in f]
    # The premise: the root's own mount is not among the mounts shown.
    assert "/" not in shown, shown


def _drain(m: mmap.mmap) -> None:
    """libc msync of the whole map until the kernel has nothing more to
    report (later write-back of the rest fails anew): from then on only
    msyncext's record can refuse a flush of this file."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.msync.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    address = ctypes.addressof(ctypes.c_char.from_buffer(m))
    quiet = 0
    for _ in range(100):
        if libc.msync(address, len(m), 4) == 0:  # MS_SYNC
            quiet += 1
            if quiet == 3:
                return
            time.sleep(0.2)
        else:
            quiet = 0
    raise AssertionError("the kernel kept reporting write-back errors")


def child_the_record_in_a_chroot(failing: str, root: str, kind: str) -> None:
    import msyncext

    fd, m, _ = faults._dirty_file(failing)
    first = faults._first_failure(m)
    _drain(m)
    _enter(root)
    hfd, healthy = side._new_map("/healthy", NPAGES)
    healthy[:5] = b"fresh"
    seen = {
        "a healthy file's flush": record._outcome(lambda: msyncext.flush(healthy)),
        "its range": record._outcome(lambda: msyncext.flush(healthy, PAGE, 9)),
    }
    msyncext.clear_writeback_error(healthy)
    seen["after clear_writeback_error(it)"] = record._outcome(
        lambda: msyncext.flush(healthy)
    )
    seen["the failed file's flush"] = record._outcome(lambda: msyncext.flush(m, 0, 1))
    refused = f"WritebackError({errno.errorcode[first]})"
    # Inside an overlay whose layers the chroot cannot see, a file may be
    # the real file of any failure: refused until cleared, file by file.
    before_clear = "ok" if kind == "plain" else refused
    assert seen == {
        "a healthy file's flush": before_clear,
        "its range": before_clear,
        "after clear_writeback_error(it)": "ok",
        "the failed file's flush": refused,
    }, seen
    healthy.close()
    os.close(hfd)
    m.close()
    os.close(fd)


@faults.needs_loop
def test_a_healthy_file_in_a_chroot_flushes_while_a_failure_is_recorded(
    failing_ext4: object, any_chroot_dir: str, request: pytest.FixtureRequest
) -> None:
    """A failure is recorded for a file on the failing device, then the child
    enters the chroot. On the disk's own file system a file there is told
    apart from it (its mount is the root's, described from the root), and
    the failed map is still refused. The old code (ff35a85) refused the
    healthy file ("cannot see through an overlay mount"). Inside an overlay
    the healthy file is refused until cleared: it may be the failed file
    (the next test)."""
    assert isinstance(failing_ext4, blockdev.LoopFS)
    kind = request.node.callspec.params["any_chroot_dir"]
    blockdev.run_isolated(
        "test_chroot",
        "child_the_record_in_a_chroot",
        f"{failing_ext4.mountpoint}/big",
        any_chroot_dir,
        kind,
    )


def child_a_failed_file_inside_an_overlay_chroot(root: str) -> None:
    import msyncext

    fd, m, _ = faults._dirty_file(os.path.join(root, "big"))
    first = faults._first_failure(m)
    _drain(m)
    _enter(root)
    fd2 = os.open("/big", os.O_RDWR)
    again = mmap.mmap(fd2, 4 * PAGE)
    seen = {
        "the failed map": record._outcome(lambda: msyncext.flush(m, 0, 1)),
        "a new map of /big": record._outcome(lambda: msyncext.flush(again)),
    }
    refused = f"WritebackError({errno.errorcode[first]})"
    assert seen == {"the failed map": refused, "a new map of /big": refused}, seen
    again.close()
    os.close(fd2)
    m.close()
    os.close(fd)


@faults.needs_loop
def test_a_failed_file_inside_an_overlay_chroot_stays_refused(
    failing_ext4: blockdev.LoopFS, tmp_path: Path
) -> None:
    """The overlay's upper layer is on the failing device, and the failed
    file is inside the chroot: its failure is recorded before the chroot,
    through the upper layer then in sight, as the upper file's. After the
    chroot the same file is seen only through the overlay, whose layers
    are out of sight: it must still be refused, through the failed map and
    a new one. (A version that took such a view for a file of its own
    reported both flushed: a false success.)"""
    if os.geteuid() != 0:
        pytest.skip("chroot(2) and mount(2) need root")
    blockdev.refuse_unless_asked()
    lower, merged = tmp_path / "lower", tmp_path / "merged"
    upper = Path(failing_ext4.mountpoint) / "upper"
    work = Path(failing_ext4.mountpoint) / "work"
    for directory in (lower, merged, upper, work):
        directory.mkdir()
    with contextlib.ExitStack() as stack:
        options = f"lowerdir={lower},upperdir={upper},workdir={work}"
        blockdev._run("mount", "-t", "overlay", "overlay", "-o", options, str(merged))
        stack.callback(blockdev._run, "umount", str(merged))
        root = merged / "root"
        (root / "proc").mkdir(parents=True)
        blockdev._run("mount", "-t", "proc", "proc", str(root / "proc"))
        stack.callback(blockdev._run, "umount", str(root / "proc"))
        blockdev.run_isolated(
            "test_chroot", "child_a_failed_file_inside_an_overlay_chroot", str(root)
        )


def child_the_write_out_in_a_chroot(root: str) -> None:
    import msyncext

    _enter(root)
    fd, m = side._new_map("/data", NPAGES)
    side._dirty(m)
    msyncext.flush(m, flags=msyncext.MS_ASYNC)
    seen = {"MS_ASYNC: written early": side._written_early(fd)}
    side._dirty(m)
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
