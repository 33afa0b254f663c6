"""B4: 256 scattered dirty pages of a 64 MiB disk-backed map, in one batch.

Each page is re-dirtied (one byte) before every timed batch. The file is
page-granular (see common.mapped_file); the "large folios" variant keeps the
page cache as write(2) left it, where on Linux 6.16+ ext4 the same stores
dirty whole folios, and every method writes far more. The reference writes
the same bytes with os.pwrite and syncs them with one os.fdatasync: the
device's floor for this I/O.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable

from common import MIB, PAGE, Context, Figures, dirty_pages, mapped_file, median, rotate

import msyncext

SIZE = 64 * MIB
PAGES = sorted(random.Random(4).sample(range(SIZE // PAGE), 256))
RANGES = [(p * PAGE, PAGE) for p in PAGES]


def run(ctx: Context) -> Figures:
    out: Figures = {}
    for granular in (True, False) if not ctx.quick else (True,):
        prefix = "" if granular else "large folios: "
        out |= batch(ctx, granular, prefix)
    return out


def batch(ctx: Context, granular: bool, prefix: str) -> Figures:
    rounds = 5 if ctx.quick else 15
    with mapped_file(ctx.disk_dir, SIZE, page_granular=granular) as (m, fd):
        flush, ranges = msyncext.flush, msyncext.flush_ranges
        methods: dict[str, Callable[[], object]] = {
            "flush_ranges(m, pairs)": lambda: ranges(m, RANGES),
            "flush_ranges(m, pairs, max_gap=0)": lambda: ranges(m, RANGES, max_gap=0),
            "loop of msyncext.flush(m, off, n)": lambda: [flush(m, *r) for r in RANGES],
            "loop of m.flush(off, n)": lambda: [m.flush(*r) for r in RANGES],
            "msyncext.flush(m), whole map": lambda: flush(m),
            "reference: os.pwrite + os.fdatasync": lambda: os.fdatasync(fd),
        }
        ms: dict[str, list[float]] = {k: [] for k in methods}
        calls: dict[str, object] = {}
        dirty: list[int | None] = []
        flush(m)
        for r in range(rounds + 1):  # round 0 warms up
            for name in rotate(list(methods), r):
                if name.startswith("reference"):
                    for p in PAGES:
                        os.pwrite(fd, bytes([r]), p * PAGE)
                else:
                    for p in PAGES:
                        m[p * PAGE] = r
                    dirty.append(dirty_pages(fd))
                t0 = time.perf_counter()
                calls[name] = methods[name]()
                if r:
                    ms[name].append((time.perf_counter() - t0) * 1e3)
    out: Figures = {f"{prefix}dirty pages after the 256 stores": dirty[-1]}
    for name, values in ms.items():
        out[f"{prefix}{name} [ms]"] = median(values)
        if isinstance(calls[name], int):
            out[f"{prefix}{name} [msync calls]"] = calls[name]
    loop = out[f"{prefix}loop of m.flush(off, n) [ms]"]
    for name in ("flush_ranges(m, pairs)", "msyncext.flush(m), whole map"):
        out[f"{prefix}loop of m.flush / {name} [x]"] = (
            loop / out[f"{prefix}{name} [ms]"]
        )
    return out
