import sys
from collections.abc import Iterable
from typing import Any, Final, Protocol, SupportsIndex, TypeAlias, type_check_only

if sys.version_info >= (3, 12):
    from collections.abc import Buffer
else:
    from typing_extensions import Buffer

# Counts and flags are SupportsIndex, as the C code takes any __index__
# (numpy integers included). It refuses bool, which mypy cannot: bool is
# an int, so flush(m, True) type-checks and raises TypeError at runtime.

@type_check_only
class _NumPyBuffer(Protocol):
    # numpy's stubs declare ndarray.__buffer__ only for Python 3.12 and
    # later (numpy < 2 not at all), so for 3.11 a numpy.memmap is not a
    # Buffer although it exports one. numpy arrays and scalars all have
    # __array_interface__ and all export a buffer.
    @property
    def __array_interface__(self) -> dict[str, Any]: ...

# What the C code pins: anything with the buffer protocol. It refuses
# non-contiguous buffers (BufferError), which no type can say.
_BufferLike: TypeAlias = Buffer | _NumPyBuffer

# Any iterable of pairs, each pair any iterable of two integers (tuple,
# list, a row of an ndarray), or an (n, 2) integer array read through the
# buffer protocol. Lengths and shapes are not types: a 3-tuple, a 1-D or
# float array type-check and raise TypeError at runtime.
_Ranges: TypeAlias = Iterable[Iterable[SupportsIndex]] | _BufferLike

PAGESIZE: Final[int]
MS_SYNC: Final[int]
MS_ASYNC: Final[int]
MS_INVALIDATE: Final[int]
VALID_FLAGS: Final[tuple[int, ...]]
BUILD_MODE: Final[str]

def flush(
    buf: _BufferLike,
    offset: SupportsIndex = 0,
    size: SupportsIndex | None = None,
    *,
    flags: SupportsIndex = ...,
    evict: bool = False,
) -> None:
    """Write back the pages holding ``buf[offset:offset+size]`` with msync(2)."""

def flush_batch(
    buf: _BufferLike,
    ranges: _Ranges,
    flags: SupportsIndex,
    max_gap: SupportsIndex,
    /,
) -> int: ...
def batch_runs(
    buf: _BufferLike,
    ranges: _Ranges,
    flags: SupportsIndex,
    max_gap: SupportsIndex,
    /,
) -> list[tuple[int, int]]: ...
def clear_writeback_error(buf: _BufferLike, /) -> int | None:
    """Forget a recorded write-back failure of the file mapped under ``buf``."""

def page_offset(buf: _BufferLike, /) -> int: ...
def writeback_tracking() -> str: ...
def writeout_status() -> tuple[str, str]: ...
def _writeout_pending() -> int: ...
def _set_writeback_error(cls: type[OSError], /) -> None: ...
