"""Faults: a device that fails writes, and what flush tells the caller.

The loop device's backing file lives on a tmpfs far smaller than the ext4
filesystem on it, so once the tmpfs is full every block the filesystem
writes fails at the device (the loop driver reports "no space").

What Linux does, observed here (6.18, ext4, data=ordered): write-back
errors are recorded in the file's address space as an errseq, each open
file description reports each new error once, and the failed pages are
marked clean. Plain msync calls in a row said ENOSPC, then EIO (ext4 fails
to convert the unwritten extents of the lost blocks), then 0 from then on
although the data never reached the device: PostgreSQL's "fsyncgate".

msyncext refuses to take part in that lie: the first write-back failure
raises WritebackError and is recorded for the file (by device and inode,
with the addresses of all its mappings in the process), and every later
flush of those mappings raises WritebackError with the first errno, without
calling msync, until clear_writeback_error(buf) acknowledges the loss.

The record is per process, so every scenario runs in a child process (a
crash there also fails one test instead of the run); the child asserts and
the parent builds and removes the devices, whatever the child does. The
children import this module by path (blockdev.run_isolated), so everything
they need is at module level here.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import mmap
import os
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import blockdev
import pytest

needs_loop = pytest.mark.skipif(
    blockdev.loop_unavailable() is not None,
    reason=f"fault-injection tests: {blockdev.loop_unavailable()}",
)

PAGE = mmap.PAGESIZE
FILE_BYTES = 32 << 20  # dirtied in full; the device can hold far less
MARK = 16  # bytes of random marker at the start of every page
RETRIES = 10
# What the kernel reports first for the lost blocks: the loop device's "no
# space", or the filesystem's EIO (or EROFS once ext4 has aborted its
# journal and remounted read-only).
WRITEBACK_ERRNOS = (errno.ENOSPC, errno.EIO, errno.EROFS)
MAP_FIXED_NOREPLACE = 0x100000  # Linux 4.17+; older kernels treat it as a hint


@pytest.fixture
def failing_fs() -> Iterator[blockdev.LoopFS]:
    # Every test that uses it is marked needs_loop; this catches one that is not.
    reason = blockdev.loop_unavailable()
    if reason is not None:
        pytest.skip(f"fault-injection tests: {reason}")
    # 64 MiB of ext4 over a 12 MiB tmpfs: mkfs needs a few MiB, then writes fail.
    with (
        blockdev.tmpfs("12m") as small,
        blockdev.loop_ext4(
            64, backing_dir=small, mount_options="errors=continue"
        ) as fs,
    ):
        yield fs


def _run(function: str, *args: str) -> None:
    blockdev.run_isolated("test_faults", function, *args, timeout=120)


# --------------------------------------------------------------------------
# Helpers for the children


def _dirty_file(path: str) -> tuple[int, mmap.mmap, list[str]]:
    """A shared map of a new FILE_BYTES file on the failing device, every
    page dirtied with a random marker (which the parent can look for on the
    device). Returns (fd, map, markers as hex)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, FILE_BYTES)
    m = mmap.mmap(fd, FILE_BYTES)
    markers = []
    for offset in range(0, FILE_BYTES, PAGE):
        marker = os.urandom(MARK)
        m[offset : offset + MARK] = marker
        markers.append(marker.hex())
    return fd, m, markers


def _healthy_map(directory: str, npages: int = 16) -> tuple[int, mmap.mmap]:
    """A shared map of a new file on a working filesystem, one page dirty."""
    path = os.path.join(directory, f"healthy-{os.getpid()}.bin")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    os.ftruncate(fd, npages * PAGE)
    m = mmap.mmap(fd, npages * PAGE)
    m[PAGE : PAGE + 5] = b"fresh"
    return fd, m


def _raises_writeback(call: Callable[[], object], first: int, what: str) -> str:
    """Run ``call``; assert it raised WritebackError with errno ``first``.
    Returns the message."""
    import msyncext

    with pytest.raises(msyncext.WritebackError) as info:
        call()
    assert info.value.errno == first, f"{what}: errno {info.value.errno}, not {first}"
    return str(info.value)


