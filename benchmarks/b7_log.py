"""B7: an append-only log: commits/s and commit latency, alone and beside CPU.

Each commit appends 1 to 8 records of 100 to 4,000 bytes through a map of a
disk file and makes them durable before the next one starts. Contenders: the
page-aligned m.flush a user has to write, msyncext.flush of exactly the
commit's bytes, ctypes msync (aligned by hand, return code checked), and
group commit: msyncext.flush_ranges over 8 commits at a time, whose latency
runs from a commit's first append to the end of its group's flush. The CPU
thread's share is its speed beside the log writer against its speed alone.
"""

from __future__ import annotations

import ctypes
import mmap
import random
import statistics
import time
from collections.abc import Callable

from common import (
    MIB,
    PAGE,
    Body,
    Context,
    Figures,
    cpu_body,
    libc_msync,
    mapped_file,
    median,
    rotate,
    run_threads,
)

import msyncext

GROUP = 8
rng = random.Random(7)
COMMITS = [
    [rng.randbytes(rng.randint(100, 4000)) for _ in range(rng.randint(1, 8))]
    for _ in range(1000)
]


def make_flushes(m: mmap.mmap, addr: int) -> dict[str, Callable[..., object]]:
    msync = libc_msync()

    def aligned_mmap(begin: int, size: int) -> None:
        start = begin - begin % PAGE
        m.flush(start, begin + size - start)

    def aligned_ctypes(begin: int, size: int) -> None:
        start = begin - begin % PAGE
        if msync(addr + start, begin + size - start, msyncext.MS_SYNC) != 0:
            raise OSError(ctypes.get_errno(), "msync failed")

    return {
        "m.flush, aligned by hand": aligned_mmap,
        "msyncext.flush": lambda begin, size: msyncext.flush(m, begin, size),
        "ctypes msync, aligned by hand": aligned_ctypes,
        f"msyncext.flush_ranges, {GROUP} commits a call": msyncext.flush_ranges,
    }


def writer(m: mmap.mmap, flush: Callable[..., object], lat: list[int]) -> Body:
    grouped = flush is msyncext.flush_ranges
    end = len(m) - 8 * 4000

    def body(stop: list[bool]) -> float:
        pos = n = 0
        group: list[tuple[int, int]] = []
        starts: list[int] = []
        while not stop[0]:
            t0 = time.perf_counter_ns()
            begin = pos = 0 if pos > end else pos
            for record in COMMITS[n % len(COMMITS)]:
                m[pos : pos + len(record)] = record
                pos += len(record)
            n += 1
            if not grouped:
                flush(begin, pos - begin)
                lat.append(time.perf_counter_ns() - t0)
                continue
            group.append((begin, pos - begin))
            starts.append(t0)
            if len(group) == GROUP:
                flush(m, group)
                t1 = time.perf_counter_ns()
                lat.extend(t1 - t for t in starts)
                group.clear()
                starts.clear()
        return n - len(group)  # commits made durable

    return body


def run(ctx: Context) -> Figures:
    rounds, secs = (2, 0.3) if ctx.quick else (5, 1.0)
    out: Figures = {}
    with mapped_file(ctx.disk_dir, 32 * MIB) as (m, _):
        pin = ctypes.c_char.from_buffer(m)  # a ctypes user's pointer
        flushes = make_flushes(m, ctypes.addressof(pin))
        windows = ["cpu"] + [(f, beside) for f in flushes for beside in (0, 1)]
        rate: dict[object, list[float]] = {w: [] for w in windows}
        share: dict[object, list[float]] = {w: [] for w in windows}
        lat: dict[object, list[int]] = {w: [] for w in windows}
        for r in range(rounds):
            for w in rotate(windows, r):
                if w == "cpu":
                    rate[w] += run_threads([cpu_body], secs)
                    continue
                log = writer(m, flushes[w[0]], lat[w])
                rates = run_threads([log, cpu_body][: 1 + w[1]], secs)
                rate[w].append(rates[0])
                share[w] += rates[1:]
            for w in windows[1:]:
                if w[1]:
                    share[w][-1] *= 100 / rate["cpu"][-1]
        del flushes, pin
    for name, beside in windows[1:]:
        w = (name, beside)
        at = f"{'beside CPU' if beside else 'alone'}, {name}"
        cuts = statistics.quantiles(lat[w], n=100)
        out[f"{at} [commits/s]"] = median(rate[w])
        out[f"{at}, latency median [us]"] = cuts[49] / 1e3
        out[f"{at}, latency p99 [us]"] = cuts[98] / 1e3
        if beside:
            out[f"{at}, CPU thread [% of alone]"] = median(share[w])
    return out
