"""Type-checked, never run: the stubs accept what the runtime accepts.

CI runs ``mypy --strict msyncext tests/typing`` for Python 3.11 (Buffer from
typing_extensions) and 3.12 (collections.abc.Buffer). Each call below that
the runtime refuses carries ``# type: ignore[<code>]``: mypy --strict warns
about unused ignores, so the check fails if a stub stops rejecting it.

Refused at runtime but accepted here, because a type cannot say so:
``flush(m, True)`` (bool is an int to mypy; the C code refuses bool),
``flush_ranges(m, [(0, 1, 2)])`` (length), ``flush_ranges(m, b"ab")`` and a
1-D or float ndarray as ``ranges`` (shape and dtype), a non-contiguous buf.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from typing import assert_type

import numpy as np
import numpy.typing as npt

import msyncext
from msyncext import (
    DEFAULT_MAX_GAP,
    MS_ASYNC,
    MS_INVALIDATE,
    MS_SYNC,
    PAGESIZE,
    VALID_FLAGS,
    WritebackError,
    clear_writeback_error,
    flush,
    flush_ranges,
)


def constants() -> None:
    assert_type(PAGESIZE, int)
    assert_type(MS_SYNC | MS_INVALIDATE, int)
    assert_type(DEFAULT_MAX_GAP, int)
    assert_type(VALID_FLAGS, frozenset[int])
    assert_type(msyncext.__version__, str)


def writeback_error_is_an_oserror(exc: WritebackError) -> OSError:
    return exc


def buffers(
    m: mmap.mmap,
    mm: np.memmap[tuple[int], np.dtype[np.uint8]],
    arr: npt.NDArray[np.float64],
) -> None:
    assert_type(flush(m), None)
    flush(memoryview(m)[4096:8192])
    flush(bytearray(8))
    flush(mm)
    flush(mm[10:20])
    flush(arr)
    flush(buf=m)
    assert_type(clear_writeback_error(m), int | None)
    assert_type(clear_writeback_error(mm), int | None)
    assert_type(flush_ranges(mm, [(0, 1)]), int)

    flush(42)  # type: ignore[arg-type]
    flush("x")  # type: ignore[arg-type]
    flush(None)  # type: ignore[arg-type]
    flush([0, 1])  # type: ignore[arg-type]
    flush_ranges(42, [(0, 1)])  # type: ignore[arg-type]
    clear_writeback_error(None)  # type: ignore[arg-type]
    clear_writeback_error("x")  # type: ignore[arg-type]
    clear_writeback_error(buf=m)  # type: ignore[call-arg]


def counts_and_flags(m: mmap.mmap) -> None:
    flush(m, 0)
    flush(m, 10, 20)
    flush(m, 10, None)
    flush(m, offset=10, size=None, flags=MS_ASYNC)
    flush(m, np.int64(10), np.uint32(20), flags=np.int32(MS_SYNC))
    flush(m, flags=MS_SYNC | MS_INVALIDATE)

    flush(m, 1.5)  # type: ignore[arg-type]
    flush(m, "1")  # type: ignore[arg-type]
    flush(m, 0, 2.0)  # type: ignore[arg-type]
    flush(m, np.float64(1))  # type: ignore[arg-type]
    flush(m, np.True_)  # type: ignore[arg-type]
    flush(m, flags=None)  # type: ignore[arg-type]
    flush(m, flags="MS_SYNC")  # type: ignore[arg-type]
    flush(m, 0, 1, MS_SYNC)  # type: ignore[call-arg]
    flush(m, length=1)  # type: ignore[call-arg]


def pairs(n: int) -> Iterator[tuple[int, int]]:
    return ((i * PAGESIZE, 1) for i in range(n))


def ranges(
    m: mmap.mmap,
    table: npt.NDArray[np.int64],
    rows: list[npt.NDArray[np.int64]],
) -> None:
    assert_type(flush_ranges(m, [(0, 1), (PAGESIZE, 10)]), int)
    flush_ranges(m, [[0, 1], [PAGESIZE, 10]])
    flush_ranges(m, ((0, 1), (PAGESIZE, 10)))
    flush_ranges(m, [])
    flush_ranges(m, pairs(3))
    flush_ranges(m, ((i, 1) for i in range(3)))
    flush_ranges(m, [(np.int64(0), np.uint16(1))])
    flush_ranges(m, table)
    flush_ranges(m, rows)
    flush_ranges(m, table.data)  # a 2-D memoryview
    flush_ranges(m, {(0, 1), (PAGESIZE, 10)})
    flush_ranges(m, [range(0, 2)])
    flush_ranges(m, [(0, 1)], flags=MS_ASYNC, max_gap=0)
    flush_ranges(m, [(0, 1)], flags=np.int32(MS_SYNC), max_gap=np.int64(0))

    flush_ranges(m, 5)  # type: ignore[arg-type]
    flush_ranges(m, None)  # type: ignore[arg-type]
    flush_ranges(m, [5])  # type: ignore[list-item]
    flush_ranges(m, ["ab"])  # type: ignore[list-item]
    flush_ranges(m, [(1.5, 2)])  # type: ignore[list-item]
    flush_ranges(m, [(0, None)])  # type: ignore[list-item]
    flush_ranges(m, ((i / 2, 1) for i in range(3)))  # type: ignore[misc]
    flush_ranges(m, [(0, 1)], MS_SYNC)  # type: ignore[call-arg]
    flush_ranges(m, [(0, 1)], max_gap=None)  # type: ignore[arg-type]
    flush_ranges(m, [(0, 1)], max_gap=1.5)  # type: ignore[arg-type]
    flush_ranges(m, [(0, 1)], flags="MS_SYNC")  # type: ignore[arg-type]