def _first_failure(m: Any) -> int:
    """The first flush of the dirty file: WritebackError, an OSError with the
    errno kept. Returns that errno."""
    import msyncext

    with pytest.raises(OSError, match="write-back of this file failed") as info:
        msyncext.flush(m)
    assert type(info.value) is msyncext.WritebackError, repr(info.value)
    assert info.value.errno in WRITEBACK_ERRNOS, repr(info.value)
    return info.value.errno


def _libc() -> ctypes.CDLL:
    libc = blockdev.c_library()
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = (
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    )
    libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    libc.mlock.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    libc.munlock.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    return libc


def _address(m: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(m))


def _flush_busy(m: mmap.mmap) -> None:
    """MS_INVALIDATE over the first page, which the caller has mlocked:
    msync itself fails with EBUSY, so an EBUSY proves msync was called."""
    import msyncext

    msyncext.flush(m, 0, 1, flags=msyncext.MS_SYNC | msyncext.MS_INVALIDATE)


# --------------------------------------------------------------------------
# The first failure, and every retry after it


def _first_flush_and_retries(path: str, how: str, out: str) -> None:
    import msyncext

    fd, m, markers = _dirty_file(path)
    if how == "flush":
        first = _first_failure(m)
    else:
        half = FILE_BYTES // 2
        with pytest.raises(msyncext.WritebackError) as info:
            msyncext.flush_ranges(m, [(0, half), (half + PAGE + 3, 5)], max_gap=0)
        assert info.value.errno in WRITEBACK_ERRNOS, repr(info.value)
        # The run that failed is named: the first of two (the ranges are a
        # page apart, more than max_gap=0 lets merge).
        assert f"buffer bytes [0, {half}), run 1 of 2" in str(info.value)
        first = info.value.errno
    message = ""
    # Linux would say success by the third call; every retry must raise, the
    # whole map and a batch alike, with the first failure's errno.
    for attempt in range(RETRIES):
        message = _raises_writeback(
            lambda: msyncext.flush(m), first, f"retry {attempt}"
        )
        _raises_writeback(
            lambda: msyncext.flush_ranges(m, [(0, PAGE), (FILE_BYTES - 1, 1)]),
            first,
            f"flush_ranges retry {attempt}",
        )
    # The message says what happened and how to get out of it.
    assert os.strerror(first) in message, message
    assert "before the failure" in message, message
    assert "may be lost" in message or "may not be on the device" in message, message
    assert "msyncext.clear_writeback_error(buf)" in message, message
    # Still alive and usable: the memory is there, and everything releases.
    assert m[0:MARK] == bytes.fromhex(markers[0])
    m.close()
    os.close(fd)
    with open(out, "w") as f:
        json.dump(markers, f)


@needs_loop
@pytest.mark.parametrize("how", ["flush", "flush_ranges"])
def test_first_failure_raises_writeback_error_and_every_retry_too(
    failing_fs: blockdev.LoopFS, how: str, tmp_path: Path
) -> None:
    out = tmp_path / "markers.json"
    _run("_first_flush_and_retries", f"{failing_fs.mountpoint}/big", how, str(out))
    markers = set(json.loads(out.read_text()))
    # The data really is lost: most pages never reached the device, so the
    # retries were right to raise.
    on_device = {block[:MARK].hex() for block in failing_fs.device_blocks()}
    assert len(on_device & markers) < len(markers) // 2


# --------------------------------------------------------------------------
# Every mapping of the failed file, and only of that file


