"""B3: 1 to 8 threads, each dirtying and flushing one page of its own map.

msyncext's flushes overlap in the kernel; mmap.flush's take turns on the GIL.
Figures are flushes per second summed over the threads.
"""

from __future__ import annotations

import contextlib

from b2_convoy import flusher
from common import PAGE, Context, Figures, mapped_file, median, rotate, run_threads

COUNTS = (1, 2, 4, 8)


def run(ctx: Context) -> Figures:
    rounds, secs = (2, 0.3) if ctx.quick else (7, 0.5)
    names = {True: "msyncext.flush", False: "mmap.flush"}
    got: dict[tuple[int, bool], list[float]] = {
        (n, ours): [] for n in COUNTS for ours in names
    }
    with contextlib.ExitStack() as stack:
        maps = [
            stack.enter_context(mapped_file(ctx.disk_dir, 16 * PAGE))[0]
            for _ in range(max(COUNTS))
        ]
        for r in range(rounds):
            for n, ours in rotate(list(got), r):
                bodies = [flusher(m, ours) for m in maps[:n]]
                got[(n, ours)].append(sum(run_threads(bodies, secs)))
    out: Figures = {}
    for (n, ours), rates in got.items():
        out[f"{n} threads, {names[ours]} [flushes/s]"] = median(rates)
    for n in COUNTS:
        out[f"{n} threads, msyncext.flush / mmap.flush [x]"] = (
            out[f"{n} threads, msyncext.flush [flushes/s]"]
            / out[f"{n} threads, mmap.flush [flushes/s]"]
        )
    return out
