"""B6: flush_ranges' max_gap, swept over the 256 pages of B4 (and in full runs, 64
pages k KiB apart), with clean gaps (merging saves an msync, a device cache flush
on ext4, per run) and dirty ones (merging also writes the gaps, inside the call)."""

import itertools
import mmap
import random
import sys
import time
from functools import partial

import common as c

import msyncext

GAPS = {"0": 0, "64K": 64 << 10, "256K": 256 << 10, "1M": c.MIB, "4M": 4 * c.MIB}
GAPS["unlimited"] = sys.maxsize


def batch(m: mmap.mmap, pages: list[int], dirty: bool, gap: int) -> tuple[float, int]:
    msyncext.flush(m)
    lo, hi = pages[0] * c.PAGE, pages[-1] * c.PAGE + c.PAGE
    if dirty:
        m[lo:hi] = b"\x01" * (hi - lo)
    for p in pages:
        m[p * c.PAGE] = 2
    ranges = [(p * c.PAGE, 1) for p in pages]
    t0 = time.perf_counter()
    calls = msyncext.flush_ranges(m, ranges, max_gap=gap)
    return (time.perf_counter() - t0) * 1e3, calls


def run(ctx: c.Context) -> c.Figures:
    layouts = {
        f"every {k}K": [i * (k * 1024 // c.PAGE) for i in range(64)]
        for k in (() if ctx.quick else (8, 32, 128, 512, 2048))
    }
    layouts["B4 random"] = sorted(random.Random(4).sample(range(16384), 256))
    size = max(max(pages) for pages in layouts.values()) * c.PAGE + c.PAGE
    out: c.Figures = {}
    with c.mapped_file(ctx.disk_dir, size) as (m, _):
        for (layout, pages), gaps in itertools.product(
            layouts.items(), ("clean", "dirty")
        ):
            got = c.rounds(
                2 if ctx.quick else 7,
                {
                    f"{layout}, {gaps} gaps, max_gap={k}": partial(
                        batch, m, pages, gaps == "dirty", v
                    )
                    for k, v in GAPS.items()
                },
            )
            for key, runs in got.items():
                out[f"{key} [ms]"] = c.median(ms for ms, _ in runs)
                out[f"{key} [msync calls]"] = runs[-1][1]
    return out