def _every_view_of_the_file(path: str, healthy_dir: str) -> None:
    import numpy as np

    import msyncext

    fd, m, _ = _dirty_file(path)
    # Made before the failure: a second map of the same file through another
    # open file description (which the kernel would tell of the error
    # separately), a slice starting mid-page, and numpy.memmap views.
    fd2 = os.open(path, os.O_RDWR)
    m2 = mmap.mmap(fd2, 8 * PAGE, offset=4 * PAGE)
    view = memoryview(m)[PAGE + 3 : 5 * PAGE]
    array: Any = np.memmap(path, dtype=np.uint32, mode="r+", offset=2 * PAGE)
    hfd, healthy = _healthy_map(healthy_dir)

    first = _first_failure(m)
    victims: dict[str, Callable[[], object]] = {
        "a small range": lambda: msyncext.flush(m, 5, 1),
        "the last byte": lambda: msyncext.flush(m, FILE_BYTES - 1, 1),
        "a memoryview slice": lambda: msyncext.flush(view),
        "part of the slice": lambda: msyncext.flush(view, 10, 20),
        "a second map": lambda: msyncext.flush(m2),
        "a range of the second map": lambda: msyncext.flush(m2, PAGE, 1),
        "flush_ranges of the second map": lambda: msyncext.flush_ranges(
            m2, [(0, 1), (7 * PAGE, 9)]
        ),
        "a numpy.memmap": lambda: msyncext.flush(array),
        "a numpy view": lambda: msyncext.flush(array[1000:1010]),
        "flush_ranges of a numpy.memmap": lambda: msyncext.flush_ranges(
            array, [(0, 4)]
        ),
    }
    for what, call in victims.items():
        for _ in range(3):
            _raises_writeback(call, first, what)

    # Another file's map flushes as ever, and has nothing recorded.
    msyncext.flush(healthy)
    msyncext.flush(healthy, PAGE + 1, 2)
    assert msyncext.flush_ranges(healthy, [(0, 1), (PAGE, 1)], max_gap=0) == 1
    assert msyncext.clear_writeback_error(healthy) is None
    # ... and the failed file is still refused after it.
    _raises_writeback(lambda: msyncext.flush(m, 0, 1), first, "after healthy")

    victims.clear()
    view.release()
    for closing in (m, m2, healthy):
        closing.close()
    for descriptor in (fd, fd2, hfd):
        os.close(descriptor)


@needs_loop
def test_every_mapping_of_the_failed_file_raises_and_others_flush(
    failing_fs: blockdev.LoopFS, tmp_path: Path
) -> None:
    pytest.importorskip("numpy")  # numpy.memmap views among them
    _run("_every_view_of_the_file", f"{failing_fs.mountpoint}/big", str(tmp_path))


def _first_errno_is_kept(path: str) -> None:
    import msyncext

    fd, m, _ = _dirty_file(path)
    first = _first_failure(m)
    # A map made after the failure is not in the record, so its flush reaches
    # msync, which reports the error the kernel still holds for this open
    # file (ext4's EIO here, after the device's ENOSPC). The caller hears of
    # the first failure, not the latest.
    late = mmap.mmap(fd, 4 * PAGE)
    _raises_writeback(lambda: msyncext.flush(late), first, "a map made after it")
    # It is part of the record from then on, like every older map.
    for _ in range(3):
        _raises_writeback(lambda: msyncext.flush(late, 1, 1), first, "again")
        _raises_writeback(lambda: msyncext.flush(m), first, "the failed map")
    late.close()
    m.close()
    os.close(fd)


@needs_loop
def test_the_first_errno_is_kept_when_the_kernel_reports_another(
    failing_fs: blockdev.LoopFS,
) -> None:
    _run("_first_errno_is_kept", f"{failing_fs.mountpoint}/big")


# --------------------------------------------------------------------------
# Bad calls, and clearing


def _bad_call_then_clear(path: str) -> None:
    import msyncext

    libc = _libc()
    fd, m, _ = _dirty_file(path)
    address = _address(m)
    assert libc.mlock(address, PAGE) == 0, os.strerror(ctypes.get_errno())
    try:
        # A bad call is a plain OSError, and it records nothing: the next
        # flush still reaches msync and hears of the real failure.
        for _ in range(2):
            with pytest.raises(OSError, match="busy") as info:
                _flush_busy(m)
            assert type(info.value) is OSError, repr(info.value)
            assert info.value.errno == errno.EBUSY, repr(info.value)
            assert msyncext.clear_writeback_error(m) is None
        first = _first_failure(m)

        # While the failure is recorded the same call never reaches msync
        # (which would say EBUSY): refused with the failure instead.
        _raises_writeback(lambda: _flush_busy(m), first, "refused")
        # Clearing returns the errno it forgot, once.
        assert msyncext.clear_writeback_error(memoryview(m)[7:9]) == first
        assert msyncext.clear_writeback_error(m) is None
        # Now the next flush reaches msync: the kernel's EBUSY comes back.
        with pytest.raises(OSError, match="busy") as info:
            _flush_busy(m)
        assert type(info.value) is OSError, f"still refused: {info.value!r}"
        assert info.value.errno == errno.EBUSY, repr(info.value)
    finally:
        libc.munlock(address, PAGE)

    # The caller rewrites the data from its own copy; the device is still
    # full, so msync reports a fresh failure, and it is recorded anew.
    for offset in range(0, FILE_BYTES, PAGE):
        m[offset : offset + MARK] = os.urandom(MARK)
    again = _first_failure(m)
    _raises_writeback(lambda: msyncext.flush(m, 0, 1), again, "the new failure")
    assert msyncext.clear_writeback_error(m) == again
    m.close()
    os.close(fd)


