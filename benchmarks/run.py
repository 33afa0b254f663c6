"""Benchmarks: msyncext against what Python users call today.

One command runs every scenario and prints one table, all figures from the
same run::

    python -I benchmarks/run.py [--quick] [--json PATH] [--disk-dir DIR]

Harness: the standard library only. B1 uses ``timeit.Timer.timeit`` (a fixed
number of calls per repeat, garbage collector off, loop overhead of ~10 ns a
call included for every contender alike). B2-B6 time themselves with
``time.perf_counter_ns``: threaded runs last a fixed wall time and count
completed flushes, batch runs time one batch. Every figure is the median of
several repeats, shown with its min-max; the contenders of a scenario are
interleaved within each repeat (and their order rotated) so that they see the
same files, the same page states and the same background load. Ratios are
ratios of medians.

Scenarios:

B1  per-call cost of flushing one clean page (tmpfs and disk)
B2  GIL: a CPU-bound Python thread beside a thread that flushes a disk map
B3  scaling: 1, 2, 4, 8 threads, each flushing its own disk-backed map
B4  batch: 256 scattered dirty pages in a 64 MiB disk-backed map
B5  volume: 64 MiB and 256 MiB of dirty data, against os.fdatasync
B6  max_gap sweep for flush_ranges (clean gaps, and gaps full of dirty pages)

Disk scenarios use temporary files in ``--disk-dir`` (default: the current
directory); syscall-floor scenarios use /dev/shm. Temporary files are always
deleted. Run it with ``python -I`` (or from any directory but the repository
root) so that the installed msyncext is measured, not the source folder.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import json
import mmap
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
import timeit
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

# Never measure the source tree: drop the repository root from sys.path (it
# is there when run as ``python -m benchmarks.run`` from the root).
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _REPO_ROOT]

try:
    import msyncext
except ImportError as exc:  # pragma: no cover - environment problem
    sys.exit(f"cannot import the installed msyncext ({exc}); pip install it first")

PAGE = msyncext.PAGESIZE
MS_SYNC = msyncext.MS_SYNC
MIB = 1024 * 1024
SHM_DIR = "/dev/shm"


# --------------------------------------------------------------- results ---


@dataclass
class Series:
    """One contender's figures in one scenario: a sample per repeat."""

    scenario: str
    name: str
    unit: str
    samples: list[float]
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    def as_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "name": self.name,
            "unit": self.unit,
            "median": self.median,
            "min": min(self.samples),
            "max": max(self.samples),
            "samples": self.samples,
            "note": self.note,
        }


@dataclass
class Ratio:
    """A ratio of two medians of the same run."""

    scenario: str
    label: str
    value: float
    unit: str = "x"


@dataclass
class Target:
    label: str
    measured: float | None
    goal: str
    passed: bool | None
    shown: str


