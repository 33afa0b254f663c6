"""B7: an append-only log. Each commit appends 1 to 8 records of 100 to 4,000
bytes to a mapped disk file and makes them durable: by m.flush or ctypes msync
of the pages (aligned by hand), msyncext.flush of exactly its bytes, or one
msyncext.flush_ranges per 8 commits (latency: first append to the group's end),
also with each commit's write-out started as it is appended (MS_ASYNC, issue
15; RocksDB's wal_bytes_per_sync), so the group's sync has less left to write.
Alone and beside a CPU thread, whose share is its speed against its speed alone."""

import ctypes
import mmap
import random
import statistics
import time
from collections.abc import Callable
from functools import partial

import common as c

import msyncext

rng = random.Random(7)
COMMITS = [
    [rng.randbytes(rng.randint(100, 4000)) for _ in range(rng.randint(1, 8))]
    for _ in range(1000)
]
Flush = Callable[[list[tuple[int, int]]], object]  # a list of (begin, size) commits
Start = Callable[[int, int], object] | None  # called with each commit's (begin, size)


def aligned(
    flush: Callable[[int, int], object], commits: list[tuple[int, int]]
) -> None:
    [(begin, size)] = commits
    flush(begin - begin % c.PAGE, begin % c.PAGE + size)


def flushes(m: mmap.mmap) -> dict[str, tuple[Flush, int, Start]]:
    """Each way to flush, how many commits it takes at once, and what starts the
    write-out of each commit as it is appended (None: nothing)."""
    msync, addr = c.libc_msync(m)

    def by_ctypes(start: int, size: int) -> None:
        if msync(addr + start, size, msyncext.MS_SYNC) != 0:
            raise OSError(ctypes.get_errno(), "msync failed")

    return {
        "m.flush, aligned by hand": (partial(aligned, m.flush), 1, None),
        "msyncext.flush": (lambda commits: msyncext.flush(m, *commits[0]), 1, None),
        "ctypes msync, aligned by hand": (partial(aligned, by_ctypes), 1, None),
        "msyncext.flush_ranges, 8 commits a call": (
            partial(msyncext.flush_ranges, m),
            8,
            None,
        ),
        "msyncext.flush_ranges, 8 commits a call, MS_ASYNC per commit": (
            partial(msyncext.flush_ranges, m),
            8,
            partial(msyncext.flush, m, flags=msyncext.MS_ASYNC),
        ),
    }


def writer(
    m: mmap.mmap, flush: Flush, group: int, start: Start, latency: list[int]
) -> c.Body:
    def body(stop: list[bool]) -> float:
        pos = n = 0
        commits: list[tuple[int, int]] = []
        starts: list[int] = []
        while not stop[0]:
            starts.append(time.perf_counter_ns())
            begin = pos = 0 if pos > len(m) - 8 * 4000 else pos
            for record in COMMITS[n % len(COMMITS)]:
                m[pos : pos + len(record)] = record
                pos += len(record)
            n += 1
            commits.append((begin, pos - begin))
            if start:
                start(begin, pos - begin)
            if len(commits) == group:
                flush(commits)
                end = time.perf_counter_ns()
                latency.extend(end - t for t in starts)
                commits.clear()
                starts.clear()
        return n - len(commits)  # commits made durable

    return body


def run(ctx: c.Context) -> c.Figures:
    n, secs = (2, 0.3) if ctx.quick else (5, 1.0)
    with c.mapped_file(ctx.disk_dir, 32 * c.MIB) as (m, _):
        latency: dict[str, list[int]] = {}
        runs: dict[str, Callable[[], list[float]]] = {
            "cpu": partial(c.threads, [c.cpu], secs)
        }
        for name, (flush, group, start) in flushes(m).items():
            for at in (f"alone, {name}", f"beside CPU, {name}"):
                body = writer(m, flush, group, start, latency.setdefault(at, []))
                runs[at] = partial(c.threads, [body, c.cpu][: 1 + (at[0] == "b")], secs)
        got = c.rounds(n, runs)
    out: c.Figures = {}
    for at, ns in latency.items():
        cuts = statistics.quantiles(ns, n=100)
        out[f"{at} [commits/s]"] = c.median(r[0] for r in got[at])
        out[f"{at}, latency median [us]"] = cuts[49] / 1e3
        out[f"{at}, latency p99 [us]"] = cuts[98] / 1e3
        if at[0] == "b":
            out[f"{at}, CPU thread [% of alone]"] = c.median(
                100 * r[1] / a for r, [a] in zip(got[at], got["cpu"], strict=True)
            )
    return out
