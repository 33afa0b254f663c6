"""Fixtures shared by the test modules: real files, real mappings.

There is deliberately no tests/__init__.py: with pytest's default import
mode the repository root stays off sys.path, so ``import msyncext`` finds
the installed package (which has the compiled module), not the source
folder beside this directory.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from blockdev import c_library, cachestat, cachestat_unavailable

import msyncext

PAGE = msyncext.PAGESIZE
SHM = Path("/dev/shm")

# numpy is a test dependency wherever numpy has a wheel. Where it has none
# (in cibuildwheel's manylinux2014 containers, for 3.14 and later: numpy's
# Linux wheels there need glibc 2.28), the wheel is tested without it rather
# than with a numpy compiled from source: the tests that need it skip.
np: Any
try:
    import numpy as np
except ImportError:
    np = None
NUMPY_MISSING = "numpy is not installed"
needs_numpy = pytest.mark.skipif(np is None, reason=NUMPY_MISSING)


def numpy_or_skip() -> Any:
    """numpy, or skip the test that asked for it."""
    if np is None:
        pytest.skip(NUMPY_MISSING)
    return np


# Probed on the directory the disk fixtures use: tmpfs, for one, keeps no
# dirty-page accounting that cachestat(2) could report.
CACHESTAT_MISSING = cachestat_unavailable(tempfile.gettempdir())
needs_cachestat = pytest.mark.skipif(
    CACHESTAT_MISSING is not None, reason=CACHESTAT_MISSING or ""
)


class Index:
    """An integer-like object that is not an int (it has __index__)."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __index__(self) -> int:
        return self.value


class BadIndex:
    """An integer-like object whose __index__ raises."""

    def __index__(self) -> int:
        raise ZeroDivisionError("from __index__")


class MappedFile(NamedTuple):
    path: Path
    fd: int
    map: mmap.mmap

    def dirty_pages(self, *pages: int) -> None:
        """Write a byte in each given page of the file through the map."""
        for page in pages:
            self.map[page * PAGE] = (self.map[page * PAGE] + 1) % 256

    def page_dirty(self, page: int) -> bool:
        """Whether the kernel still holds the given file page dirty."""
        state = cachestat(self.fd, page * PAGE, PAGE)
        return state.dirty + state.writeback > 0


MapFactory = Callable[..., MappedFile]


@contextlib.contextmanager
def mlocked(m: mmap.mmap, offset: int, length: int) -> Iterator[None]:
    """mlock bytes [offset, offset + length) of a map (skip if refused).

    MS_INVALIDATE over locked pages fails with EBUSY: a real msync failure
    that needs no device. The export taken to find the address is dropped
    at once, so the map can still be closed.
    """
    libc = c_library()
    anchor = ctypes.c_char.from_buffer(m)
    address = ctypes.c_void_p(ctypes.addressof(anchor) + offset)
    del anchor
    if libc.mlock(address, ctypes.c_size_t(length)) != 0:
        pytest.skip(f"mlock failed: {os.strerror(ctypes.get_errno())}")
    try:
        yield
    finally:
        libc.munlock(address, ctypes.c_size_t(length))


# A file's page cache may be held in large folios (ext4 has them since Linux
# 6.16), and the kernel tracks dirtiness and writes back by the folio:
# dirtying one byte then marks, and msync of one page then cleans, every page
# of its folio. That is the kernel's granularity, not msyncext's, and would
# hide which pages msyncext asked for. So the files here are sparse (no
# write(2) fills their cache) and their maps are read with MADV_RANDOM: with
# no readahead, each fault brings in a folio of one page.
def _no_readahead(m: mmap.mmap) -> None:
    if hasattr(mmap, "MADV_RANDOM"):
        m.madvise(mmap.MADV_RANDOM)


def sparse_memmap(path: Path, nbytes: int, *, dtype: Any, offset: int) -> Any:
    """A writable numpy.memmap of a new sparse file, read without readahead."""
    np = numpy_or_skip()
    with path.open("wb") as f:
        f.truncate(offset + nbytes)
    array = np.memmap(
        path,
        dtype=dtype,
        mode="r+",
        offset=offset,
        shape=(nbytes // np.dtype(dtype).itemsize,),
    )
    _no_readahead(array._mmap)  # type: ignore[attr-defined]  # numpy keeps its mmap here
    return array


def _map_factory(directory: Path) -> Iterator[MapFactory]:
    made: list[MappedFile] = []

    def make(
        size: int = 64 * PAGE,
        *,
        access: int = mmap.ACCESS_DEFAULT,
        offset: int = 0,
        name: str | None = None,
    ) -> MappedFile:
        path = directory / (name or f"msyncext-test-{os.getpid()}-{len(made)}.bin")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(fd, size + offset)
        os.fsync(fd)
        m = mmap.mmap(fd, size, access=access, offset=offset)
        _no_readahead(m)
        made.append(MappedFile(path, fd, m))
        return made[-1]

    try:
        yield make
    finally:
        for mapped in made:
            # A test that kept an export alive cannot close its map; the
            # descriptor and the file go all the same.
            with contextlib.suppress(BufferError):
                mapped.map.close()
            os.close(mapped.fd)
            mapped.path.unlink(missing_ok=True)


@pytest.fixture
def disk_map(tmp_path: Path) -> Iterator[MapFactory]:
    """Maps of files on the disk that holds pytest's temporary directory."""
    yield from _map_factory(tmp_path)


@pytest.fixture
def shm_map(tmp_path: Path) -> Iterator[MapFactory]:
    """Maps of files on tmpfs (/dev/shm), falling back to the temp dir."""
    directory = SHM if SHM.is_dir() and os.access(SHM, os.W_OK) else tmp_path
    yield from _map_factory(directory)
