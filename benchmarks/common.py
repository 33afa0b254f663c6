"""What the scenarios share: mapped temporary files, threads, rounds, pyperf."""

import atexit
import contextlib
import ctypes
import itertools
import mmap
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from statistics import median as median
from typing import Any, NamedTuple, TypeVar

import msyncext

PAGE, MIB, SHM = msyncext.PAGESIZE, 1 << 20, "/dev/shm"
GIL = getattr(sys, "_is_gil_enabled", lambda: True)()
FLUSHES = {"msyncext.flush": msyncext.flush, "mmap.flush": mmap.mmap.flush}
Figures = dict[str, Any]  # "label [unit]" -> value, as printed and saved
Body = Callable[[list[bool]], float]  # loops until stop[0]; returns a count
K = TypeVar("K")
V = TypeVar("V")
_syscall = getattr(ctypes.CDLL(None), "syscall", None)  # for cachestat(2)
kept = contextlib.ExitStack()  # maps that pyperf's workers time, closed at exit
atexit.register(kept.close)


class Context(NamedTuple):
    quick: bool
    disk_dir: str
    runner: Any  # pyperf.Runner


def loop_time(loops: int, call: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    for _ in itertools.repeat(None, loops):
        call()
    return time.perf_counter() - t0


def pyperf_ns(ctx: Context, name: str, call: Callable[[], object]) -> Figures:
    """pyperf's mean and stdev of one call; empty in pyperf's worker processes."""
    bench = ctx.runner.bench_time_func(name, loop_time, call)
    if ctx.runner.args.worker or bench is None:
        return {}
    return {
        f"{name} [ns]": bench.mean() * 1e9,
        f"{name} stdev [ns]": bench.stdev() * 1e9,
    }


@contextlib.contextmanager
def mapped_file(
    directory: str, size: int, page_granular: bool = True
) -> Iterator[tuple[mmap.mmap, int]]:
    """A temporary file of real data, mapped. page_granular: drop it from the page
    cache and map it MADV_RANDOM, so a store dirties one page; else the cache keeps
    what write(2) left: on Linux 6.16+ ext4, large folios, each dirtied whole."""
    fd, path = tempfile.mkstemp(prefix="msyncext-bench-", dir=directory)
    try:
        for start in range(0, size, 4 * MIB):
            os.write(fd, b"\x5a" * min(size - start, 4 * MIB))
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


def libc_msync(m: mmap.mmap) -> tuple[Callable[[int, int, int], int], int]:
    """libc msync through ctypes, as a user declares it, and the map's address."""
    fn = ctypes.CDLL(None, use_errno=True).msync
    fn.argtypes, fn.restype = (
        [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int],
        ctypes.c_int,
    )
    return fn, ctypes.addressof(ctypes.c_char.from_buffer(m))  # valid until m closes


class CacheStat(NamedTuple):
    """Page counts of a file range, as cachestat(2) gives them."""

    cache: int
    dirty: int
    writeback: int
    evicted: int
    recently_evicted: int


def cachestat(fd: int, offset: int = 0, length: int = 0) -> CacheStat | None:
    """cachestat(2) of the file's bytes [offset, offset + length), to its end if
    length is 0 (syscall 451 on x86_64 and aarch64); None before Linux 6.5 and
    elsewhere. It walks every cached page of the range: ~0.1 ms for 2 GiB here,
    ~8 us for 1 MiB, so sample small ranges in loops."""
    out, rng = (ctypes.c_uint64 * 5)(), (ctypes.c_uint64 * 2)(offset, length)
    if sys.platform != "linux" or not _syscall or _syscall(451, fd, rng, out, 0):
        return None
    return CacheStat(*out)


def dirty_pages(fd: int) -> int | None:
    """Dirty and write-back pages of the file by cachestat(2) (Linux 6.5+)."""
    st = cachestat(fd)
    return None if st is None else st.dirty + st.writeback


def rounds(n: int, contenders: dict[K, Callable[[], V]]) -> dict[K, list[V]]:
    """Call each contender once a round, each round starting at the next one, so
    that all see the same files, page states and background load."""
    got: dict[K, list[V]] = {k: [] for k in contenders}
    keys = list(contenders)
    for r in range(n):
        for k in keys[r % len(keys) :] + keys[: r % len(keys)]:
            got[k].append(contenders[k]())
    return got


def threads(bodies: list[Body], secs: float, ms: float | None = None) -> list[float]:
    """Run the bodies in threads for secs (at a switch interval of ms); counts/s."""
    stop, rates, default = [False], [0.0] * len(bodies), sys.getswitchinterval()
    ready = threading.Barrier(len(bodies) + 1)

    def one(i: int) -> None:
        ready.wait()
        t0 = time.perf_counter()
        rates[i] = bodies[i](stop) / (time.perf_counter() - t0)

    started = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
    sys.setswitchinterval(ms / 1e3 if ms else default)
    for t in started:
        t.start()
    ready.wait()
    time.sleep(secs)
    stop[0] = True
    for t in started:
        t.join()
    sys.setswitchinterval(default)
    return rates


def cpu(stop: list[bool]) -> float:
    """A CPU-bound Python thread: counts loop iterations."""
    n = 0
    while not stop[0]:
        n += 1
    return n


def flusher(m: mmap.mmap, flush: Callable[..., object]) -> Body:
    """A durable record write, again and again: dirty one byte, flush its page."""

    def body(stop: list[bool]) -> float:
        n = 0
        while not stop[0]:
            m[0] = n & 0xFF
            flush(m, 0, PAGE)
            n += 1
        return n

    return body
