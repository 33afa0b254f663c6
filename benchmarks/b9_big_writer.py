"""B9: a big writer fills a new file (2 GiB; 128 MiB quick) in 1 MiB chunks
through an mmap and through a numpy.memmap, and makes it durable: one final
MS_SYNC only; mmap.flush per chunk; msyncext.flush (MS_SYNC) per chunk;
msyncext.flush with MS_ASYNC (issue 15: start the write-out) per chunk, then one
final MS_SYNC. Per contender: the total time (first write to the end of the last
flush), the final sync's stall, the longest single write or flush call, the peak
of the file's dirty + write-back pages (cachestat(2) after each chunk and its
flush) and its pages in the page cache at the end.

Each contender writes a new sparse file (ftruncate), deleted after: what
numpy.memmap(mode="w+") and a create-truncate-map writer make, and every
contender starts with no blocks allocated and nothing cached. A preallocated
file would not do: once written, each first store to a page reads it from the
disk (its cache is dropped between contenders); fallocated, its write-out also
converts unwritten extents."""

import contextlib
import mmap
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import common as c

import msyncext

CHUNK = c.MIB
FULL, QUICK = 2048 * c.MIB, 128 * c.MIB  # see size() for why
# Non-zero bytes (a virtual disk may skip zeros), 2 MiB, so that each chunk can
# take a different 1 MiB window of them without making any.
PATTERN = random.Random(9).randbytes(2 * CHUNK).replace(b"\0", b"\1")
FINAL = "final MS_SYNC only"
NEW = "MS_ASYNC per chunk, final MS_SYNC"  # issue 15's write-out call
# Per contender: the call after each chunk (None: no call), then whether one
# msyncext.flush(buf) of the whole buffer ends the run.
Plan = tuple[Callable[[Any, mmap.mmap, int], object] | None, bool]
PLANS: dict[str, Plan] = {
    FINAL: (None, True),
    "mmap.flush per chunk": (lambda buf, mm, o: mm.flush(o, CHUNK), False),
    "msyncext.flush per chunk": (
        lambda buf, mm, o: msyncext.flush(buf, o, CHUNK),
        False,
    ),
    NEW: (
        lambda buf, mm, o: msyncext.flush(buf, o, CHUNK, flags=msyncext.MS_ASYNC),
        True,
    ),
    # Write-once data out of the page cache as it goes (issue 15, point 7).
    "msyncext.flush per chunk, evict=True": (
        lambda buf, mm, o: msyncext.flush(buf, o, CHUNK, evict=True),
        False,
    ),
}
KERNEL = {  # /proc/vmstat, system-wide: whether the kernel wrote before the end
    "nr_dirty_background_threshold": "kernel's background write-back threshold",
    "nr_dirty_threshold": "kernel's dirty limit",
}


def vmstat_mib(name: str) -> float | None:
    with contextlib.suppress(OSError), open("/proc/vmstat", encoding="ascii") as f:
        for line in f:
            key, value = line.split()
            if key == name:
                return int(value) * c.PAGE / c.MIB
    return None


@contextlib.contextmanager
def mapped(writer: str, path: str, fd: int, size: int) -> Iterator[tuple[Any, ...]]:
    """The buffer to write and flush, its mmap.mmap, and the data to copy from."""
    if writer == "mmap":
        with mmap.mmap(fd, size) as m:
            yield m, m, memoryview(PATTERN)
    else:
        import numpy as np

        arr = np.memmap(path, dtype=np.uint8, mode="r+", shape=(size,))
        yield arr, arr.base, np.frombuffer(PATTERN, dtype=np.uint8)


def pending(fd: int, clean: int, written: int) -> tuple[int, int]:
    """Dirty + write-back pages of the file, sampled cheaply: the writer only moves
    forward, so the file below `clean` stays clean, and cachestat reads only the
    rest (reading all of it took ~0.1 ms at 2 GiB, time in which write-out went
    on while the writer was not timed). Below `written - CHUNK` only: a 2 MiB
    folio holds the previous chunk too, and writing a chunk dirties all of it."""
    while clean < written - CHUNK:
        st = c.cachestat(fd, clean, CHUNK)
        if st is None or st.dirty + st.writeback:
            break
        clean += CHUNK
    st = c.cachestat(fd, clean, written - clean)
    return clean, (st.dirty + st.writeback if st else 0)


