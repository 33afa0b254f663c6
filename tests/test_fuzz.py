"""Bad input, fuzzed: only the documented exceptions, never a crash.

Documented: TypeError (non-integers, bool, objects without a buffer),
ValueError (negative values, ranges past the end, integers beyond any
buffer, bad flags, a closed mmap), BufferError (non-contiguous buffers).
A batch with any bad pair flushes nothing, shown with cachestat(2)
dirty-page counts.
"""

from __future__ import annotations

import array
import mmap
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from fractions import Fraction
from typing import Any

import blockdev
import pytest
from conftest import BadIndex, Index, np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import msyncext
from msyncext import PAGESIZE

SIZE = 4 * PAGESIZE
DOCUMENTED = (TypeError, ValueError, BufferError)
FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


VALID_FLAGS = sorted(msyncext.VALID_FLAGS)

integers = st.one_of(
    st.integers(-3, SIZE + 3),
    st.integers(-(2**70), 2**70),
    st.sampled_from([sys.maxsize, sys.maxsize + 1, -sys.maxsize - 1, -sys.maxsize - 2]),
)
not_integers = st.one_of(
    st.none(),
    st.booleans(),
    st.floats(allow_nan=True),
    st.text(max_size=3),
    st.binary(max_size=3),
    st.just(Fraction(1, 2)),
    st.builds(object),
    st.just(BadIndex()),
    # numpy's scalars, where numpy is installed (see conftest.py).
    *(
        [st.sampled_from([np.bool_(True), np.float64(1.0), np.float32(-0.0)])]
        if np is not None
        else []
    ),
)
integer_likes = st.one_of(
    st.builds(Index, st.integers(-3, SIZE + 3)),
    *(
        [
            st.builds(np.int64, st.integers(-3, SIZE + 3)),
            st.builds(np.uint32, st.integers(0, SIZE + 3)),
        ]
        if np is not None
        else []
    ),
)
values = st.one_of(integers, integer_likes, not_integers)
flag_values = st.one_of(
    st.sampled_from(VALID_FLAGS), integers, integer_likes, not_integers
)


def _is_integer(value: object) -> bool:
    if isinstance(value, bool) or (np is not None and isinstance(value, np.bool_)):
        return False
    return hasattr(value, "__index__")


def _int(value: object) -> int:
    return int(value.__index__())  # type: ignore[attr-defined]


def _expected_flush_error(
    length: int | None, offset: object, size: object, flags: object
) -> type[BaseException] | None:
    """What flush(open-map-of-length, offset, size, flags=flags) must raise.

    ``length`` None means the buffer is not usable (the caller handles it).
    Checks run in this order: offset, size, flags, then the range.
    """
    values: list[tuple[object, str]] = [(offset, "count")]
    if size is not None:
        values.append((size, "count"))
    values.append((flags, "flags"))
    for value, kind in values:
        if isinstance(value, BadIndex):
            return ZeroDivisionError
        if not _is_integer(value):
            return TypeError
        number = _int(value)
        if kind == "flags":
            if number not in VALID_FLAGS:
                return ValueError
        elif number < 0 or number > sys.maxsize:
            return ValueError
    assert length is not None
    start = _int(offset)
    if start > length or (size is not None and _int(size) > length - start):
        return ValueError
    return None


@pytest.fixture(scope="module")
def directory() -> Iterator[str]:
    # A disk-backed directory so cachestat counts dirty pages (not /dev/shm).
    with tempfile.TemporaryDirectory(prefix="msyncext-fuzz-") as where:
        yield where


@pytest.fixture(scope="module")
def mapped(directory: str) -> Iterator[tuple[int, mmap.mmap]]:
    fd = os.open(os.path.join(directory, "fuzz"), os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, SIZE)
    m = mmap.mmap(fd, SIZE)
    try:
        yield fd, m
    finally:
        m.close()
        os.close(fd)


@FUZZ
@given(offset=values, size=st.one_of(st.none(), values), flags=flag_values)
def test_flush_arguments(
    mapped: tuple[int, mmap.mmap], offset: object, size: object, flags: object
) -> None:
    _, m = mapped
    expected = _expected_flush_error(len(m), offset, size, flags)
    exc = _outcome(lambda: msyncext.flush(m, offset, size, flags=flags))  # type: ignore[arg-type]
    assert type(exc) is (type(None) if expected is None else expected), exc
    if exc is not None and expected is not ZeroDivisionError:
        assert str(exc)  # ZeroDivisionError comes from the caller's __index__


