import sys
from collections.abc import Iterable, Sequence
from typing import Final, SupportsIndex

if sys.version_info >= (3, 12):
    from collections.abc import Buffer
else:
    from typing_extensions import Buffer

PAGESIZE: Final[int]
MS_SYNC: Final[int]
MS_ASYNC: Final[int]
MS_INVALIDATE: Final[int]
VALID_FLAGS: Final[tuple[int, ...]]
BUILD_MODE: Final[str]

def flush(
    buf: Buffer,
    offset: SupportsIndex = 0,
    size: SupportsIndex | None = None,
    *,
    flags: SupportsIndex = ...,
) -> None:
    """Write back the pages holding ``buf[offset:offset+size]`` with msync(2)."""

def flush_batch(
    buf: Buffer,
    ranges: Iterable[Sequence[SupportsIndex]] | Buffer,
    flags: SupportsIndex,
    max_gap: SupportsIndex,
    /,
) -> int: ...
def batch_runs(
    buf: Buffer,
    ranges: Iterable[Sequence[SupportsIndex]] | Buffer,
    flags: SupportsIndex,
    max_gap: SupportsIndex,
    /,
) -> list[tuple[int, int]]: ...
def clear_writeback_error(buf: Buffer, /) -> int | None:
    """Forget a recorded write-back failure of the file mapped under ``buf``."""

def page_offset(buf: Buffer, /) -> int: ...
def _set_writeback_error(cls: type[OSError], /) -> None: ...
