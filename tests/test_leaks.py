"""Leaks: success and error paths keep refcounts, memory and exports flat.

Every C path of msyncext runs here many times: success, each argument
error, the OSError path (MS_INVALIDATE over mlocked pages gives EBUSY), the
pinning of a numpy.memmap's mmap, the refusal of copies (bytes, bytearray,
array.array and views of them), (n, 2) arrays of pairs and the batch entry
point's own checks. .ci/valgrind.sh runs this file
under memcheck with MSYNCEXT_LEAK_ROUNDS small (and MSYNCEXT_VALGRIND=1,
which skips the RSS test: valgrind's heap says nothing about ours).
"""

from __future__ import annotations

import array
import ctypes
import errno
import functools
import gc
import mmap
import os
import sys
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from blockdev import c_library
from conftest import NUMPY_MISSING, BadIndex, Index, np

import msyncext
from msyncext import MS_ASYNC, MS_INVALIDATE, MS_SYNC, PAGESIZE, _msync

# Untyped handles: the bad-input calls below are wrong on purpose.
flush: Any = msyncext.flush
flush_ranges: Any = msyncext.flush_ranges
flush_batch: Any = _msync.flush_batch
batch_runs: Any = _msync.batch_runs

ROUNDS = int(os.environ.get("MSYNCEXT_LEAK_ROUNDS", "5000"))
UNDER_VALGRIND = os.environ.get("MSYNCEXT_VALGRIND") == "1"
NPAGES = 4
SIZE = NPAGES * PAGESIZE


@pytest.fixture
def shm_map(tmp_path: Any) -> Iterator[mmap.mmap]:
    # tmpfs when there is one: clean pages make MS_SYNC cost ~0.3 us there.
    where = "/dev/shm" if os.path.isdir("/dev/shm") else str(tmp_path)
    path = os.path.join(where, f"msyncext-leak-{os.getpid()}")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, SIZE)
        m = mmap.mmap(fd, SIZE)
        yield m
        # No export outlived its call: resize and close still work.
        m.resize(SIZE + PAGESIZE)
        m.resize(SIZE)
        m.close()
    finally:
        os.close(fd)
        os.unlink(path)


