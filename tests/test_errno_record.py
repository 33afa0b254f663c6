"""Every errno of a failed write-back is recorded, whatever its class.

Issue 14, point 4: the block layer reports failed writes as EIO and ENOSPC,
but also as EINVAL (BLK_STS_INVAL), ENOMEM (BLK_STS_RESOURCE) and EBUSY
(BLK_STS_DEV_RESOURCE), and a FUSE daemon or a network file system can
answer anything. msync reports the errno once, then 0 for the lost data.
After msyncext's own checks (an aligned start, valid flags, a pinned and
mapped range) msync has no bad-call reason left for EINVAL, nor for ENOMEM,
nor, without MS_INVALIDATE over locked pages, for EBUSY: so every one of
them raises WritebackError, and no later flush of that file succeeds until
clear_writeback_error.

Issue 20: MS_ASYNC's early write-out leaves FUSE files alone (closing a
FUSE descriptor makes the kernel write the file back and wait, send a
FLUSH, and clear the errors a later close() would report): their dirty
pages wait for the kernel, and the next MS_SYNC reports a failure as it
does for any file. (A write-out that msyncext starts never waits for or
checks its errors: test_side_effects.py.)

errfs (tests/errfs.py) is a FUSE passthrough whose WRITE (and FSYNC)
requests answer the errno a test chooses; its daemon runs in its own
process. Each scenario runs in a child (the record is per process).
"""

from __future__ import annotations

import errno
import mmap
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from errfs import ErrFS, errfs, errfs_unavailable

PAGE = mmap.PAGESIZE
NPAGES = 8

needs_errfs = pytest.mark.skipif(
    errfs_unavailable() is not None, reason=errfs_unavailable() or ""
)

# The classes the record once took for bad calls, and ordinary ones.
ERRNOS = ("EINVAL", "ENOMEM", "EBUSY", "EINTR", "EIO", "ENOSPC", "EDQUOT", "EROFS")


@pytest.fixture
def fs(tmp_path: Path) -> Iterator[ErrFS]:
    with errfs(tmp_path / "errfs") as mounted:
        yield mounted


def _run(fs: ErrFS, function: str, *args: str) -> None:
    fs.run_isolated("test_errno_record", function, str(fs.directory), *args)