@dataclass
class Results:
    series: list[Series] = field(default_factory=list)
    ratios: list[Ratio] = field(default_factory=list)
    notes: dict[str, list[str]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def add(self, scenario: str, name: str, unit: str, samples: list[float]) -> Series:
        s = Series(scenario, name, unit, samples)
        self.series.append(s)
        return s

    def get(self, scenario: str, name: str) -> Series | None:
        for s in self.series:
            if s.scenario == scenario and s.name == name:
                return s
        return None

    def ratio(self, scenario: str, label: str, value: float, unit: str = "x") -> None:
        self.ratios.append(Ratio(scenario, label, value, unit))

    def note(self, scenario: str, text: str) -> None:
        self.notes.setdefault(scenario, []).append(text)

    def find_ratio(self, scenario: str, label: str) -> float | None:
        for r in self.ratios:
            if r.scenario == scenario and r.label == label:
                return r.value
        return None


# ------------------------------------------------------------ file setup ---


@dataclass
class MappedFile:
    """A file filled with real (allocated, synced) data and mapped shared."""

    path: str
    fd: int
    map: mmap.mmap
    size: int


@contextlib.contextmanager
def mapped_file(
    directory: str, size: int, *, base_pages: bool = True
) -> Iterator[MappedFile]:
    """Create, fill, fsync and map a temporary file; always delete it.

    With ``base_pages`` the file is dropped from the page cache and mapped
    with MADV_RANDOM, so that each fault brings in one page. Otherwise the
    cache keeps what write(2) left: on Linux 6.16+ ext4 that is large folios,
    and a one-byte store through the map then dirties the whole folio (tens
    of pages), which turns "one dirty page" scenarios into something else.
    """
    fd, path = tempfile.mkstemp(prefix="msyncext-bench-", dir=directory)
    try:
        chunk = b"\x5a" * min(size, 4 * MIB)
        done = 0
        while done < size:
            done += os.write(fd, chunk[: size - done])
        os.fsync(fd)
        if base_pages and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        m = mmap.mmap(fd, size)
        if base_pages and hasattr(mmap, "MADV_RANDOM"):
            m.madvise(mmap.MADV_RANDOM)
        try:
            yield MappedFile(path, fd, m, size)
        finally:
            m.close()
    finally:
        os.close(fd)
        os.unlink(path)


def clean(mf: MappedFile) -> None:
    """Write back everything so that the next trial starts from clean pages."""
    msyncext.flush(mf.map)


class _CachestatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Cachestat(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in ("cache", "dirty", "writeback", "evicted", "recently_evicted")
    ]


def dirty_page_count(fd: int, size: int) -> int | None:
    """Dirty pages of the file's first ``size`` bytes, by cachestat(2).

    None where the syscall (Linux 6.5+, number 451 on x86_64 and aarch64)
    is missing.
    """
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    rng, out = _CachestatRange(0, size), _Cachestat()
    if libc.syscall(451, fd, ctypes.byref(rng), ctypes.byref(out), 0) != 0:
        return None
    return int(out.dirty + out.writeback)


def dirty_pages(m: mmap.mmap, pages: Sequence[int], value: int) -> None:
    """Make each page dirty by storing one byte in it."""
    for p in pages:
        m[p * PAGE] = value


def rotate(items: Sequence[Any], k: int) -> list[Any]:
    k %= len(items)
    return list(items[k:]) + list(items[:k])


# ------------------------------------------------------------------- B1 ---


def _libc_msync() -> Callable[[int, int, int], int]:
    libc = ctypes.CDLL(None, use_errno=True)
    fn = libc.msync
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def bench_b1(res: Results, quick: bool, disk_dir: str) -> None:
    msync = _libc_msync()
    # Short samples, many repeats: a sample preempted by another process is
    # an outlier the median ignores.
    repeats = 21 if quick else 41
    for medium, directory, number in (
        ("tmpfs", SHM_DIR, 10_000),
        ("disk", disk_dir, 50),
    ):
        scenario = f"B1 {medium}"
        with mapped_file(directory, 16 * PAGE) as mf:
            m = mf.map
            clean(mf)
            # As a user would: the address once, through a ctypes object that
            # pins the buffer export until it is deleted.
            pin = ctypes.c_char.from_buffer(m)
            try:
                ns: dict[str, Any] = {
                    "flush": msyncext.flush,
                    "m": m,
                    "P": PAGE,
                    "msync": msync,
                    "addr": ctypes.addressof(pin),
                    "MS_SYNC": MS_SYNC,
                    "fdatasync": os.fdatasync,
                    "fd": mf.fd,
                }
                stmts = {
                    "msyncext.flush(m, 0, P)": "flush(m, 0, P)",
                    "msyncext.flush(m, 100, 200)": "flush(m, 100, 200)",
                    "mmap.flush(0, P)": "m.flush(0, P)",
                    "ctypes msync(addr, P, MS_SYNC)": "msync(addr, P, MS_SYNC)",
                    "os.fdatasync(fd)": "fdatasync(fd)",
                }
                timers = {k: timeit.Timer(v, globals=ns) for k, v in stmts.items()}
                for t in timers.values():  # warm up
                    t.timeit(max(1, number // 10))
                samples: dict[str, list[float]] = {k: [] for k in timers}
                for r in range(repeats):
                    for k in rotate(list(timers), r):
                        secs = timers[k].timeit(number)
                        samples[k].append(secs / number * 1e9)
            finally:
                del pin
                ns.clear()
        for k, v in samples.items():
            res.add(scenario, k, "ns/call", v)
        med = {k: statistics.median(v) for k, v in samples.items()}
        for name in ("msyncext.flush(m, 0, P)", "msyncext.flush(m, 100, 200)"):
            short = "aligned" if "0, P" in name else "unaligned"
            res.ratio(
                scenario,
                f"msyncext {short} / mmap.flush",
                med[name] / med["mmap.flush(0, P)"],
            )
            res.ratio(
                scenario,
                f"msyncext {short} / ctypes msync",
                med[name] / med["ctypes msync(addr, P, MS_SYNC)"],
            )
    res.note(
        "B1 tmpfs",
        "one clean page, MS_SYNC; names pre-bound as in a hot loop "
        "(from msyncext import flush; m.flush; ctypes with argtypes set)",
    )


# ------------------------------------------------------------------- B2 ---


def _cpu_worker(stop: list[bool], out: list[float]) -> None:
    """Count loop iterations until told to stop; report iterations per second."""
    n = 0
    t0 = time.perf_counter_ns()
    while not stop[0]:
        n += 1
    out.append(n / ((time.perf_counter_ns() - t0) / 1e9))


def _flush_worker(
    m: mmap.mmap,
    use_msyncext: bool,
    stop: list[bool],
    out: list[float],
    start: threading.Barrier | None = None,
) -> None:
    """Dirty one byte of page 0 then MS_SYNC-flush that page, until stopped."""
    flush = msyncext.flush
    if start is not None:
        start.wait()
    n = 0
    t0 = time.perf_counter_ns()
    if use_msyncext:
        while not stop[0]:
            m[0] = n & 0xFF
            flush(m, 0, PAGE)
            n += 1
    else:
        while not stop[0]:
            m[0] = n & 0xFF
            m.flush(0, PAGE)
            n += 1
    out.append(n / ((time.perf_counter_ns() - t0) / 1e9))


def _run_threads(
    targets: list[threading.Thread], stop: list[bool], secs: float
) -> None:
    for t in targets:
        t.start()
    time.sleep(secs)
    stop[0] = True
    for t in targets:
        t.join()


def bench_b2(res: Results, quick: bool, disk_dir: str) -> None:
    # Many short windows, every configuration once per round in rotated
    # order; the CPU thread's share is paired with its solo speed of the
    # same round, so that load from other processes mostly cancels.
    rounds = 8 if quick else 15
    secs = 0.25 if quick else 0.5
    sc = "B2"
    names = (
        "cpu solo",
        "flush solo msx",
        "flush solo mmap",
        "beside msx",
        "beside mmap",
    )
    cpu: dict[str, list[float]] = {k: [] for k in names}
    flushes: dict[str, list[float]] = {k: [] for k in names}
    share: dict[str, list[float]] = {"msx": [], "mmap": []}
    with mapped_file(disk_dir, 16 * PAGE) as mf:
        m = mf.map
        for r in range(rounds):
            for what in rotate(list(names), r):
                stop = [False]
                c_out: list[float] = []
                f_out: list[float] = []
                threads: list[threading.Thread] = []
                if what == "cpu solo" or what.startswith("beside"):
                    threads.append(
                        threading.Thread(target=_cpu_worker, args=(stop, c_out))
                    )
                if what != "cpu solo":
                    use = what.endswith("msx")
                    threads.append(
                        threading.Thread(
                            target=_flush_worker, args=(m, use, stop, f_out)
                        )
                    )
                _run_threads(threads, stop, secs)
                if c_out:
                    cpu[what].append(c_out[0])
                if f_out:
                    flushes[what].append(f_out[0])
            solo_this_round = cpu["cpu solo"][-1]
            share["msx"].append(100 * cpu["beside msx"][-1] / solo_this_round)
            share["mmap"].append(100 * cpu["beside mmap"][-1] / solo_this_round)
    res.add(sc, "CPU thread alone", "iter/s", cpu["cpu solo"])
    res.add(sc, "CPU thread beside msyncext.flush", "% of solo", share["msx"])
    res.add(sc, "CPU thread beside mmap.flush", "% of solo", share["mmap"])
    res.add(sc, "flusher alone, msyncext.flush", "flushes/s", flushes["flush solo msx"])
    res.add(sc, "flusher alone, mmap.flush", "flushes/s", flushes["flush solo mmap"])
    res.add(
        sc, "flusher beside CPU, msyncext.flush", "flushes/s", flushes["beside msx"]
    )
    res.add(sc, "flusher beside CPU, mmap.flush", "flushes/s", flushes["beside mmap"])
    msx_share = statistics.median(share["msx"])
    mm_share = statistics.median(share["mmap"])
    res.ratio(sc, "CPU share beside msyncext / beside mmap.flush", msx_share / mm_share)
    swi = sys.getswitchinterval()
    solo = statistics.median(flushes["flush solo msx"])
    predicted = 1.0 / (swi + 1.0 / solo)
    res.extra["B2 convoy"] = {
        "switchinterval_s": swi,
        "flusher_alone_per_s": solo,
        "predicted_beside_cpu_per_s": predicted,
        "measured_beside_cpu_per_s": statistics.median(flushes["beside msx"]),
    }
    res.note(
        sc,
        "flusher: dirty 1 byte of page 0, then MS_SYNC flush of that page "
        "(a durable record write); CPU thread: `while not stop: n += 1`",
    )
    res.note(
        sc,
        f"convoy: msyncext drops the GIL for the syscall; on return it waits up "
        f"to sys.getswitchinterval() = {swi * 1e3:g} ms for a CPU-bound thread to "
        f"yield it, so each flush costs ~{1e3 / solo:.2f} ms + {swi * 1e3:g} ms: "
        f"predicted {predicted:.0f}/s, measured "
        f"{statistics.median(flushes['beside msx']):.0f}/s (alone {solo:.0f}/s). "
        "mmap.flush holds the GIL in the syscall: the CPU thread waits instead.",
    )


# ------------------------------------------------------------------- B3 ---


def bench_b3(res: Results, quick: bool, disk_dir: str) -> None:
    repeats = 3 if quick else 5
    secs = 0.5 if quick else 1.0
    counts = (1, 2, 4, 8)
    sc = "B3"
    agg: dict[tuple[int, bool], list[float]] = {
        (n, u): [] for n in counts for u in (True, False)
    }
    with contextlib.ExitStack() as stack:
        maps = [
            stack.enter_context(mapped_file(disk_dir, 16 * PAGE)).map
            for _ in range(max(counts))
        ]
        for r in range(repeats):
            for n, use in rotate(list(agg), r):
                stop = [False]
                out: list[float] = []
                barrier = threading.Barrier(n)
                threads = [
                    threading.Thread(
                        target=_flush_worker, args=(maps[i], use, stop, out, barrier)
                    )
                    for i in range(n)
                ]
                _run_threads(threads, stop, secs)
                agg[(n, use)].append(sum(out))
    for n in counts:
        res.add(sc, f"{n} threads, msyncext.flush", "flushes/s", agg[(n, True)])
        res.add(sc, f"{n} threads, mmap.flush", "flushes/s", agg[(n, False)])
    for n in counts:
        res.ratio(
            sc,
            f"{n} threads: msyncext / mmap.flush",
            statistics.median(agg[(n, True)]) / statistics.median(agg[(n, False)]),
        )
    res.note(
        sc,
        "each thread: its own 64 KiB file; dirty 1 byte of page 0 + MS_SYNC "
        "flush of that page per iteration; figures are the sum over threads",
    )


# ------------------------------------------------------------------- B4 ---


REF_B4 = "reference: pages dirtied by os.pwrite, os.fdatasync"


def bench_b4(res: Results, quick: bool, disk_dir: str) -> None:
    _bench_b4(res, quick, disk_dir, "B4", base_pages=True)
    if not quick:
        _bench_b4(res, quick, disk_dir, "B4 large folios", base_pages=False)


def _bench_b4(
    res: Results, quick: bool, disk_dir: str, sc: str, *, base_pages: bool
) -> None:
    repeats = 5 if quick else 15
    size = 64 * MIB
    npages = 256
    pages = sorted(random.Random(4).sample(range(size // PAGE), npages))
    ranges = [(p * PAGE, PAGE) for p in pages]
    samples: dict[str, list[float]] = {}
    calls: dict[str, int] = {}
    dirty_after_stores: list[int] = []
    with mapped_file(disk_dir, size, base_pages=base_pages) as mf:
        m = mf.map
        flush = msyncext.flush

        def ranges_default() -> None:
            calls["flush_ranges (default max_gap)"] = msyncext.flush_ranges(m, ranges)

        def ranges_zero() -> None:
            calls["flush_ranges (max_gap=0)"] = msyncext.flush_ranges(
                m, ranges, max_gap=0
            )

        def loop_msx() -> None:
            for off, n in ranges:
                flush(m, off, n)

        def loop_mmap() -> None:
            for off, n in ranges:
                m.flush(off, n)

        def whole() -> None:
            flush(m)

        def fdatasync() -> None:
            os.fdatasync(mf.fd)

        contenders: dict[str, Callable[[], None]] = {
            "flush_ranges (default max_gap)": ranges_default,
            "flush_ranges (max_gap=0)": ranges_zero,
            "loop of msyncext.flush": loop_msx,
            "loop of mmap.flush": loop_mmap,
            "msyncext.flush(m) whole map": whole,
            REF_B4: fdatasync,
        }
        samples = {k: [] for k in contenders}
        cpu: dict[str, list[float]] = {k: [] for k in contenders}
        calls["loop of msyncext.flush"] = calls["loop of mmap.flush"] = npages
        calls["msyncext.flush(m) whole map"] = calls[REF_B4] = 1
        one = b"\x01"
        clean(mf)
        for r in range(repeats + 1):  # the first round warms up, not recorded
            for k in rotate(list(contenders), r):
                if k == REF_B4:
                    for p in pages:
                        os.pwrite(mf.fd, one, p * PAGE)
                else:
                    dirty_pages(m, pages, (r + 1) & 0xFF)
                    count = dirty_page_count(mf.fd, size)
                    if count is not None:
                        dirty_after_stores.append(count)
                c0 = time.thread_time_ns()
                t0 = time.perf_counter_ns()
                contenders[k]()
                dt = (time.perf_counter_ns() - t0) / 1e6
                if r:
                    samples[k].append(dt)
                    cpu[k].append((time.thread_time_ns() - c0) / 1e6)
    for k, v in samples.items():
        s = res.add(sc, k, "ms/batch", v)
        what = "fdatasync call" if k == REF_B4 else "msync calls"
        s.note = (
            f"{calls[k]} {what}, CPU {statistics.median(cpu[k]):.1f} ms "
            "(user+sys of this thread)"
        )
    loop_mm = statistics.median(samples["loop of mmap.flush"])
    for k in samples:
        if k not in ("loop of mmap.flush", REF_B4):
            res.ratio(
                sc,
                f"loop of mmap.flush / {k}",
                loop_mm / statistics.median(samples[k]),
            )
    res.note(
        sc,
        f"{npages} random pages (seed 4) of a {size // MIB} MiB file; each page "
        f"re-dirtied (1 byte) before every timed batch; default max_gap = "
        f"{msyncext.DEFAULT_MAX_GAP // 1024} KiB; "
        f"flush_ranges made {calls.get('flush_ranges (default max_gap)')} msync calls",
    )
    floor = statistics.median(samples["msyncext.flush(m) whole map"])
    dirty = (
        f"the {npages} one-byte stores left {statistics.median(dirty_after_stores):.0f}"
        " pages dirty (cachestat)"
        if dirty_after_stores
        else "dirty page count unknown (no cachestat)"
    )
    cache = (
        "file dropped from the page cache and mapped with MADV_RANDOM: base pages"
        if base_pages
        else "page cache as write(2) left it (large folios on Linux 6.16+ ext4)"
    )
    res.note(
        sc,
        f"{cache}; {dirty}; one msync over the whole map takes {floor:.1f} ms, "
        f"{loop_mm / floor:.2f}x less than the mmap.flush loop",
    )


# ------------------------------------------------------------------- B5 ---


def bench_b5(res: Results, quick: bool, disk_dir: str) -> None:
    repeats = 3 if quick else 5
    sizes = (64,) if quick else (64, 256)
    for mib in sizes:
        sc = f"B5 {mib} MiB"
        size = mib * MIB
        samples: dict[str, list[float]] = {
            "msyncext.flush(m)": [],
            "os.fdatasync(fd)": [],
            "mmap.flush()": [],
        }
        with mapped_file(disk_dir, size, base_pages=False) as mf:
            m = mf.map
            fd = mf.fd
            fill = [bytes([v]) * size for v in (0x11, 0x22)]
            actions: dict[str, Callable[[], object]] = {
                "msyncext.flush(m)": functools.partial(msyncext.flush, m),
                "os.fdatasync(fd)": functools.partial(os.fdatasync, fd),
                "mmap.flush()": m.flush,
            }
            k = 0
            for r in range(repeats):
                for name in rotate(list(actions), r):
                    m[:] = fill[k % 2]  # dirty every page through the map
                    k += 1
                    t0 = time.perf_counter_ns()
                    actions[name]()
                    dt = (time.perf_counter_ns() - t0) / 1e9
                    samples[name].append(size / 1e6 / dt)
            del fill
        for name, v in samples.items():
            res.add(sc, name, "MB/s", v)
        res.ratio(
            sc,
            "msyncext.flush / os.fdatasync (throughput)",
            statistics.median(samples["msyncext.flush(m)"])
            / statistics.median(samples["os.fdatasync(fd)"]),
        )
        res.ratio(
            sc,
            "msyncext.flush / mmap.flush (throughput)",
            statistics.median(samples["msyncext.flush(m)"])
            / statistics.median(samples["mmap.flush()"]),
        )
    res.note(
        "B5 64 MiB",
        "every page of the file dirtied through the map before each timed flush "
        "(MB = 10^6 bytes)",
    )


# ------------------------------------------------------------------- B6 ---

GAPS: list[tuple[str, int]] = [
    ("0", 0),
    ("16K", 16 * 1024),
    ("64K", 64 * 1024),
    ("256K", 256 * 1024),
    ("1M", MIB),
    ("4M", 4 * MIB),
    ("inf", sys.maxsize),
]


def bench_b6(res: Results, quick: bool, disk_dir: str) -> None:
    """flush_ranges over target pages with clean gaps, then with dirty gaps."""
    repeats = 2 if quick else 7
    ntarget = 64
    spacings = (32, 512) if quick else (8, 32, 128, 512, 2048)  # KiB
    patterns: list[tuple[str, list[int]]] = [
        (f"every {k}K", [i * (k * 1024 // PAGE) for i in range(ntarget)])
        for k in spacings
    ]
    # The B4 layout: 256 random pages of 64 MiB.
    patterns.append(("B4 random", sorted(random.Random(4).sample(range(16384), 256))))
    size = max(max(t) for _, t in patterns) * PAGE + PAGE
    table: dict[str, Any] = {}
    with mapped_file(disk_dir, size) as mf:
        m = mf.map
        for label, targets in patterns:
            ranges = [(p * PAGE, PAGE) for p in targets]
            span = (targets[-1] - targets[0] + 1) * PAGE
            lo = targets[0] * PAGE
            # Every page from the first target to the last dirty: "dirty gaps".
            fill_span = bytes(range(256)) * (span // 256)
            for gaps_dirty in (False, True):
                key = f"{label}, {'dirty' if gaps_dirty else 'clean'}"
                sc = f"B6 {len(targets)} pages {key} gaps"
                cells: dict[str, list[float]] = {g: [] for g, _ in GAPS}
                ncalls: dict[str, int] = {}
                for r in range(repeats):
                    for gname, gap in rotate(GAPS, r):
                        clean(mf)
                        if gaps_dirty:
                            m[lo : lo + span] = fill_span
                        dirty_pages(m, targets, (r + 7) & 0xFF)
                        t0 = time.perf_counter_ns()
                        ncalls[gname] = msyncext.flush_ranges(m, ranges, max_gap=gap)
                        cells[gname].append((time.perf_counter_ns() - t0) / 1e6)
                for gname, _ in GAPS:
                    s = res.add(sc, f"max_gap={gname}", "ms/batch", cells[gname])
                    s.note = f"{ncalls[gname]} msync calls"
                table[key] = {
                    g: {
                        "median_ms": statistics.median(cells[g]),
                        "msync_calls": ncalls[g],
                    }
                    for g, _ in GAPS
                }
                if not gaps_dirty:
                    t_sep = statistics.median(cells["0"])
                    t_one = statistics.median(cells["inf"])
                    saved = ncalls["0"] - ncalls["inf"]
                    per_run = (t_sep - t_one) / saved * 1e3 if saved else 0.0
                    res.note(
                        sc,
                        f"per run saved by merging clean gaps: {per_run:.0f} us "
                        f"(({t_sep:.2f} - {t_one:.2f}) ms / {saved} runs)",
                    )
                else:
                    gap_mib = (span - len(targets) * PAGE) / MIB
                    clean_inf = table[f"{label}, clean"]["inf"]["median_ms"]
                    dirty_inf = statistics.median(cells["inf"])
                    res.note(
                        sc,
                        f"max_gap=inf also writes {gap_mib:.1f} MiB of dirty gap "
                        f"pages: {dirty_inf:.2f} ms against {clean_inf:.2f} ms with "
                        "clean gaps",
                    )
            del fill_span
        clean(mf)
    res.extra["B6 max_gap sweep"] = {
        "patterns": {label: len(t) for label, t in patterns},
        "cells": table,
    }


# -------------------------------------------------------- machine & table ---


def filesystem_of(path: str) -> dict[str, str]:
    """The mount (from /proc/self/mountinfo) that holds path."""
    real = os.path.realpath(path)
    best: dict[str, str] = {"mount_point": "?", "fstype": "?", "source": "?"}
    best_len = -1
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields = left.split()
                mp = fields[4].replace("\\040", " ")
                under = real == mp or real.startswith(mp.rstrip("/") + "/")
                if under and len(mp) > best_len:
                    rf = right.split()
                    best = {
                        "mount_point": mp,
                        "fstype": rf[0],
                        "source": rf[1],
                        "options": fields[5] + "," + (rf[2] if len(rf) > 2 else ""),
                    }
                    best_len = len(mp)
    except OSError:
        pass
    return best


def load_snapshot() -> dict[str, str]:
    """Load average and pressure stall figures: how busy the machine was."""
    out: dict[str, str] = {}
    for key, path in (
        ("loadavg", "/proc/loadavg"),
        ("cpu_pressure", "/proc/pressure/cpu"),
        ("io_pressure", "/proc/pressure/io"),
    ):
        with contextlib.suppress(OSError), open(path, encoding="utf-8") as f:
            text = f.read().split("\n")[0]
            out[key] = " ".join(
                text.split()[:3] if key == "loadavg" else text.split()[1:3]
            )
    return out


def machine_info(disk_dir: str) -> dict[str, Any]:
    cpu = platform.processor() or "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu_model": cpu,
        "cpus": os.cpu_count(),
        "kernel": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {sys.version.split()[0]}",
        "msyncext": f"{msyncext.__version__} ({os.path.dirname(msyncext.__file__)})",
        "pagesize": PAGE,
        "switchinterval_s": sys.getswitchinterval(),
        "disk_dir": os.path.realpath(disk_dir),
        "disk_fs": filesystem_of(disk_dir),
        "shm_fs": filesystem_of(SHM_DIR),
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }


def fmt(v: float) -> str:
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def targets_of(res: Results) -> list[Target]:
    out: list[Target] = []

    def ratio_target(
        label: str, value: float | None, goal: str, ok: Callable[[float], bool]
    ) -> None:
        if value is None:
            out.append(Target(label, None, goal, None, "not run"))
        else:
            out.append(Target(label, value, goal, ok(value), f"{value:.2f}"))

    ratio_target(
        "B1 tmpfs msyncext.flush / mmap.flush",
        res.find_ratio("B1 tmpfs", "msyncext aligned / mmap.flush"),
        "<= 1.1",
        lambda v: v <= 1.1,
    )
    ratio_target(
        "B1 tmpfs msyncext.flush / ctypes msync",
        res.find_ratio("B1 tmpfs", "msyncext aligned / ctypes msync"),
        "<= 0.5",
        lambda v: v <= 0.5,
    )
    share = res.get("B2", "CPU thread beside msyncext.flush")
    mm = res.get("B2", "CPU thread beside mmap.flush")
    if share is None or mm is None:
        out.append(Target("B2 CPU thread beside msyncext", None, ">= 90 %", None, "-"))
    else:
        out.append(
            Target(
                "B2 CPU thread beside msyncext, % of solo",
                share.median,
                ">= 90 %",
                share.median >= 90,
                f"{share.median:.1f} % (beside mmap.flush {mm.median:.1f} %)",
            )
        )
    ratio_target(
        "B3 8 threads msyncext / mmap.flush",
        res.find_ratio("B3", "8 threads: msyncext / mmap.flush"),
        ">= 1.8",
        lambda v: v >= 1.8,
    )
    ratio_target(
        "B4 loop of mmap.flush / flush_ranges",
        res.find_ratio("B4", "loop of mmap.flush / flush_ranges (default max_gap)"),
        ">= 4",
        lambda v: v >= 4,
    )
    return out


def render(res: Results, info: dict[str, Any], quick: bool) -> str:
    lines: list[str] = []
    disk = info["disk_fs"]
    lines.append(
        f"msyncext benchmarks ({'quick' if quick else 'full'} run, "
        f"{info['date_utc']} UTC)"
    )
    lines.append(
        "harness: stdlib timeit.Timer (B1) and time.perf_counter_ns loops "
        "(B2-B6); median of repeats [min-max]; contenders interleaved per repeat"
    )
    lines.append(
        f"machine: {info['cpu_model']}, {info['cpus']} CPUs, {info['kernel']}, "
        f"{info['python']}, page {info['pagesize']} B"
    )
    lines.append(
        f"disk dir: {info['disk_dir']} ({disk['fstype']} on {disk['source']}); "
        f"tmpfs: {SHM_DIR} ({info['shm_fs']['fstype']}); msyncext {info['msyncext']}"
    )
    scenarios: list[str] = []
    for s in res.series:
        if s.scenario not in scenarios:
            scenarios.append(s.scenario)
    w = max([len(s.name) for s in res.series] + [40])
    for sc in scenarios:
        lines.append("")
        lines.append(f"== {sc}")
        for s in (x for x in res.series if x.scenario == sc):
            rng = f"[{fmt(min(s.samples))} - {fmt(max(s.samples))}]"
            tail = f"  {s.note}" if s.note else ""
            lines.append(
                f"  {s.name:<{w}} {fmt(s.median):>12} {s.unit:<10} {rng:<24}{tail}"
            )
        for r in (x for x in res.ratios if x.scenario == sc):
            lines.append(f"  ratio  {r.label:<{w + 2}} {r.value:>10.2f} {r.unit}")
        for n in res.notes.get(sc, []):
            lines.append(f"  note: {n}")
    b6 = res.extra.get("B6 max_gap sweep")
    if b6:
        lines.append("")
        lines.append("== B6 summary: flush_ranges, median ms per batch (msync calls)")
        header = f"  {'max_gap:':<24}" + "".join(f"{g:>14}" for g, _ in GAPS)
        lines.append(header)
        for key, row in b6["cells"].items():
            cells = "".join(
                f"{row[g]['median_ms']:>9.2f} ({row[g]['msync_calls']:>2})"
                for g, _ in GAPS
            )
            lines.append(f"  {key:<24}{cells}")
        lines.append(
            "  note: 'every 32K' = 64 target pages 32 KiB apart; 'B4 random' = the "
            "B4 layout; 'dirty' gaps: every page between the targets is dirty too "
            "(written back only when its gap is merged); timed from clean state"
        )
    lines.append("")
    lines.append("== Targets (issue 3), all from this run")
    for t in targets_of(res):
        verdict = {True: "PASS", False: "MISS", None: "n/a"}[t.passed]
        lines.append(f"  {t.label:<44} {t.goal:>8}  measured {t.shown:<40} {verdict}")
    return "\n".join(lines)


SCENARIOS: dict[str, Callable[[Results, bool, str], None]] = {
    "B1": bench_b1,
    "B2": bench_b2,
    "B3": bench_b3,
    "B4": bench_b4,
    "B5": bench_b5,
    "B6": bench_b6,
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short run (~1 minute)")
    ap.add_argument("--json", metavar="PATH", help="save every figure as JSON")
    ap.add_argument(
        "--disk-dir",
        default=os.curdir,
        metavar="DIR",
        help="directory for disk-backed files (default: current directory)",
    )
    ap.add_argument(
        "--only",
        default=",".join(SCENARIOS),
        help="comma-separated scenarios to run (default: all)",
    )
    args = ap.parse_args(argv)
    chosen = [s.strip().upper() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SCENARIOS]
    if unknown:
        ap.error(f"unknown scenario(s): {', '.join(unknown)}")
    if not os.path.isdir(args.disk_dir):
        ap.error(f"--disk-dir {args.disk_dir!r} is not a directory")
    info = machine_info(args.disk_dir)
    info["load_before"] = load_snapshot()
    res = Results()
    t_start = time.monotonic()
    for name in chosen:
        t0 = time.monotonic()
        print(f"running {name} ...", file=sys.stderr, flush=True)
        SCENARIOS[name](res, args.quick, args.disk_dir)
        res.extra.setdefault("scenario_seconds", {})[name] = round(
            time.monotonic() - t0, 2
        )
    info["total_seconds"] = round(time.monotonic() - t_start, 1)
    info["load_after"] = load_snapshot()
    print(render(res, info, args.quick))
    print(
        f"\n(total {info['total_seconds']} s; machine load before: "
        f"{info['load_before']}; after: {info['load_after']})"
    )
    if args.json:
        doc = {
            "machine": info,
            "quick": args.quick,
            "harness": "timeit.Timer (B1), time.perf_counter_ns (B2-B6); "
            "median of repeats",
            "series": [s.as_json() for s in res.series],
            "ratios": [r.__dict__ for r in res.ratios],
            "targets": [t.__dict__ for t in targets_of(res)],
            "notes": res.notes,
            "extra": res.extra,
        }
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