def _cases(
    m: mmap.mmap,
) -> dict[str, tuple[Callable[[], object], type[BaseException] | None, list[object]]]:
    """name -> (call, expected exception, objects whose refcounts must stay)."""
    closed = mmap.mmap(-1, PAGESIZE)
    closed.close()
    big = 10**30
    neg = -(10**30)
    idx = Index(PAGESIZE)
    bad = BadIndex()
    off = Index(3)
    strided = memoryview(bytearray(64))[::2]
    pairs = [(1, 2), (3 * PAGESIZE, 5), (PAGESIZE - 1, 2)]
    bad_pairs = [(1, 2), (-1, 2)]
    copy = m[100:164]  # bytes
    heap = bytearray(64)
    copy_view = memoryview(heap)[8:]
    words = array.array("I", range(16))
    over_heap = (ctypes.c_char * 16).from_buffer(bytearray(16))
    cases: dict[
        str, tuple[Callable[[], object], type[BaseException] | None, list[object]]
    ] = {
        "whole": (lambda: flush(m), None, [m]),
        "range": (lambda: flush(m, 5, 100), None, [m]),
        "kwargs": (
            lambda: flush(m, offset=off, size=idx, flags=MS_ASYNC),
            None,
            [m, off, idx],
        ),
        "none-size": (
            lambda: flush(m, 7, None, flags=MS_SYNC | MS_INVALIDATE),
            None,
            [m],
        ),
        "zero": (lambda: flush(m, 0, 0), None, [m]),
        "view": (lambda: flush(memoryview(m)[100:], 1, 2), None, [m]),
        "batch": (lambda: flush_ranges(m, pairs, max_gap=0), None, [m, pairs]),
        "batch-async": (
            lambda: flush_ranges(m, pairs, flags=MS_ASYNC),
            None,
            [m, pairs],
        ),
        "batch-generator": (
            lambda: flush_ranges(m, ((o, 1) for o in (0, PAGESIZE))),
            None,
            [m],
        ),
        "batch-list-pairs": (
            lambda: flush_ranges(m, [[0, 1], [idx, off]]),
            None,
            [m, idx, off],
        ),
        "clear-none": (lambda: msyncext.clear_writeback_error(m), None, [m]),
        "batch-runs": (lambda: batch_runs(m, pairs, MS_SYNC, 0), None, [m, pairs]),
        "negative": (lambda: flush(m, -1), ValueError, [m]),
        "huge": (lambda: flush(m, big), ValueError, [m, big]),
        "huge-neg": (lambda: flush(m, 0, neg), ValueError, [m, neg]),
        "past-end": (lambda: flush(m, 1, SIZE), ValueError, [m]),
        "offset-past-end": (lambda: flush(m, SIZE + 1), ValueError, [m]),
        "str": (lambda: flush(m, "1"), TypeError, [m]),
        "bool": (lambda: flush(m, 0, True), TypeError, [m]),
        "bad-index": (lambda: flush(m, bad), ZeroDivisionError, [m, bad]),
        "flags": (lambda: flush(m, flags=99), ValueError, [m]),
        "flags-huge": (lambda: flush(m, flags=big), ValueError, [m, big]),
        "flags-type": (lambda: flush(m, flags=1.0), TypeError, [m]),
        "keyword": (lambda: flush(m, nope=1), TypeError, [m]),
        "twice": (lambda: flush(m, 0, offset=0), TypeError, [m]),
        "too-many": (lambda: flush(m, 0, 0, 0), TypeError, [m]),
        "no-args": (lambda: flush(), TypeError, []),
        "closed": (lambda: flush(closed), ValueError, [closed]),
        "no-buffer": (lambda: flush(idx), TypeError, [idx]),
        "strided": (lambda: flush(strided), BufferError, [strided]),
        "batch-bad": (lambda: flush_ranges(m, bad_pairs), ValueError, [m, bad_pairs]),
        "batch-not-iterable": (lambda: flush_ranges(m, 5), TypeError, [m]),
        "batch-flags": (
            lambda: flush_ranges(m, pairs, flags=0),
            ValueError,
            [m, pairs],
        ),
        "batch-closed": (
            lambda: flush_ranges(closed, pairs),
            ValueError,
            [closed, pairs],
        ),
        "batch-outside": (
            lambda: flush_batch(m, [(0, SIZE + 1)], MS_SYNC, 0),
            ValueError,
            [m],
        ),
        "batch-bad-item": (
            lambda: flush_batch(m, [(0, bad)], MS_SYNC, 0),
            ZeroDivisionError,
            [m, bad],
        ),
        "batch-not-pair": (lambda: flush_batch(m, [5], MS_SYNC, 0), TypeError, [m]),
        "batch-bad-gap": (
            lambda: flush_batch(m, pairs, MS_SYNC, -1),
            ValueError,
            [m, pairs],
        ),
        "batch-nargs": (lambda: flush_batch(m, pairs), TypeError, [m, pairs]),
        "evict": (lambda: flush(m, PAGESIZE, 1, evict=True), None, [m]),
        "evict-not-bool": (lambda: flush(m, evict=1), TypeError, [m]),
        "evict-async": (
            lambda: flush(m, evict=True, flags=MS_ASYNC),
            ValueError,
            [m],
        ),
        "tracking": (lambda: _msync.writeback_tracking(), None, []),
        "page-offset": (lambda: _msync.page_offset(m), None, [m]),
        "page-offset-bad": (lambda: _msync.page_offset(idx), TypeError, [idx]),
        # Copies (memory of their own) are refused at the end of the chain.
        "copy-bytes": (lambda: flush(copy, 1, 2), TypeError, [copy]),
        "copy-view": (lambda: flush(copy_view), TypeError, [copy_view, heap]),
        "copy-array": (lambda: flush_ranges(words, pairs), TypeError, [words]),
        "copy-ctypes": (lambda: flush(over_heap), TypeError, [over_heap]),
        "copy-clear": (
            lambda: msyncext.clear_writeback_error(heap),
            TypeError,
            [heap],
        ),
        "copy-page-offset": (lambda: _msync.page_offset(words), TypeError, [words]),
    }
    if np is not None:
        more = _numpy_cases(m, pairs, copy)
        assert set(more) == NUMPY_CASES
        cases.update(more)
    return cases