def _map(fs: ErrFS, name: str) -> tuple[int, mmap.mmap, Path]:
    fd = os.open(fs.mountpoint / name, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    os.ftruncate(fd, NPAGES * PAGE)
    os.fsync(fd)
    m = mmap.mmap(fd, NPAGES * PAGE)
    m.madvise(mmap.MADV_RANDOM)
    return fd, m, fs.backing / name


def _backing(path: Path, page: int, length: int) -> bytes:
    with path.open("rb") as f:
        return os.pread(f.fileno(), length, page * PAGE)


# --------------------------------------------------------------------------
# The children


def child_every_errno_is_recorded(directory: str, name: str) -> None:
    import msyncext

    fs = ErrFS(Path(directory))
    err = getattr(errno, name)
    fd, m, backing = _map(fs, "data.bin")
    second = mmap.mmap(fd, 2 * PAGE)  # another map of the file, made before
    # Writes fail, FSYNC answers 0: what is left to see is the kernel's
    # once-per-file report of the failed WRITE.
    fs.fail_writes(name, fsync=False)
    m[PAGE : PAGE + 5] = b"lost!"
    with pytest.raises(msyncext.WritebackError) as info:
        msyncext.flush(m)
    assert info.value.errno == err, repr(info.value)
    assert _backing(backing, 1, 5) == bytes(5), "the daemon never took the data"
    # The kernel says 0 from now on; msyncext never does, for any map of it.
    for call in (
        lambda: msyncext.flush(m),
        lambda: msyncext.flush(m, PAGE, 1),
        lambda: msyncext.flush(second),
        lambda: msyncext.flush_ranges(m, [(0, 1), (5 * PAGE, 3)]),
        lambda: msyncext.flush(m, flags=msyncext.MS_SYNC | msyncext.MS_INVALIDATE),
        lambda: msyncext.flush(m, flags=msyncext.MS_ASYNC),
    ):
        for _ in range(3):
            with pytest.raises(msyncext.WritebackError) as info:
                call()
            assert info.value.errno == err, repr(info.value)
    # The caller rewrites from its own copy once the file system is healthy,
    # then acknowledges: the next flush reaches msync and succeeds.
    fs.heal()
    m[PAGE : PAGE + 5] = b"again"
    assert msyncext.clear_writeback_error(m) == err
    assert msyncext.clear_writeback_error(second) is None
    msyncext.flush(m)
    assert _backing(backing, 1, 5) == b"again"
    msyncext.flush(second)
    second.close()
    m.close()
    os.close(fd)


def child_failed_fsync_is_recorded(directory: str) -> None:
    import msyncext

    # FSYNC failing, WRITE fine: the data reached the daemon, but the file
    # system did not say it is durable. msync reports it every time; msyncext
    # records it all the same (the first errno, until cleared).
    fs = ErrFS(Path(directory))
    fd, m, _ = _map(fs, "fsync.bin")
    fs.fail_fsync("EIO")
    m[0:4] = b"data"
    with pytest.raises(msyncext.WritebackError) as info:
        msyncext.flush(m, 0, 4)
    assert info.value.errno == errno.EIO
    fs.heal()
    with pytest.raises(msyncext.WritebackError):
        msyncext.flush(m, 0, 4)
    assert msyncext.clear_writeback_error(m) == errno.EIO
    msyncext.flush(m, 0, 4)
    m.close()
    os.close(fd)


def child_ms_async_leaves_fuse_files_to_the_kernel(directory: str) -> None:
    import msyncext

    fs = ErrFS(Path(directory))
    fd, m, backing = _map(fs, "async.bin")
    fs.fail_writes("EIO", fsync=False)
    m[2 * PAGE : 2 * PAGE + 4] = b"gone"
    before = len(fs.events())
    msyncext.flush(m, 2 * PAGE, 4, flags=msyncext.MS_ASYNC)
    # On today's main msyncext's thread opens, writes out and closes the
    # file: the daemon sees a WRITE (answered EIO) and a FLUSH. Nor may the
    # thread make its own descriptor table while this process holds a FUSE
    # descriptor below 64 (the kernel copies those and closes the copies,
    # and each close of a FUSE file writes it back and sends a FLUSH).
    time.sleep(1.0)
    assert fs.events()[before:] == [], fs.events()[before:]
    state, why = msyncext._msync.writeout_status()
    assert (state, f"descriptor {fd} is on a file system") == (
        "unavailable",
        why[: len(f"descriptor {fd} is on a file system")],
    ), why
    # The failure comes with the MS_SYNC that writes the page, and stays.
    with pytest.raises(msyncext.WritebackError) as info:
        msyncext.flush(m)
    assert info.value.errno == errno.EIO
    assert _backing(backing, 2, 4) == bytes(4)
    with pytest.raises(msyncext.WritebackError):
        msyncext.flush(m, 0, 1, flags=msyncext.MS_ASYNC)
    fs.heal()
    m[2 * PAGE : 2 * PAGE + 4] = b"back"
    assert msyncext.clear_writeback_error(m) == errno.EIO
    msyncext.flush(m)
    assert _backing(backing, 2, 4) == b"back"
    m.close()
    os.close(fd)


# --------------------------------------------------------------------------
# The tests


@needs_errfs
@pytest.mark.parametrize("name", ERRNOS)
def test_every_errno_of_a_failed_write_back_is_recorded(fs: ErrFS, name: str) -> None:
    """Issue 14, point 4: EINVAL, ENOMEM, EBUSY were once taken for bad calls
    (a plain OSError once, then success for data the daemon never took)."""
    _run(fs, "child_every_errno_is_recorded", name)


def child_every_errno_without_openat2(directory: str, name: str) -> None:
    import test_side_effects

    test_side_effects.refuse_openat2()
    child_every_errno_is_recorded(directory, name)


@needs_errfs
def test_a_fuse_failure_is_cleared_without_openat2(fs: ErrFS) -> None:
    """Without openat2 (kernels before 5.6, QEMU's user mode: here a seccomp
    filter answers ENOSYS), the FUSE file's handle is still had by walking
    to it name by name, so clearing the failed file forgets it. Without
    that walk the file had no handle: the entry stayed, unsure, and a clear
    of the second map returned the errno again (the aarch64 run)."""
    import test_side_effects

    reason = test_side_effects.seccomp_unavailable()
    if reason is not None:
        pytest.skip(reason)
    _run(fs, "child_every_errno_without_openat2", "EIO")


@needs_errfs
def test_a_failed_fsync_is_recorded(fs: ErrFS) -> None:
    _run(fs, "child_failed_fsync_is_recorded")


@needs_errfs
def test_ms_async_leaves_fuse_files_to_the_kernel(fs: ErrFS) -> None:
    """Issue 20: no early write-out of FUSE files; the next MS_SYNC reports a
    failed write and the record keeps it (on today's main the thread's WRITE
    and FLUSH reach the daemon within the second)."""
    _run(fs, "child_ms_async_leaves_fuse_files_to_the_kernel")