def _outcome(call: Callable[[], object]) -> Exception | None:
    """The exception ``call()`` raised, or None."""
    try:
        call()
    except Exception as exc:
        return exc
    return None


def _closed_map() -> mmap.mmap:
    m = mmap.mmap(-1, PAGESIZE)
    m.close()
    return m


BUFFERS: dict[str, tuple[Callable[[], Any], type[BaseException] | None]] = {
    # Memory of their own (copies), never a mapping of a file: refused.
    "bytes": (lambda: b"abc", TypeError),
    "empty-bytes": (lambda: b"", TypeError),
    "bytearray": (lambda: bytearray(3 * PAGESIZE), TypeError),
    "array": (lambda: array.array("d", range(100)), TypeError),
    "view-of-bytearray": (lambda: memoryview(bytearray(100))[5:], TypeError),
    "map-slice": (lambda: mmap.mmap(-1, 2 * PAGESIZE)[5:50], TypeError),
    "anon-map": (lambda: mmap.mmap(-1, 2 * PAGESIZE), None),
    "private-map-slice": (lambda: memoryview(mmap.mmap(-1, 2 * PAGESIZE))[5:], None),
    "closed-map": (_closed_map, ValueError),
    "strided-view": (lambda: memoryview(bytearray(100))[::2], BufferError),
    "str": (lambda: "text", TypeError),
    "none": (lambda: None, TypeError),
    "int": (lambda: 7, TypeError),
    "object": (object, TypeError),
    "list": (lambda: [1, 2, 3], TypeError),
}
if np is not None:  # where numpy is installed (see conftest.py)
    BUFFERS |= {
        "numpy": (lambda: np.zeros(1000), None),
        # NumPy refuses a contiguous export of this with ValueError,
        # memoryview with BufferError: both entry points say BufferError.
        "strided-numpy": (lambda: np.zeros((4, 4))[:, 1:], BufferError),
        "fortran-numpy": (lambda: np.zeros((4, 4), order="F"), None),
        "datetime-numpy": (lambda: np.zeros(8, dtype="M8[s]"), None),
    }


@FUZZ
@given(
    which=st.sampled_from(sorted(BUFFERS)),
    offset=st.integers(0, 8),
    size=st.one_of(st.none(), st.integers(0, 8)),
    batched=st.booleans(),
)
def test_objects(which: str, offset: int, size: int | None, batched: bool) -> None:
    make, expected = BUFFERS[which]
    buf = make()
    if expected is not None:
        length = 0
    elif np is not None and isinstance(buf, np.ndarray):
        length = buf.nbytes  # a memoryview refuses datetime64
    else:
        length = memoryview(buf).nbytes
    if expected is None and offset + (size or 0) > length:
        expected = ValueError
    if batched:
        exc = _outcome(lambda: msyncext.flush_ranges(buf, [(offset, size or 0)]))
    else:
        exc = _outcome(lambda: msyncext.flush(buf, offset, size))
    assert type(exc) is (type(None) if expected is None else expected), (which, exc)


# -- batches ----------------------------------------------------------------

good_pairs = st.integers(0, SIZE).flatmap(
    lambda off: st.tuples(st.just(off), st.integers(0, SIZE - off))
)
bad_pairs = st.one_of(
    st.tuples(st.integers(max_value=-1), st.integers(0, 10)),
    st.tuples(st.integers(0, 10), st.integers(max_value=-1)),
    st.tuples(st.integers(SIZE + 1, 2**70), st.integers(0, 10)),
    st.integers(0, SIZE).flatmap(
        lambda off: st.tuples(st.just(off), st.integers(SIZE - off + 1, 2**70))
    ),
    st.tuples(not_integers, st.integers(0, 10)),
    st.tuples(st.integers(0, 10), not_integers),
    st.one_of(
        st.tuples(st.integers(0, 10)),
        st.tuples(st.integers(0, 10), st.integers(0, 10), st.integers(0, 10)),
        st.none(),
        st.integers(),
        st.text(max_size=1),  # iterable, but not a pair
    ),
)