# The cases that need numpy: where it is not installed (see conftest.py),
# they skip.
NUMPY_CASES = frozenset(
    {
        "batch-array",
        "batch-array-bad",
        "copy-numpy",
        "ctypes-chain",
        "fortran",
        "not-contiguous",
        "not-contiguous-batch",
        "owner-chain",
        "owner-chain-batch",
    }
)


def _numpy_cases(
    m: mmap.mmap, pairs: list[tuple[int, int]], copy: bytes
) -> dict[str, tuple[Callable[[], object], type[BaseException] | None, list[object]]]:
    array_pairs = np.array(pairs, dtype=np.int64)
    bad_array = np.array([[0, 1], [-1, 1]], dtype=np.int32)

    # Over the map, not the heap: msync takes whole pages, and valgrind
    # rightly calls the rest of a heap block's page unaddressable.
    def fortran() -> Any:
        return np.ndarray((16, 16), np.float64, buffer=m, order="F")

    # Made as numpy.memmap makes its arrays: numpy keeps the mmap as .base
    # but no export of it, so flush exports the mmap itself. Made afresh for
    # each call: an array made before a resize points at stale memory.
    def memmap() -> Any:
        return np.ndarray(
            (SIZE - PAGESIZE - 3,), np.uint8, buffer=m, offset=PAGESIZE + 3
        )

    not_contiguous = np.zeros((8, 8))[:, 1:]
    over_bytes = np.frombuffer(copy, np.uint8)
    return {
        "batch-array": (
            lambda: flush_ranges(m, array_pairs, max_gap=0),
            None,
            [m, array_pairs],
        ),
        "batch-array-bad": (
            lambda: flush_ranges(m, bad_array),
            ValueError,
            [m, bad_array],
        ),
        "owner-chain": (lambda: flush(memmap(), 1, 2), None, [m]),
        "owner-chain-batch": (lambda: flush_ranges(memmap(), pairs[:1]), None, [m]),
        "fortran": (lambda: flush(fortran()), None, [m]),
        "not-contiguous": (
            lambda: flush(not_contiguous),
            BufferError,
            [not_contiguous],
        ),
        "not-contiguous-batch": (
            lambda: flush_ranges(not_contiguous, pairs),
            BufferError,
            [not_contiguous],
        ),
        "ctypes-chain": (
            lambda: flush((ctypes.c_char * 64).from_buffer(memmap()), 1, 2),
            None,
            [m],
        ),
        "copy-numpy": (lambda: flush(over_bytes), TypeError, [over_bytes, copy]),
    }


def _traced_growth(work: Callable[[], object]) -> int:
    """Bytes of Python-heap memory still held after ``work()``.

    Under valgrind, 0: memcheck watches the heap itself, and tracemalloc's
    own tables show up there as lost blocks allocated from msyncext frames.
    """
    if UNDER_VALGRIND:
        work()
        return 0
    tracemalloc.start()
    try:
        # One traced batch first: free-threaded builds free objects late
        # (after all threads pass a quiescent point), so the first batch
        # after start() counts objects that are freed only later.
        work()
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        work()
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def _repeat(call: Callable[[], object], expected: type[BaseException]) -> int:
    for _ in range(ROUNDS):
        _call(call, expected)
    return ROUNDS


def _call(call: Callable[[], object], expected: type[BaseException] | None) -> None:
    if expected is None:
        call()
        return
    try:
        call()
    except expected:
        pass
    else:
        raise AssertionError(f"{expected.__name__} not raised")


