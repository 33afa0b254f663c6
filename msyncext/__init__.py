"""msync(2) for Python buffers that live in shared file mappings.

``flush`` writes the pages holding a byte range of an ``mmap.mmap``, a
memoryview slice of one or a ``numpy.memmap`` back to the file, with the
GIL released for the syscall; ``flush_ranges`` does the same for many
ranges of one buffer in one call.

``flush`` is the compiled function itself: a Python wrapper around it
measured ~100 ns on a ~330 ns call (30 %). ``flush_ranges`` checks its
options here; the per-pair work (checking, sorting and merging a million
pairs) is done in C, because Python could not meet its time and memory
targets (see the README).
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from typing import TYPE_CHECKING, SupportsIndex

from msyncext._msync import (
    MS_ASYNC,
    MS_INVALIDATE,
    MS_SYNC,
    PAGESIZE,
    _set_writeback_error,
    clear_writeback_error,
    flush,
)
from msyncext._msync import VALID_FLAGS as _VALID_FLAGS_TUPLE
from msyncext._msync import flush_batch as _flush_batch

if TYPE_CHECKING:
    # Type-check time only: typing_extensions, which the stub imports for
    # Buffer on 3.11, is not a runtime dependency.
    from msyncext._msync import _BufferLike

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
VALID_FLAGS: frozenset[int] = frozenset(_VALID_FLAGS_TUPLE)


class WritebackError(OSError):
    """Write-back of a file failed; data written to it may be lost.

    Raised by the flush that sees the failure and, from then on, by every
    flush of a mapping of that file that existed in this process then,
    until :func:`clear_writeback_error` is called for the file. ``errno``
    is the first failure's.
    """

    def __str__(self) -> str:
        return (
            f"{super().__str__()}: write-back of this file failed; data "
            "written to it before the failure may be lost (the kernel reports "
            "a failure only once, so a later msync would wrongly succeed). "
            "Rewrite that data from your own copy, then call "
            "msyncext.clear_writeback_error(buf) to flush this file again."
        )


_set_writeback_error(WritebackError)


def _checked_flags(flags: object) -> int:
    """``flags`` as an int, or TypeError/ValueError naming it."""
    if isinstance(flags, bool) or not hasattr(type(flags), "__index__"):
        raise TypeError(
            f"flags must be an integer, not {flags!r} ({type(flags).__name__})"
        )
    value = operator.index(flags)  # type: ignore[arg-type]
    if value not in VALID_FLAGS:
        names = {
            MS_SYNC: "MS_SYNC",
            MS_ASYNC: "MS_ASYNC",
            MS_SYNC | MS_INVALIDATE: "MS_SYNC | MS_INVALIDATE",
            MS_ASYNC | MS_INVALIDATE: "MS_ASYNC | MS_INVALIDATE",
        }
        allowed = ", ".join(f"{names[v]} ({v})" for v in _VALID_FLAGS_TUPLE)
        raise ValueError(f"flags {flags!r} is not one this platform accepts: {allowed}")
    return value


def flush_ranges(
    buf: _BufferLike,
    ranges: Iterable[Iterable[SupportsIndex]] | _BufferLike,
    *,
    flags: SupportsIndex = MS_SYNC,
    max_gap: SupportsIndex = DEFAULT_MAX_GAP,
) -> int:
    """Write back the pages holding every ``(offset, size)`` pair of ``ranges``.

    ``ranges`` is any iterable of pairs, or an (n, 2) integer array. All
    pairs are checked before any syscall. Their covering pages are sorted
    and merged into runs: runs that overlap or touch always merge, and runs
    at most ``max_gap`` bytes apart merge too (not with MS_INVALIDATE),
    which also writes back dirty pages in the gap but saves a syscall and,
    on most filesystems, a device cache flush per run. The runs are synced
    with the GIL released, taken back every 20 ms for signal handlers.
    Returns the number of msync(2) calls made.
    """
    if flags is not MS_SYNC:
        flags = _checked_flags(flags)
    return _flush_batch(buf, ranges, flags, max_gap)