@FUZZ
@given(
    before=st.lists(good_pairs, max_size=5),
    bad=bad_pairs,
    after=st.lists(good_pairs, max_size=5),
    flags=st.sampled_from(VALID_FLAGS),
    as_generator=st.booleans(),
)
def test_invalid_batch_flushes_nothing(
    mapped: tuple[int, mmap.mmap],
    directory: str,
    before: list[tuple[int, int]],
    bad: object,
    after: list[tuple[int, int]],
    flags: int,
    as_generator: bool,
) -> None:
    reason = blockdev.cachestat_unavailable(directory)
    if reason is not None:
        pytest.skip(reason)
    fd, m = mapped
    # An MS_ASYNC of an earlier example may have left later write-out
    # passes of this file pending (they write what is dirty then).
    deadline = time.monotonic() + 10
    while msyncext._msync._writeout_pending() and time.monotonic() < deadline:
        time.sleep(0.01)
    for page in range(0, SIZE, PAGESIZE):
        m[page] = (m[page] + 1) % 256
    assert blockdev.cachestat(fd).dirty == SIZE // PAGESIZE
    pairs: list[Any] = [*before, bad, *after]
    ranges = (p for p in pairs) if as_generator else pairs
    # ZeroDivisionError: a caller's __index__ raised it; it passes through.
    with pytest.raises((TypeError, ValueError, ZeroDivisionError)) as info:
        msyncext.flush_ranges(m, ranges, flags=flags, max_gap=0)
    if not isinstance(info.value, ZeroDivisionError):
        assert f"ranges[{len(before)}]" in str(info.value)
    # Nothing was written back: every page is still dirty.
    assert blockdev.cachestat(fd).dirty == SIZE // PAGESIZE
    msyncext.flush(m)
    assert blockdev.cachestat(fd).dirty == 0


@FUZZ
@given(offset=values, size=values, flags=flag_values)
def test_invalid_single_flush_flushes_nothing(
    mapped: tuple[int, mmap.mmap],
    directory: str,
    offset: object,
    size: object,
    flags: object,
) -> None:
    fd, m = mapped
    if _expected_flush_error(len(m), offset, size, flags) is None:
        return  # a valid call: covered by test_flush_arguments
    reason = blockdev.cachestat_unavailable(directory)
    if reason is not None:
        pytest.skip(reason)
    m[0] = (m[0] + 1) % 256
    m[SIZE - 1] = (m[SIZE - 1] + 1) % 256
    with pytest.raises((*DOCUMENTED, ZeroDivisionError)):
        msyncext.flush(m, offset, size, flags=flags)  # type: ignore[arg-type]
    assert blockdev.cachestat(fd).dirty == 2
    msyncext.flush(m)


@FUZZ
@given(
    flags=flag_values,
    max_gap=st.one_of(st.integers(-(2**70), 2**70), not_integers),
)
def test_flush_ranges_options(
    mapped: tuple[int, mmap.mmap], flags: object, max_gap: object
) -> None:
    _, m = mapped
    bad_flags = _expected_flush_error(SIZE, 0, 0, flags)
    calls: list[int] = []
    exc = _outcome(
        lambda: calls.append(
            msyncext.flush_ranges(m, [(0, 1)], flags=flags, max_gap=max_gap)  # type: ignore[arg-type]
        )
    )
    good_gap = type(max_gap) is int and max_gap >= 0
    if bad_flags is not None:
        assert type(exc) is bad_flags, exc
    elif not good_gap:
        assert isinstance(exc, (*DOCUMENTED, ZeroDivisionError)), exc
    else:
        assert exc is None
        assert calls == [1]


# -- pairs whose __index__ runs code that changes the batch under us --------


def _pair_item_dropped_by_its_own_index() -> None:
    """Child: an item whose __index__ empties the list that holds it."""
    m = mmap.mmap(-1, 4 * PAGESIZE)
    ranges: list[Any] = []

    class Evil:
        def __index__(self) -> int:
            ranges.clear()  # the list held the only other reference
            return 2**100  # out of range: the error message shows the pair

    ranges += [(Evil(), 1), (0, 1)]
    with pytest.raises(ValueError, match=re.escape("ranges[0]")):
        msyncext.flush_ranges(m, ranges)


def test_flush_ranges_survives_a_pair_freed_by_its_index() -> None:
    # Each item is owned while it is converted (the iterator hands out
    # references), so freeing the list from __index__ is harmless; -X dev's
    # debug allocator would turn a use after free into a crash.
    blockdev.run_isolated(
        "test_fuzz",
        "_pair_item_dropped_by_its_own_index",
        timeout=60,
        python_flags=("-X", "dev"),
    )
