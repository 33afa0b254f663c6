"""Turn (offset, size) pairs into sorted, merged runs of pages.

Pure arithmetic, kept apart from the syscall so that it can be tested on
its own: the C side takes the runs this returns and msyncs each one.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from typing import SupportsIndex


def _count(value: object, what: str, index: int, pair: object) -> int:
    """``value`` as a non-negative int, or an error naming the pair."""
    if type(value) is not int:
        if isinstance(value, bool) or not isinstance(value, SupportsIndex):
            raise TypeError(
                f"ranges[{index}] = {pair!r}: {what} must be an integer, "
                f"not {type(value).__name__}"
            )
        value = operator.index(value)
    if value < 0:
        raise ValueError(f"ranges[{index}] = {pair!r}: {what} {value} is negative")
    return value


def covering_runs(
    ranges: Iterable[tuple[int, int]],
    *,
    nbytes: int,
    head: int,
    pagesize: int,
    max_gap: int,
) -> list[int]:
    """Validate every pair, then return the page runs that cover them.

    Pages are numbered from the page holding byte 0 of the buffer, which
    starts ``head`` bytes into that page. The result is the flat list
    ``[first, count, first, count, ...]`` in ascending order; runs that
    overlap or touch always merge, and runs separated by at most
    ``max_gap`` bytes of whole pages merge too. Empty pairs are skipped.
    """
    try:
        iterator = iter(ranges)
    except TypeError:
        raise TypeError(
            f"ranges must be an iterable of (offset, size) pairs, not "
            f"{type(ranges).__name__}"
        ) from None
    spans: list[tuple[int, int]] = []
    for index, pair in enumerate(iterator):
        try:
            offset, size = pair
        except (TypeError, ValueError):
            raise TypeError(
                f"ranges[{index}] = {pair!r} is not an (offset, size) pair"
            ) from None
        offset = _count(offset, "offset", index, pair)
        size = _count(size, "size", index, pair)
        if offset > nbytes or size > nbytes - offset:
            raise ValueError(
                f"ranges[{index}] = {pair!r}: size {size} at offset {offset} "
                f"runs past the end of a {nbytes}-byte buffer"
            )
        if size:
            start = head + offset
            spans.append((start // pagesize, (start + size - 1) // pagesize))
    spans.sort()

    gap_pages = max_gap // pagesize
    runs: list[int] = []
    first = last = -1
    for lo, hi in spans:
        if first >= 0 and lo - last - 1 <= gap_pages:
            last = max(last, hi)
            continue
        if first >= 0:
            runs += (first, last - first + 1)
        first, last = lo, hi
    if first >= 0:
        runs += (first, last - first + 1)
    return runs