@needs_loop
def test_bad_call_records_nothing_and_clear_lets_msync_run_again(
    failing_fs: blockdev.LoopFS,
) -> None:
    _run("_bad_call_then_clear", f"{failing_fs.mountpoint}/big")


# --------------------------------------------------------------------------
# A new mapping at a failed mapping's addresses


def _address_reuse(path: str, healthy_dir: str) -> None:
    import msyncext

    libc = _libc()
    fd, m, _ = _dirty_file(path)
    other = mmap.mmap(fd, PAGE)  # keeps the failed file mapped elsewhere
    first = _first_failure(m)
    address = _address(m)
    m.close()

    npages = 8
    hpath = os.path.join(healthy_dir, "reuses-the-address.bin")
    hfd = os.open(hpath, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    os.ftruncate(hfd, npages * PAGE)
    got = libc.mmap(
        address,
        npages * PAGE,
        mmap.PROT_READ | mmap.PROT_WRITE,
        mmap.MAP_SHARED | MAP_FIXED_NOREPLACE,
        hfd,
        0,
    )
    assert got == address, (
        f"mmap at {address:#x} gave {got!r}: {os.strerror(ctypes.get_errno())}"
    )
    try:
        buf = memoryview((ctypes.c_char * (npages * PAGE)).from_address(got)).cast("B")
        buf[3 * PAGE] = 7
        # Same addresses as the failed map, another file: flushed for real.
        msyncext.flush(buf)
        msyncext.flush(buf, 3 * PAGE, 1)
        assert msyncext.flush_ranges(buf, [(0, 1), (5 * PAGE, 1)], max_gap=0) == 2
        assert msyncext.clear_writeback_error(buf) is None
        buf.release()
    finally:
        libc.munmap(got, npages * PAGE)
    os.close(hfd)
    # The failed file itself is still refused.
    _raises_writeback(lambda: msyncext.flush(other), first, "the failed file")
    other.close()
    os.close(fd)


@needs_loop
def test_a_new_mapping_at_a_failed_mappings_address_flushes(
    failing_fs: blockdev.LoopFS, tmp_path: Path
) -> None:
    _run("_address_reuse", f"{failing_fs.mountpoint}/big", str(tmp_path))


# --------------------------------------------------------------------------
# Threads, and subinterpreters


def _two_threads(path: str) -> None:
    import msyncext

    fd, m, _ = _dirty_file(path)
    m2 = mmap.mmap(fd, FILE_BYTES)
    start = threading.Barrier(2)
    outcomes: dict[str, list[object]] = {"whole": [], "second": []}

    def flusher(name: str, call: Callable[[], object]) -> None:
        for _ in range(5):
            start.wait()
            try:
                call()
            except OSError as exc:
                outcomes[name].append((type(exc).__name__, exc.errno))
            else:
                outcomes[name].append("ok")

    # Both race for the first failure, then both flush the failed file at once.
    threads = [
        threading.Thread(target=flusher, args=("whole", lambda: msyncext.flush(m))),
        threading.Thread(
            target=flusher, args=("second", lambda: msyncext.flush(m2, 0, 2 * PAGE))
        ),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    first = outcomes["whole"][0]
    assert first in [("WritebackError", e) for e in WRITEBACK_ERRNOS], outcomes
    for name, seen in outcomes.items():
        assert seen == [first] * 5, (name, outcomes)
    m.close()
    m2.close()
    os.close(fd)


@needs_loop
def test_two_threads_flushing_the_failed_file_at_once_both_raise(
    failing_fs: blockdev.LoopFS,
) -> None:
    _run("_two_threads", f"{failing_fs.mountpoint}/big")


def _subinterpreters() -> tuple[Callable[[], object], Callable[[object, str], None]]:
    """create() and run(interp, code) for this Python, or skip."""
    if sys.version_info >= (3, 14):
        from concurrent import interpreters  # type: ignore[import-not-found]

        def run_314(interp: Any, code: str) -> None:
            interp.exec(code)

        return interpreters.create, run_314
    if sys.version_info >= (3, 13):
        import _interpreters  # type: ignore[import-not-found]

        def run_313(interp: Any, code: str) -> None:
            failure = _interpreters.exec(interp, code)
            if failure is not None:
                raise RuntimeError(f"subinterpreter failed: {failure}")

        return _interpreters.create, run_313
    import _xxsubinterpreters  # type: ignore[import-not-found]

    return _xxsubinterpreters.create, _xxsubinterpreters.run_string


def _shared_with_a_subinterpreter(path: str) -> None:
    import msyncext

    create, run = _subinterpreters()
    fd, m, _ = _dirty_file(path)
    interp = create()
    # The subinterpreter maps the same file before the failure ...
    run(
        interp,
        "import mmap, os, msyncext\n"
        f"fd = os.open({path!r}, os.O_RDWR)\n"
        "m = mmap.mmap(fd, 4 * mmap.PAGESIZE)\n",
    )
    # ... the main interpreter sees the failure ...
    first = _first_failure(m)
    # ... and the subinterpreter's flush is refused with it: one record.
    run(
        interp,
        "try:\n"
        "    msyncext.flush(m, 1, 1)\n"
        "except msyncext.WritebackError as exc:\n"
        f"    assert exc.errno == {first}, exc\n"
        "else:\n"
        "    raise AssertionError('flushed after a failure in another interpreter')\n"
        f"assert msyncext.clear_writeback_error(m) == {first}\n",
    )
    # Cleared there, cleared here.
    assert msyncext.clear_writeback_error(m) is None
    run(interp, "m.close()\nos.close(fd)\n")
    m.close()
    os.close(fd)


def _subinterpreters_unavailable() -> str | None:
    try:
        _subinterpreters()
    except ImportError as exc:
        return f"this CPython has no usable subinterpreter API: {exc}"
    return None


@needs_loop
@needs_loop
@pytest.mark.skipif(
    _subinterpreters_unavailable() is not None,
    reason=_subinterpreters_unavailable() or "",
)
def test_a_subinterpreter_shares_the_record(failing_fs: blockdev.LoopFS) -> None:
    _run("_shared_with_a_subinterpreter", f"{failing_fs.mountpoint}/big")


# --------------------------------------------------------------------------
# Nothing failed: nothing recorded


def _nothing_recorded(directory: str) -> None:
    import msyncext

    fd, m = _healthy_map(directory)
    libc = _libc()
    address = _address(m)
    assert libc.mlock(address, PAGE) == 0, os.strerror(ctypes.get_errno())
    try:
        with contextlib.suppress(OSError):
            _flush_busy(m)  # a bad call on the way
    finally:
        libc.munlock(address, PAGE)
    for i in range(1000):
        m[i % 16 * PAGE] = i % 256
        msyncext.flush(m, i % 16 * PAGE, 1)
    msyncext.flush_ranges(m, [(0, 1), (9 * PAGE, 10)])
    assert msyncext.clear_writeback_error(m) is None
    with mmap.mmap(-1, PAGE) as anonymous:  # not a mapping of a file
        assert msyncext.clear_writeback_error(anonymous) is None
    m.close()
    os.close(fd)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mlock semantics")
def test_nothing_is_recorded_when_nothing_failed(tmp_path: Path) -> None:
    _run("_nothing_recorded", str(tmp_path))


@needs_loop
def test_faulty_fixture_can_be_built_and_removed() -> None:
    # The cleanup path on its own: build the stack, use it lightly, undo it.
    with (
        blockdev.tmpfs("12m") as small,
        blockdev.loop_ext4(64, backing_dir=small) as fs,
    ):
        assert os.path.ismount(fs.mountpoint)
        mountpoint = fs.mountpoint
    assert not os.path.exists(mountpoint)
    assert not os.path.exists(small)