@pytest.mark.parametrize("name", sorted(set(_cases(mmap.mmap(-1, SIZE))) | NUMPY_CASES))
def test_refcounts_and_traced_memory_stay_flat(shm_map: mmap.mmap, name: str) -> None:
    cases = _cases(shm_map)
    if name not in cases:
        pytest.skip(NUMPY_MISSING)
    call, expected, watched = cases[name]
    # Warm-up: caches, freelists, interned strings and first-call work.
    for _ in range(ROUNDS):
        _call(call, expected)
    gc.collect()
    counts = [sys.getrefcount(obj) for obj in watched]

    # Making ctypes objects leaves tens of KB more or less in freelists and
    # delayed frees after a batch (10-80 KB on 3.14t), the same after 5,000
    # calls as after 50,000: more calls for that case, so that a leak of one
    # small object per call (16 bytes or more each) still stands out.
    rounds = ROUNDS * NOISY.get(name, 1)

    def work() -> None:
        for _ in range(rounds):
            _call(call, expected)

    # The least of three tries: noise varies from try to try, a leak shows in
    # every one.
    grown = min(_traced_growth(work) for _ in range(3))
    assert [sys.getrefcount(obj) for obj in watched] == counts
    # A leak of even one small object per call would be rounds * >= 16 bytes.
    bound = max(4096, rounds * (8 if name in NOISY else 2))
    assert grown < bound, f"{grown} bytes more after {rounds} calls"


NOISY = {"ctypes-chain": 8}


def _lock(m: mmap.mmap) -> tuple[Callable[[], None], int]:
    """mlock the map; returns its unlock and the address."""
    libc = c_library()
    anchor = ctypes.c_char.from_buffer(m)
    address = ctypes.addressof(anchor)
    del anchor  # release the export at once
    if libc.mlock(ctypes.c_void_p(address), ctypes.c_size_t(len(m))) != 0:
        err = ctypes.get_errno()
        pytest.skip(f"mlock failed: {os.strerror(err)}")

    def unlock() -> None:
        libc.munlock(ctypes.c_void_p(address), ctypes.c_size_t(len(m)))

    return unlock, address


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="EBUSY from mlock is Linux's"
)
def test_oserror_path_stays_flat(shm_map: mmap.mmap) -> None:
    unlock, _ = _lock(shm_map)
    try:
        flags = MS_SYNC | MS_INVALIDATE
        pairs = [(0, 1), (2 * PAGESIZE, 1)]
        calls: list[Callable[[], object]] = [
            lambda: flush(shm_map, 1, 2, flags=flags),
            lambda: flush_ranges(shm_map, pairs, flags=flags, max_gap=0),
        ]
        for call in calls:
            with pytest.raises(
                OSError, match="Device or resource busy: 'buffer bytes"
            ) as info:
                call()
            assert info.value.errno == errno.EBUSY
            gc.collect()
            count = sys.getrefcount(shm_map)
            grown = _traced_growth(functools.partial(_repeat, call, OSError))
            assert sys.getrefcount(shm_map) == count
            assert grown < max(4096, ROUNDS * 2), grown
    finally:
        unlock()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGESIZE


@pytest.mark.skipif(UNDER_VALGRIND, reason="RSS means nothing under valgrind")
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc")
def test_rss_stays_flat(shm_map: mmap.mmap) -> None:
    cases = list(_cases(shm_map).values())

    def run_all(times: int) -> None:
        for _ in range(times):
            for call, expected, _watched in cases:
                _call(call, expected)

    run_all(200)  # warm-up
    gc.collect()
    before = _rss_bytes()
    run_all(max(ROUNDS // 2, 1))
    gc.collect()
    grown = _rss_bytes() - before
    # Generous: allocator noise is tens of KiB, while ~100 000 calls here
    # leaking one small object (32 bytes) each would add over 3 MiB.
    assert grown < 2 << 20, f"RSS grew by {grown} bytes"


def test_exports_released_after_every_path(shm_map: mmap.mmap) -> None:
    # After each path, the map can be resized at once: no export was kept.
    for name, (call, expected, _watched) in _cases(shm_map).items():
        _call(call, expected)
        shm_map.resize(SIZE + PAGESIZE)
        shm_map.resize(SIZE)
        assert len(shm_map) == SIZE, name
