"""msyncext.flush_ranges: batched flushes of many ranges of one buffer."""

from __future__ import annotations

import errno
import itertools
import mmap
import os
import re
import signal
import time
from typing import Any

import pytest
from blockdev import cachestat
from conftest import (
    PAGE,
    Index,
    MapFactory,
    mlocked,
    needs_cachestat,
    needs_numpy,
    np,
    sparse_memmap,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import msyncext
from msyncext import _msync

SYNC, ASYNC, INVAL = msyncext.MS_SYNC, msyncext.MS_ASYNC, msyncext.MS_INVALIDATE


# --- the range arithmetic, against a brute-force model ------------------------
#
# The C side turns pairs into runs; _msync.batch_runs returns the runs it
# would msync (first page, page count), counted from the page holding
# buf[0], without a syscall. Buffers start at every offset within a page:
# memoryview slices of one anonymous map.

_ARENA = mmap.mmap(-1, 48 * PAGE)


def _touched_pages(pairs: list[tuple[int, int]], head: int) -> set[int]:
    pages: set[int] = set()
    for offset, size in pairs:
        for byte in range(head + offset, head + offset + size):
            pages.add(byte // PAGE)
    return pages


@st.composite
def _batches(
    draw: st.DrawFn,
) -> tuple[int, int, list[tuple[int, int]], int, int]:
    head = draw(st.sampled_from([0, 1, 7, PAGE // 2, PAGE - 1]))
    nbytes = draw(st.integers(0, 40 * PAGE))
    pairs = []
    for _ in range(draw(st.integers(0, 12))):
        offset = draw(st.integers(0, nbytes))
        pairs.append((offset, draw(st.integers(0, nbytes - offset))))
    max_gap = draw(st.sampled_from([0, 1, PAGE - 1, PAGE, 3 * PAGE, 10**9]))
    flags = draw(st.sampled_from(sorted(msyncext.VALID_FLAGS)))
    return head, nbytes, pairs, max_gap, flags


def _runs(
    head: int, nbytes: int, pairs: Any, max_gap: int, flags: int = SYNC
) -> list[tuple[int, int]]:
    with memoryview(_ARENA)[head : head + nbytes] as view:
        assert _msync.page_offset(view) == head
        return _msync.batch_runs(view, pairs, flags, max_gap)


@settings(max_examples=400, deadline=None)
@given(_batches())
def test_runs_cover_exactly_the_touched_pages_plus_small_gaps(
    batch: tuple[int, int, list[tuple[int, int]], int, int],
) -> None:
    head, nbytes, pairs, max_gap, flags = batch
    runs = _runs(head, nbytes, pairs, max_gap, flags)
    spans = [(first, first + count - 1) for first, count in runs]
    touched = _touched_pages(pairs, head)
    covered = {page for lo, hi in spans for page in range(lo, hi + 1)}
    # MS_INVALIDATE must not reach pages nobody named: no gap merging.
    gap = 0 if flags in (SYNC | INVAL, ASYNC | INVAL) else max_gap

    # Every touched page is covered: every byte asked for is written back.
    assert touched <= covered
    # Runs are sorted, non-empty, disjoint and not adjacent.
    for (lo, hi), (next_lo, _) in itertools.pairwise(spans):
        assert lo <= hi
        assert next_lo > hi + 1, "touching runs should have merged"
        assert (next_lo - hi - 1) * PAGE > gap, "runs this close should have merged"
    # Every run starts and ends on a touched page, and its untouched pages
    # come in gaps no longer than the allowed gap.
    for lo, hi in spans:
        assert lo in touched
        assert hi in touched
        inside = sorted(page for page in touched if lo <= page <= hi)
        for a, b in itertools.pairwise(inside):
            assert (b - a - 1) * PAGE <= gap
    # No run goes past the pages the buffer touches.
    if covered:
        assert max(covered) <= (head + nbytes - 1) // PAGE


def test_runs_merge_overlapping_adjacent_and_near_pairs() -> None:
    pairs = [(10 * PAGE, 1), (0, 1), (PAGE - 1, 2), (3 * PAGE, PAGE), (4 * PAGE, 5)]
    assert _runs(0, 40 * PAGE, pairs, 0) == [(0, 2), (3, 2), (10, 1)]
    assert _runs(0, 40 * PAGE, pairs, PAGE) == [(0, 5), (10, 1)]
    assert _runs(0, 40 * PAGE, pairs, 5 * PAGE) == [(0, 11)]
    # With MS_INVALIDATE only overlapping or touching pages merge.
    assert _runs(0, 40 * PAGE, pairs, 5 * PAGE, SYNC | INVAL) == [
        (0, 2),
        (3, 2),
        (10, 1),
    ]
    # The same bytes 100 bytes into a page: (PAGE - 1, 2) now stays in page 0.
    assert _runs(100, 40 * PAGE, [(PAGE - 200, 2)], 0) == [(0, 1)]
    assert _runs(100, 40 * PAGE, [(PAGE - 101, 2)], 0) == [(0, 2)]


@pytest.mark.parametrize(
    "dtype", ["int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64"]
)
@needs_numpy
def test_an_n_by_2_integer_array_gives_the_runs_of_a_list(dtype: str) -> None:
    pairs = [(0, 1), (100, 3), (50, 0), (126, 1), (2, 2)]
    if np.iinfo(dtype).max >= 3 * PAGE:
        pairs += [(3 * PAGE, 2), (PAGE + 5, PAGE)]
    expected = _runs(0, 40 * PAGE, pairs, 0)
    array = np.array(pairs, dtype=dtype)
    assert _runs(0, 40 * PAGE, array, 0) == expected
    # Any strides: a Fortran-ordered copy and a transposed view.
    assert _runs(0, 40 * PAGE, np.asfortranarray(array), 0) == expected
    assert _runs(0, 40 * PAGE, np.ascontiguousarray(array.T).T, 0) == expected
    # Non-native byte order falls back to iterating the rows: same runs.
    swapped = array.astype(array.dtype.newbyteorder())
    assert _runs(0, 40 * PAGE, swapped, 0) == expected


@needs_numpy
def test_array_pairs_are_checked_like_list_pairs() -> None:
    with pytest.raises(ValueError, match=re.escape("ranges[1] = (-1, 2): offset -1")):
        _runs(0, 4 * PAGE, np.array([[0, 1], [-1, 2]]), 0)
    with pytest.raises(ValueError, match=re.escape("ranges[0] = (5, 16384)")):
        _runs(0, 4 * PAGE, np.array([[5, 4 * PAGE]], dtype=np.uint32), 0)
    with pytest.raises(
        ValueError, match="ranges\\[0\\] = \\(18446744073709551615, 1\\)"
    ):
        _runs(0, 4 * PAGE, np.array([[2**64 - 1, 1]], dtype=np.uint64), 0)
    with pytest.raises(TypeError, match="offset must be an integer, not float64"):
        _runs(0, 4 * PAGE, np.array([[0.0, 1.0]]), 0)
    with pytest.raises(TypeError, match="is not an \\(offset, size\\) pair"):
        _runs(0, 4 * PAGE, np.array([[0, 1, 2]]), 0)
    assert _runs(0, 4 * PAGE, np.zeros((0, 2), dtype=np.int64), 0) == []


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
        ({"flags": SYNC | ASYNC}, ValueError, f"flags {SYNC | ASYNC} is not one"),
        ({"flags": INVAL}, ValueError, f"MS_SYNC ({SYNC})"),
        ({"flags": 2**80}, ValueError, f"flags {2**80} is not one"),
        ({"flags": None}, TypeError, "flags must be an integer, not None"),
        ({"flags": 4.0}, TypeError, "not 4.0 (float)"),
        ({"flags": False}, TypeError, "not False (bool)"),
        ({"max_gap": -1}, ValueError, "max_gap must be a non-negative integer, not -1"),
        ({"max_gap": 1.5}, TypeError, "not 1.5"),
        ({"max_gap": None}, TypeError, "not None"),
        ({"max_gap": True}, TypeError, "max_gap must be a non-negative integer"),
        pytest.param(
            {"max_gap": np.int64(-4) if np is not None else -4},
            ValueError,
            "not -4",
            marks=needs_numpy,
            id="numpy-negative-max_gap",
        ),
        ({"max_gap": -(2**70)}, ValueError, f"not {-(2**70)}"),
    ],
)
def test_bad_flags_and_max_gap(
    shm_map: MapFactory, kwargs: dict[str, Any], exc_type: type[Exception], message: str
) -> None:
    mapped = shm_map(4 * PAGE)
    with pytest.raises(exc_type) as info:
        msyncext.flush_ranges(mapped.map, [(0, 1)], **kwargs)
    assert message in str(info.value)


class _IndexReturnsStr:
    def __index__(self) -> Any:
        return "4"


def test_index_returning_a_non_int_names_flags() -> None:
    # As flush does: the interpreter's words, after the argument's name.
    with pytest.raises(TypeError, match=r"^flags: ") as info:
        msyncext.flush_ranges(mmap.mmap(-1, PAGE), [(0, 1)], flags=_IndexReturnsStr())
    assert "__index__" in str(info.value)
    with pytest.raises(TypeError, match=r"^max_gap: "):
        msyncext.flush_ranges(mmap.mmap(-1, PAGE), [(0, 1)], max_gap=_IndexReturnsStr())


def test_the_default_flags_are_ms_sync(shm_map: MapFactory) -> None:
    # The default is MS_SYNC under a name help() shows; it must act as it.
    default = msyncext.flush_ranges.__kwdefaults__["flags"]
    assert default == SYNC
    assert repr(default) == "MS_SYNC"
    mapped = shm_map(4 * PAGE)
    assert msyncext.flush_ranges(mapped.map, [(0, 1)]) == 1


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
@needs_numpy
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
    assert msyncext.flush_ranges(mapped.map, pairs, max_gap=Index(PAGE)) == 1
    if np is not None:
        mapped.dirty_pages(2, 4)
        assert msyncext.flush_ranges(mapped.map, pairs, max_gap=np.int64(PAGE)) == 1
    assert not mapped.page_dirty(2)
    assert not mapped.page_dirty(4)


def test_empty_batches_make_no_syscall(shm_map: MapFactory) -> None:
    mapped = shm_map(4 * PAGE)
    assert msyncext.flush_ranges(mapped.map, []) == 0
    assert msyncext.flush_ranges(mapped.map, [(0, 0), (4 * PAGE, 0)]) == 0
    assert msyncext.flush_ranges(memoryview(mapped.map)[4 * PAGE :], []) == 0


def test_every_access_kind_and_flag(shm_map: MapFactory) -> None:
    import mmap

    for access in (mmap.ACCESS_WRITE, mmap.ACCESS_READ, mmap.ACCESS_COPY):
        mapped = shm_map(8 * PAGE, access=access)
        for flags in sorted(msyncext.VALID_FLAGS):
            # MS_INVALIDATE merges no gap: pages 0 and 7 stay two runs.
            expected = 2 if flags in (SYNC | INVAL, ASYNC | INVAL) else 1
            assert (
                msyncext.flush_ranges(mapped.map, [(1, 2), (7 * PAGE, 5)], flags=flags)
                == expected
            )
    with mmap.mmap(-1, 8 * PAGE) as anonymous:
        assert msyncext.flush_ranges(anonymous, [(0, 1)], max_gap=0) == 1


def test_failure_stops_the_batch_and_names_the_run(shm_map: MapFactory) -> None:
    mapped = shm_map(8 * PAGE)
    with mlocked(mapped.map, 4 * PAGE, PAGE):
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
    mapped.map.close()  # no export left behind


# --- the C entry point checks what it is given --------------------------------


def test_c_entry_point_checks_its_arguments(shm_map: MapFactory) -> None:
    mapped = shm_map(4 * PAGE)
    m = mapped.map
    assert _msync.flush_batch(m, [(0, 4 * PAGE)], SYNC, 0) == 1
    assert _msync.flush_batch(m, [(0, 1), (2 * PAGE, 1)], SYNC, 2**80) == 1
    for args, exc_type, message in [
        ((m, [(0, 4 * PAGE + 1)], SYNC, 0), ValueError, "runs past the end"),
        ((m, [(0, 1)], 0x1000, 0), ValueError, "flags 4096 is not one"),
        ((m, [(0, 1)], SYNC, -1), ValueError, "max_gap must be a non-negative"),
        ((m, [(0, 1)], SYNC, 1.5), TypeError, "max_gap must be a non-negative"),
        ((m, [(0, 1)], SYNC), TypeError, "takes 4 positional arguments"),
    ]:
        with pytest.raises(exc_type, match=re.escape(message)):
            _msync.flush_batch(*args)
    m.close()  # no export left behind


def test_max_gap_whose_index_returns_a_non_int_names_it(shm_map: MapFactory) -> None:
    class Weird:
        def __index__(self) -> Any:
            return "7"

    mapped = shm_map(4 * PAGE)
    with pytest.raises(TypeError, match=r"^max_gap: "):
        msyncext.flush_ranges(mapped.map, [(0, 1)], max_gap=Weird())
    with pytest.raises(TypeError, match=re.escape("ranges[0] = ")):
        msyncext.flush_ranges(mapped.map, [(Weird(), 1)])


# --- MS_INVALIDATE never reaches pages nobody named ---------------------------


def test_invalidate_does_not_merge_across_a_locked_gap(shm_map: MapFactory) -> None:
    # Page 5 is mlocked; MS_INVALIDATE over it fails with EBUSY. With the
    # default max_gap, the two ranges would merge into pages 0..10.
    mapped = shm_map(16 * PAGE)
    with mlocked(mapped.map, 5 * PAGE, PAGE):
        pairs = [(0, 1), (10 * PAGE, 1)]
        for flags in (SYNC | INVAL, ASYNC | INVAL):
            if flags not in msyncext.VALID_FLAGS:
                continue
            assert msyncext.flush_ranges(mapped.map, pairs, flags=flags) == 2
        # Without MS_INVALIDATE the gap is merged (and the lock is harmless).
        assert msyncext.flush_ranges(mapped.map, pairs) == 1
        # The lock really bites when a named range covers it.
        with pytest.raises(OSError, match="run 2 of 3") as info:
            msyncext.flush_ranges(
                mapped.map, [*pairs, (5 * PAGE + 3, 1)], flags=SYNC | INVAL
            )
        assert info.value.errno == errno.EBUSY
        assert not isinstance(info.value, msyncext.WritebackError)
    mapped.map.close()


# --- every buffer flush accepts --------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: np.zeros(4096, dtype="datetime64[s]"), id="datetime64"),
        pytest.param(lambda: np.zeros(4096, dtype="timedelta64[ms]"), id="timedelta64"),
        pytest.param(
            lambda: np.zeros(512, dtype=[("when", "M8[us]"), ("x", "f8")]),
            id="record-with-datetime",
        ),
        pytest.param(lambda: np.zeros((64, 64), order="F"), id="fortran-order"),
        pytest.param(lambda: np.zeros((64, 64)).T, id="transposed"),
        pytest.param(
            lambda: np.array(["a", "bb"] * 100, dtype=np.dtypes.StringDType()),
            id="StringDType",
            marks=pytest.mark.skipif(
                not hasattr(np, "dtypes") or not hasattr(np.dtypes, "StringDType"),
                reason="numpy without StringDType",
            ),
        ),
    ],
)
@needs_numpy
def test_flush_ranges_accepts_what_flush_accepts(make: Any) -> None:
    array = make()
    msyncext.flush(array)
    msyncext.flush(array, 1, 3)
    assert msyncext.flush_ranges(array, [(0, 1), (1, 3)]) == 1


@needs_cachestat
@needs_numpy
def test_fortran_ordered_memmap_is_one_byte_range(tmp_path: Any) -> None:
    path = tmp_path / "fortran.bin"
    with path.open("wb") as f:
        f.truncate(64 * PAGE)
    array = np.memmap(path, dtype=np.float64, mode="r+", shape=(512, 64), order="F")
    fd = os.open(path, os.O_RDONLY)
    try:
        array[:, 0] = 1.0  # column 0: the first 4096 bytes in Fortran order
        array[:, 40] = 2.0  # column 40: file page 40
        msyncext.flush(array, 0, PAGE)
        assert cachestat(fd, 0, PAGE).dirty == 0
        assert cachestat(fd, 40 * PAGE, PAGE).dirty == 1
        assert msyncext.flush_ranges(array, [(40 * PAGE, 8)], max_gap=0) == 1
        assert cachestat(fd, 40 * PAGE, PAGE).dirty == 0
    finally:
        os.close(fd)
        del array


def test_non_contiguous_buffers_are_one_error_in_both() -> None:
    bufs: list[Any] = [memoryview(bytearray(64))[::2]]
    if np is not None:
        bufs.append(np.zeros((8, 8))[:, 1:])
    for buf in bufs:
        with pytest.raises(BufferError, match="is not contiguous") as one:
            msyncext.flush(buf)
        with pytest.raises(BufferError, match="is not contiguous") as other:
            msyncext.flush_ranges(buf, [(0, 1)])
        assert str(one.value) == str(other.value)
        assert type(buf).__name__ in str(one.value)


# --- long batches can be interrupted ------------------------------------------


class _Alarm(Exception):
    pass


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs setitimer")
def test_a_signal_handler_stops_a_long_batch(disk_map: MapFactory) -> None:
    npages = 60_000
    mapped = disk_map(npages * PAGE)
    pairs = [(page * PAGE, 1) for page in range(0, npages, 2)]
    # How long would the whole batch take here? Each msync of a clean page
    # on a disk filesystem costs tens of microseconds (a cache flush).
    started = time.perf_counter()
    msyncext.flush_ranges(mapped.map, pairs[:1000], max_gap=0)
    per_run = (time.perf_counter() - started) / 1000
    if per_run * len(pairs) < 0.6:
        pytest.skip(
            f"msync is too cheap here ({per_run * 1e6:.1f} us) to outlast 0.1 s"
        )

    def on_alarm(signum: int, frame: object) -> None:
        raise _Alarm

    previous = signal.signal(signal.SIGALRM, on_alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.1)
        started = time.perf_counter()
        with pytest.raises(_Alarm) as info:
            msyncext.flush_ranges(mapped.map, pairs, max_gap=0)
        handled = time.perf_counter() - started
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    # The handler ran while the batch was still going: it stopped the batch
    # (0 < done < total below), which the whole batch outlasts by far. No
    # bound in seconds: another job on the machine can slow each msync.
    notes = getattr(info.value, "__notes__", [])
    assert len(notes) == 1, notes
    found = re.search(r"after (\d+) of (\d+) msync calls", notes[0])
    assert found, notes
    done, total = int(found[1]), int(found[2])
    assert total == len(pairs)
    assert 0 < done < total, f"handled after {handled:.3f} s"
    mapped.map.close()  # no export left behind


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs setitimer")
def test_an_interrupted_ms_async_batch_does_not_claim_a_write(
    disk_map: MapFactory,
) -> None:
    # Issue 14, point 11: MS_ASYNC writes nothing before it returns; the note
    # of an interrupted batch must not say the pages "were written back".
    npages = 600_000  # a sparse 2.3 GiB file: only the map's size matters
    mapped = disk_map(npages * PAGE)
    pairs = [(page * PAGE, 1) for page in range(0, npages, 2)]

    def on_alarm(signum: int, frame: object) -> None:
        raise _Alarm

    previous = signal.signal(signal.SIGALRM, on_alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.02)
        with pytest.raises(_Alarm) as info:  # noqa: PT012 (a loop of calls)
            for _ in range(100):  # until the alarm lands inside a batch
                msyncext.flush_ranges(
                    mapped.map, pairs, flags=msyncext.MS_ASYNC, max_gap=0
                )
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    notes = getattr(info.value, "__notes__", [])
    if not notes:
        pytest.skip("the alarm landed between two batches")
    assert "written back" not in notes[0], notes
    assert "write-out of those runs was started" in notes[0], notes
    assert "not yet on the device" in notes[0], notes
    mapped.map.close()
