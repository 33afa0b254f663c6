"""What every scenario shares: mapped temporary files, threads, libc msync."""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import mmap
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import msyncext

PAGE = msyncext.PAGESIZE
MIB = 1 << 20
SHM = "/dev/shm"

Figures = dict[str, Any]  # label (unit in brackets) -> value, as printed and saved


@dataclass
class Context:
    quick: bool
    disk_dir: str
    runner: Any  # pyperf.Runner


def pyperf_ns(ctx: Context, name: str, time_func: Any, *args: Any) -> Figures:
    """Time ``time_func(loops, *args)`` with pyperf: mean and stdev in ns.

    Empty in pyperf's worker processes, which only measure and report.
    """
    bench = ctx.runner.bench_time_func(name, time_func, *args)
    if ctx.runner.args.worker or bench is None:
        return {}
    return {
        f"{name} [ns]": bench.mean() * 1e9,
        f"{name} stdev [ns]": bench.stdev() * 1e9,
    }


@contextlib.contextmanager
def mapped_file(
    directory: str, size: int, *, page_granular: bool = True
) -> Iterator[tuple[mmap.mmap, int]]:
    """A temporary file of real (written, synced) data, mapped shared.

    page_granular: drop the file from the page cache and map it with
    MADV_RANDOM, so that each fault brings in one base page. Otherwise the
    cache keeps what write(2) left, which on Linux 6.16+ ext4 is large folios:
    a one-byte store then dirties a whole folio (up to hundreds of pages) and
    every flush writes all of it. The file is always deleted.
    """
    fd, path = tempfile.mkstemp(prefix="msyncext-bench-", dir=directory)
    try:
        chunk = b"\x5a" * min(size, 4 * MIB)
        for start in range(0, size, len(chunk)):
            os.write(fd, chunk[: size - start])
        os.fsync(fd)
        if page_granular:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        with mmap.mmap(fd, size) as m:
            if page_granular:
                m.madvise(mmap.MADV_RANDOM)
            yield m, fd
    finally:
        os.close(fd)
        os.unlink(path)


_kept = contextlib.ExitStack()
atexit.register(_kept.close)


def kept_map(directory: str, size: int = 16 * PAGE) -> tuple[mmap.mmap, int]:
    """A mapped file that lives until the process exits (for pyperf workers)."""
    return _kept.enter_context(mapped_file(directory, size))


def libc_msync() -> Callable[[int, int, int], int]:
    """libc msync through ctypes, as a user would declare it."""
    fn = ctypes.CDLL(None, use_errno=True).msync
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


def pinned_address(m: mmap.mmap) -> int:
    """The map's address, pinned (exported) as a ctypes user's would be.

    The pin is dropped at exit, before kept maps close.
    """
    pin = ctypes.c_char.from_buffer(m)
    _kept.callback(lambda: pins.remove(pin))
    pins.append(pin)
    return ctypes.addressof(pin)


pins: list[object] = []


def dirty_pages(fd: int) -> int | None:
    """Dirty and write-back pages of the file by cachestat(2) (Linux 6.5+)."""
    out = (ctypes.c_uint64 * 5)()
    rng = (ctypes.c_uint64 * 2)(0, 0)
    if not sys.platform.startswith("linux"):
        return None
    if ctypes.CDLL(None).syscall(451, fd, rng, out, 0) != 0:
        return None
    return int(out[1] + out[2])


Body = Callable[[list[bool]], float]  # loops until stop[0]; returns a count


def run_threads(bodies: list[Body], secs: float) -> list[float]:
    """Run the bodies in threads for ``secs``; return each one's count per second."""
    stop = [False]
    rates = [0.0] * len(bodies)
    ready = threading.Barrier(len(bodies) + 1)

    def one(i: int) -> None:
        ready.wait()
        t0 = time.perf_counter()
        count = bodies[i](stop)
        rates[i] = count / (time.perf_counter() - t0)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    ready.wait()
    time.sleep(secs)
    stop[0] = True
    for t in threads:
        t.join()
    return rates


def cpu_body(stop: list[bool]) -> float:
    """A CPU-bound Python thread: counts loop iterations."""
    n = 0
    while not stop[0]:
        n += 1
    return n


def median(values: list[float]) -> float:
    return statistics.median(values)


def rotate(items: list[Any], k: int) -> list[Any]:
    """Each round starts at another contender, so none always goes first."""
    k %= len(items)
    return items[k:] + items[:k]
