"""msyncext.flush_ranges: batched flushes of many ranges of one buffer."""

from __future__ import annotations

import ctypes
import errno
import itertools
import os
import re
from typing import Any

import numpy as np
import pytest
from blockdev import cachestat
from conftest import PAGE, MapFactory, needs_cachestat, sparse_memmap
from hypothesis import given, settings
from hypothesis import strategies as st

import msyncext
from msyncext._ranges import covering_runs

SYNC, ASYNC, INVAL = msyncext.MS_SYNC, msyncext.MS_ASYNC, msyncext.MS_INVALIDATE


# --- the range arithmetic, against a brute-force model ------------------------


def _touched_pages(pairs: list[tuple[int, int]], head: int, pagesize: int) -> set[int]:
    pages: set[int] = set()
    for offset, size in pairs:
        for byte in range(head + offset, head + offset + size):
            pages.add(byte // pagesize)
    return pages


@st.composite
def _batches(draw: st.DrawFn) -> tuple[int, int, int, list[tuple[int, int]], int]:
    pagesize = draw(st.sampled_from([16, 64, 4096]))
    head = draw(st.integers(0, pagesize - 1))
    nbytes = draw(st.integers(0, 40 * pagesize))
    pairs = []
    for _ in range(draw(st.integers(0, 12))):
        offset = draw(st.integers(0, nbytes))
        pairs.append((offset, draw(st.integers(0, nbytes - offset))))
    max_gap = draw(st.sampled_from([0, 1, pagesize - 1, pagesize, 3 * pagesize, 10**9]))
    return pagesize, head, nbytes, pairs, max_gap


@settings(max_examples=400, deadline=None)
@given(_batches())
def test_runs_cover_exactly_the_touched_pages_plus_small_gaps(
    batch: tuple[int, int, int, list[tuple[int, int]], int],
) -> None:
    pagesize, head, nbytes, pairs, max_gap = batch
    runs = covering_runs(
        pairs, nbytes=nbytes, head=head, pagesize=pagesize, max_gap=max_gap
    )
    assert len(runs) % 2 == 0
    spans = [(runs[i], runs[i] + runs[i + 1] - 1) for i in range(0, len(runs), 2)]
    touched = _touched_pages(pairs, head, pagesize)
    covered = {page for lo, hi in spans for page in range(lo, hi + 1)}

    # Every touched page is covered: every byte asked for is written back.
    assert touched <= covered
    # Runs are sorted, non-empty, disjoint and not adjacent.
    for (lo, hi), (next_lo, _) in itertools.pairwise(spans):
        assert lo <= hi
        gap_bytes = (next_lo - hi - 1) * pagesize
        assert gap_bytes > max_gap, "runs this close should have merged"
    # Every run starts and ends on a touched page, and its untouched pages
    # come in gaps no longer than max_gap.
    for lo, hi in spans:
        assert lo in touched
        assert hi in touched
        inside = sorted(page for page in touched if lo <= page <= hi)
        for a, b in itertools.pairwise(inside):
            assert (b - a - 1) * pagesize <= max_gap
    # No run goes past the pages the buffer touches.
    if covered:
        assert max(covered) <= (head + nbytes - 1) // pagesize


def test_runs_merge_overlapping_adjacent_and_near_pairs() -> None:
    pairs = [(10 * PAGE, 1), (0, 1), (PAGE - 1, 2), (3 * PAGE, PAGE), (4 * PAGE, 5)]
    kwargs: dict[str, Any] = {"nbytes": 64 * PAGE, "head": 0, "pagesize": PAGE}
    assert covering_runs(pairs, max_gap=0, **kwargs) == [0, 2, 3, 2, 10, 1]
    assert covering_runs(pairs, max_gap=PAGE, **kwargs) == [0, 5, 10, 1]
    assert covering_runs(pairs, max_gap=5 * PAGE, **kwargs) == [0, 11]
    # The same bytes 100 bytes into a page: (PAGE - 1, 2) now stays in page 0.
    shifted = {**kwargs, "head": 100}
    assert covering_runs([(PAGE - 200, 2)], max_gap=0, **shifted) == [0, 1]
    assert covering_runs([(PAGE - 101, 2)], max_gap=0, **shifted) == [0, 2]


# --- validation: one bad pair refuses the whole batch -----------------------

BAD_BATCHES: list[tuple[str, Any, type[Exception], str]] = [
    (
        "negative offset",
        [(0, 1), (-1, 1)],
        ValueError,
        "ranges[1] = (-1, 1): offset -1",
    ),
    (
        "negative size",
        [(0, -2)],
        ValueError,
        "ranges[0] = (0, -2): size -2 is negative",
    ),
    ("past the end", [(0, 1), (5, 8 * PAGE)], ValueError, "ranges[1] = (5, "),
    ("offset past end", [(8 * PAGE + 1, 0)], ValueError, "runs past the end"),
    (
        "float size",
        [(0, 1.5)],
        TypeError,
        "ranges[0] = (0, 1.5): size must be an integer",
    ),
    ("bool offset", [(True, 1)], TypeError, "offset must be an integer, not bool"),
    ("str pair", [(0, 1), "ab"], TypeError, "ranges[1] = 'ab'"),
    ("short pair", [(0,)], TypeError, "ranges[0] = (0,) is not an (offset, size) pair"),
    ("long pair", [(0, 1, 2)], TypeError, "is not an (offset, size) pair"),
    ("None pair", [None], TypeError, "ranges[0] = None is not"),
    (
        "not iterable",
        5,
        TypeError,
        "ranges must be an iterable of (offset, size) pairs",
    ),
]


@needs_cachestat
@pytest.mark.parametrize(
    ("ranges", "exc_type", "message"),
    [case[1:] for case in BAD_BATCHES],
    ids=[case[0] for case in BAD_BATCHES],
)
def test_bad_batch_flushes_nothing(
    disk_map: MapFactory, ranges: Any, exc_type: type[Exception], message: str
) -> None:
    mapped = disk_map(8 * PAGE)
    mapped.dirty_pages(0, 3)
    with pytest.raises(exc_type) as info:
        msyncext.flush_ranges(mapped.map, ranges)
    assert message in str(info.value)
    assert mapped.page_dirty(0)
    assert mapped.page_dirty(3)
    mapped.map.resize(9 * PAGE)  # no export left behind
    mapped.map.close()


@pytest.mark.parametrize(
    ("kwargs", "exc_type", "message"),
    [
        ({"flags": SYNC | ASYNC}, ValueError, f"flags {SYNC | ASYNC} is not"),
        ({"flags": INVAL}, ValueError, "optionally OR-ed with MS_INVALIDATE"),
        ({"flags": None}, TypeError, "flags must be an integer, not None"),
        ({"flags": 4.0}, TypeError, "not 4.0 (float)"),
        ({"flags": False}, TypeError, "not False (bool)"),
        ({"max_gap": -1}, ValueError, "max_gap must be a non-negative integer, not -1"),
        ({"max_gap": 1.5}, TypeError, "not 1.5"),
        ({"max_gap": None}, TypeError, "not None"),
        ({"max_gap": True}, TypeError, "max_gap must be a non-negative integer"),
        ({"max_gap": np.int64(-4)}, ValueError, "not -4"),
    ],
)
def test_bad_flags_and_max_gap(
    shm_map: MapFactory, kwargs: dict[str, Any], exc_type: type[Exception], message: str
) -> None:
    mapped = shm_map(4 * PAGE)
    with pytest.raises(exc_type) as info:
        msyncext.flush_ranges(mapped.map, [(0, 1)], **kwargs)
    assert message in str(info.value)


def test_bad_buffers(shm_map: MapFactory) -> None:
    with pytest.raises(TypeError):
        msyncext.flush_ranges(42, [(0, 1)])
    mapped = shm_map(4 * PAGE)
    mapped.map.close()
    with pytest.raises(ValueError, match="closed"):
        msyncext.flush_ranges(mapped.map, [(0, 1)])
    mapped2 = shm_map(4 * PAGE)
    strided = memoryview(mapped2.map)[::2]
    try:
        with pytest.raises(BufferError):
            msyncext.flush_ranges(strided, [(0, 1)])
    finally:
        strided.release()
    mapped2.map.close()


# --- real flushes ------------------------------------------------------------


@needs_cachestat
def test_exactly_the_covering_pages_are_cleaned(disk_map: MapFactory) -> None:
    mapped = disk_map(256 * PAGE)
    dirty = [1, 2, 50, 51, 52, 120, 200, 255]
    mapped.dirty_pages(*dirty)
    calls = msyncext.flush_ranges(
        mapped.map,
        [(200 * PAGE + 17, 3), (PAGE + 5, PAGE), (52 * PAGE - 1, 1), (50 * PAGE, 1)],
        max_gap=0,
    )
    # Runs: pages 1-2, page 50, page 51, page 200 -> 50 and 51 are adjacent.
    assert calls == 3
    for page in (1, 2, 50, 51, 200):
        assert not mapped.page_dirty(page), page
    for page in (52, 120, 255):
        assert mapped.page_dirty(page), page


@needs_cachestat
def test_max_gap_also_writes_back_pages_in_the_gap(disk_map: MapFactory) -> None:
    mapped = disk_map(64 * PAGE)
    mapped.dirty_pages(10, 12, 14, 40)
    calls = msyncext.flush_ranges(
        mapped.map, [(10 * PAGE, 1), (14 * PAGE, 1), (40 * PAGE, 1)], max_gap=3 * PAGE
    )
    assert calls == 2  # pages 10-14 and page 40
    for page in (10, 12, 14, 40):
        assert not mapped.page_dirty(page), page


@needs_cachestat
def test_unaligned_buffer_and_generator_input(disk_map: MapFactory) -> None:
    mapped = disk_map(64 * PAGE)
    view = memoryview(mapped.map)[PAGE + 100 :]
    try:
        mapped.dirty_pages(2, 3, 9)
        # view[PAGE - 100] is file page 2's first byte; view[PAGE - 101] page 1's last.
        pairs = ((offset, 1) for offset in (PAGE - 100, 8 * PAGE - 100))
        assert msyncext.flush_ranges(view, pairs, max_gap=0) == 2
        assert not mapped.page_dirty(2)
        assert mapped.page_dirty(3)
        assert not mapped.page_dirty(9)
    finally:
        view.release()


@needs_cachestat
def test_numpy_memmap(tmp_path: Any) -> None:
    path = tmp_path / "array.bin"
    array = sparse_memmap(path, 32 * PAGE, dtype=np.float64, offset=300)
    fd = os.open(path, os.O_RDONLY)
    try:
        array[:] = 1.0
        msyncext.flush_ranges(array, [(0, 8), (20 * PAGE, 8)], max_gap=0)
        assert cachestat(fd, 0, PAGE).dirty == 0
        assert cachestat(fd, 20 * PAGE, PAGE).dirty == 0
        assert cachestat(fd, 10 * PAGE, PAGE).dirty == 1
    finally:
        os.close(fd)
        del array


@needs_cachestat
def test_max_gap_takes_integer_like_objects(disk_map: MapFactory) -> None:
    mapped = disk_map(16 * PAGE)
    mapped.dirty_pages(2, 4)
    pairs = [(2 * PAGE, 1), (4 * PAGE, 1)]
    assert msyncext.flush_ranges(mapped.map, pairs, max_gap=np.int64(PAGE)) == 1
    assert not mapped.page_dirty(2)
    assert not mapped.page_dirty(4)


def test_empty_batches_make_no_syscall(shm_map: MapFactory) -> None:
    mapped = shm_map(4 * PAGE)
    assert msyncext.flush_ranges(mapped.map, []) == 0
    assert msyncext.flush_ranges(mapped.map, [(0, 0), (4 * PAGE, 0)]) == 0
    assert msyncext.flush_ranges(bytearray(), []) == 0


def test_every_access_kind_and_flag(shm_map: MapFactory) -> None:
    import mmap

    for access in (mmap.ACCESS_WRITE, mmap.ACCESS_READ, mmap.ACCESS_COPY):
        mapped = shm_map(8 * PAGE, access=access)
        for flags in (SYNC, ASYNC, SYNC | INVAL, ASYNC | INVAL):
            assert (
                msyncext.flush_ranges(mapped.map, [(1, 2), (7 * PAGE, 5)], flags=flags)
                == 1
            )
    with mmap.mmap(-1, 8 * PAGE) as anonymous:
        assert msyncext.flush_ranges(anonymous, [(0, 1)], max_gap=0) == 1


def test_failure_stops_the_batch_and_names_the_run(shm_map: MapFactory) -> None:
    mapped = shm_map(8 * PAGE)
    libc = ctypes.CDLL(None, use_errno=True)
    holder = ctypes.c_char.from_buffer(mapped.map)
    address = ctypes.addressof(holder)
    del holder
    if libc.mlock(ctypes.c_void_p(address + 4 * PAGE), ctypes.c_size_t(PAGE)) != 0:
        pytest.skip(f"mlock failed: {os.strerror(ctypes.get_errno())}")
    try:
        with pytest.raises(
            OSError, match=rf"buffer bytes \[{4 * PAGE}, {5 * PAGE}\)"
        ) as info:
            msyncext.flush_ranges(
                mapped.map,
                [(0, 1), (4 * PAGE + 9, 1), (7 * PAGE, 1)],
                flags=SYNC | INVAL,
                max_gap=0,
            )
        assert info.value.errno == errno.EBUSY
    finally:
        libc.munlock(ctypes.c_void_p(address + 4 * PAGE), ctypes.c_size_t(PAGE))
    mapped.map.close()  # no export left behind


# --- the private C entry point re-checks what it is given ---------------------


def test_c_side_rechecks_runs(shm_map: MapFactory) -> None:
    from msyncext import _msync

    mapped = shm_map(4 * PAGE)
    assert _msync.flush_runs(mapped.map, [0, 4], SYNC) == 1
    for runs, message in [
        ([0, 5], "outside the 4 pages"),
        ([4, 1], "outside"),
        ([1, 0], "is empty"),
        ([0], "not (first, count) pairs"),
        ([-1, 1], "first page -1 is negative"),
        ([0, 2**62], "outside"),
        ([2**62, 2**62], "outside"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            _msync.flush_runs(mapped.map, runs, SYNC)
    with pytest.raises(TypeError, match="runs must be a list"):
        _msync.flush_runs(mapped.map, (0, 1), SYNC)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="flags"):
        _msync.flush_runs(mapped.map, [0, 1], 0x1000)
    mapped.map.close()