def fill(fd: int, size: int, how: str, buf: Any, mm: Any, data: Any) -> c.Figures:
    """The writer, timed, and what cachestat saw."""
    per_chunk, final = PLANS[how]
    longest = sampling = 0.0
    clean = peak = 0
    now = time.perf_counter
    started = now()
    for i, o in enumerate(range(0, size, CHUNK)):
        t0 = now()
        s = i * 40_009 % CHUNK
        buf[o : o + CHUNK] = data[s : s + CHUNK]
        t1 = now()
        if per_chunk:
            per_chunk(buf, mm, o)
        t2 = now()
        longest = max(longest, t1 - t0, t2 - t1)
        clean, busy = pending(fd, clean, o + CHUNK)
        peak = max(peak, busy)
        sampling += now() - t2
    t0 = now()
    if final:
        msyncext.flush(buf)
    end = now()
    out = {
        "total [s]": end - started - sampling,
        "longest stall [ms]": max(longest, end - t0) * 1e3,
    }
    if final:
        out["final sync stall [ms]"] = (end - t0) * 1e3
    if stat := c.cachestat(fd):
        out["peak dirty + writeback [MiB]"] = peak * c.PAGE / c.MIB
        out["cached after [MiB]"] = stat.cache * c.PAGE / c.MIB
    return out


def one(directory: str, size: int, writer: str, how: str) -> c.Figures:
    """One contender on a new sparse file, deleted after."""
    fd, path = tempfile.mkstemp(prefix="msyncext-bench-", dir=directory)
    try:
        os.ftruncate(fd, size)
        with mapped(writer, path, fd, size) as args:
            out = fill(fd, size, how, *args)
        del args  # a numpy.memmap is unmapped with its last reference
        # The next contender starts with nothing of it cached or to write.
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return out
    finally:
        os.close(fd)
        os.unlink(path)
        # Commit the deletion now (its journal commit, and the discards of a
        # mount with -o discard), not inside the next contender's first sync.
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def size(ctx: c.Context) -> int:
    """2 GiB. The final-sync-only contender then stalls ~0.85 s at the end on this
    disk (~2.3 GB/s), 10-100 times any single chunk's write or flush here; the
    file stays under the kernel's background write-back threshold (10 % of free
    and reclaimable memory: ~2.3 GiB of 24 GiB, as B9 records), so that contender
    leaves all of it to the end; and the 8 contenders x 3 rounds took 1.5-2.5
    minutes (10 with the evicting one: a little more). A file the disk takes
    10 s for (~20 GB) would not fit in minutes: the writer fills a sparse
    mapping at 0.2-2 GB/s (a page fault per 4 KiB)."""
    want = QUICK if ctx.quick else FULL
    if shutil.disk_usage(ctx.disk_dir).free < 2 * want:
        sys.exit(f"B9 needs {2 * want / c.MIB:,.0f} MiB free in {ctx.disk_dir}")
    return want


def run(ctx: c.Context) -> c.Figures:
    n = size(ctx)
    writers = ["mmap"]
    with contextlib.suppress(ImportError):
        import numpy  # noqa: F401

        writers.append("numpy.memmap")
    out: c.Figures = {"file size [MiB]": n / c.MIB, "rounds": 1 if ctx.quick else 3}
    for key, label in KERNEL.items():
        if (mib := vmstat_mib(key)) is not None:
            out[f"{label} at start [MiB]"] = mib
    # A virtual machine may hand memory that stayed free for a few seconds back
    # to its host (here virtio-balloon's free page reporting), and then each
    # page's next first touch costs a host fault: filling 2 GiB took 8-10 s after
    # 10 s idle, ~2 s right after another fill. So one untimed fill first, and
    # the contenders follow each other at once.
    one(ctx.disk_dir, n, "mmap", FINAL)
    got = c.rounds(
        out["rounds"],
        {
            f"{w}, {how}": partial(one, ctx.disk_dir, n, w, how)
            for w in writers
            for how in PLANS
        },
    )
    for name, runs in got.items():
        for figure in runs[0]:
            out[f"{name}: {figure}"] = c.median(r[figure] for r in runs)
    return out
