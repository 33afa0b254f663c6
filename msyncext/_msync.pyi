from typing import Final

PAGESIZE: Final[int]
MS_SYNC: Final[int]
MS_ASYNC: Final[int]
MS_INVALIDATE: Final[int]

def flush(
    buf: object, offset: int = 0, size: int | None = None, *, flags: int = ...
) -> None:
    """Write back the pages holding ``buf[offset:offset+size]`` with msync(2)."""

def flush_runs(buf: object, runs: list[int], flags: int, /) -> int: ...
def page_offset(buf: object, /) -> int: ...
