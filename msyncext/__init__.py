"""msync(2) for Python buffers that live in shared file mappings.

``flush`` writes the pages holding a byte range of an ``mmap.mmap``, a
memoryview slice of one or a ``numpy.memmap`` back to the file, with the
GIL released for the syscall; ``flush_ranges`` does the same for many
ranges of one buffer in one call.

``flush`` is the compiled function itself: a Python wrapper around it
measured ~100 ns on a ~330 ns call (30 %). ``flush_ranges`` is a thin
Python function for its keyword defaults; its arguments are checked and
the per-pair work (checking, sorting and merging a million pairs) is done
in C, because Python could not meet its time and memory targets (see the
README).
"""

from msyncext import _msync
from msyncext._msync import (
    MS_ASYNC,
    MS_INVALIDATE,
    MS_SYNC,
    PAGESIZE,
    clear_writeback_error,
    flush,
)

# Nothing else is imported at run time: typing alone costs ~7 ms, and the
# whole import should stay under 2 ms. Type checkers read these imports as
# any others (a flag they do not know is never true; spelt TYPE_CHECKING,
# mypy would take it for a module attribute, and stubtest would report it
# missing once deleted); the annotations below are strings, never
# evaluated. The helpers are deleted at the end, so that the namespace
# holds the API only.
_TYPE_CHECKING = False
if _TYPE_CHECKING:
    from collections.abc import Iterable
    from typing import SupportsIndex

    # What the C code pins: anything with the buffer protocol (the stub's
    # alias, which adds numpy arrays for 3.11's type checkers).
    from msyncext._msync import _BufferLike as Buffer

__version__ = "0.2.0.dev0"

__all__ = [
    "DEFAULT_MAX_GAP",
    "MS_ASYNC",
    "MS_INVALIDATE",
    "MS_SYNC",
    "PAGESIZE",
    "VALID_FLAGS",
    "WritebackError",
    "__version__",
    "clear_writeback_error",
    "flush",
    "flush_ranges",
]

#: Default ``max_gap`` of :func:`flush_ranges`, in bytes (see the README).
DEFAULT_MAX_GAP = 1024 * 1024

#: Every ``flags`` value this platform's msync accepts: exactly one of
#: MS_SYNC and MS_ASYNC, optionally with MS_INVALIDATE, less what the
#: kernel refuses (FreeBSD: MS_ASYNC | MS_INVALIDATE). The C checks use
#: the same table.
VALID_FLAGS: frozenset[int] = frozenset(_msync.VALID_FLAGS)


class WritebackError(OSError):
    """Write-back of a file failed; data written to it may be lost.

    Raised by the flush that sees the failure and, from then on, by every
    flush of that file in this process, through any map of it, made before
    or after the failure, until :func:`clear_writeback_error` is called
    for the file. ``errno`` is the first failure's.
    """

    def __str__(self) -> str:
        return (
            f"{super().__str__()}: write-back of this file failed; data "
            "written to it before the failure may be lost (the kernel reports "
            "a failure only once, so a later msync would wrongly succeed). "
            "Rewrite that data from your own copy, then call "
            "msyncext.clear_writeback_error(buf) to flush this file again."
        )


_msync._set_writeback_error(WritebackError)


class _MSSyncByName(int):
    """MS_SYNC, shown by name where help() shows flush_ranges' default."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "MS_SYNC"


_MS_SYNC_BY_NAME = _MSSyncByName(MS_SYNC)
# flush's text signature names its default, flags=MS_SYNC, and inspect (so
# help()) evaluates that name in the compiled module: there it shows so.
setattr(_msync, "MS_SYNC", _MS_SYNC_BY_NAME)  # noqa: B010 (a Final in the stub)


class _MaxGapByName(int):
    """DEFAULT_MAX_GAP, shown by name where help() shows flush_ranges'
    default (the C code reads an int subclass without copying it)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "DEFAULT_MAX_GAP"


_DEFAULT_MAX_GAP_BY_NAME = _MaxGapByName(DEFAULT_MAX_GAP)


def flush_ranges(
    buf: "Buffer",
    ranges: "Iterable[Iterable[SupportsIndex]] | Buffer",
    *,
    flags: "SupportsIndex" = _MS_SYNC_BY_NAME,
    max_gap: "SupportsIndex" = _DEFAULT_MAX_GAP_BY_NAME,
) -> int:
    """Write back the pages holding every ``(offset, size)`` pair of ``ranges``.

    ``ranges`` is any iterable of pairs, or an (n, 2) integer array. All
    pairs are checked before any syscall. Their covering pages are sorted
    and merged into runs: runs that overlap or touch always merge, and runs
    at most ``max_gap`` bytes apart merge too (not with MS_INVALIDATE),
    which also writes back dirty pages in the gap but saves a syscall and,
    on most filesystems, a device cache flush per run. The runs are synced
    with the GIL released, taken back every 20 ms for signal handlers.
    ``flags`` is one of VALID_FLAGS. Returns the number of msync(2) calls
    made.

    Raises, before any syscall: ValueError for a pair outside ``buf``,
    flags not in VALID_FLAGS, a negative ``max_gap`` or a closed mmap;
    TypeError for a non-integer value (bool included), a pair that is not
    two integers, or a ``buf`` without a buffer or whose memory is a copy
    (bytes, bytearray, array.array); BufferError for a non-contiguous
    ``buf``. Then: OSError (errno kept, naming the run) if msync refuses a
    run and msyncext can show why (EBUSY, ENOMEM); WritebackError for any
    other msync failure, or a failure of this file recorded earlier.
    """
    # flags and max_gap are checked in C, with the messages flush gives.
    return _msync.flush_batch(buf, ranges, flags, max_gap)


del _TYPE_CHECKING, _MSSyncByName, _MS_SYNC_BY_NAME
del _MaxGapByName, _DEFAULT_MAX_GAP_BY_NAME
