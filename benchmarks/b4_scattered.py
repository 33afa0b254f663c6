"""B4: 256 scattered dirty pages of a 64 MiB file on disk, flushed in one batch,
page-granular (and in full runs, with large folios; see common.mapped_file).
The reference writes the same bytes with pwrite and one fdatasync."""

import mmap
import os
import random
import time
from collections.abc import Callable
from functools import partial

import common as c

import msyncext

SIZE = 64 * c.MIB
PAGES = sorted(random.Random(4).sample(range(SIZE // c.PAGE), 256))
RANGES = [(p * c.PAGE, c.PAGE) for p in PAGES]


def batch(
    m: mmap.mmap, fd: int, call: Callable[[], object], pwrite: bool
) -> tuple[float, object]:
    """Dirty one byte of each page (by pwrite for the reference), time one call."""
    for p in PAGES:
        if pwrite:
            os.pwrite(fd, b"\x01", p * c.PAGE)
        else:
            m[p * c.PAGE] = 1
    t0 = time.perf_counter()
    result = call()
    return (time.perf_counter() - t0) * 1e3, result


def loop(m: mmap.mmap, flush: Callable[..., object]) -> None:
    for r in RANGES:
        flush(m, *r)


def run(ctx: c.Context) -> c.Figures:
    out: c.Figures = {}
    for p in ("",) if ctx.quick else ("", "large folios: "):
        with c.mapped_file(ctx.disk_dir, SIZE, page_granular=not p) as (m, fd):
            flush_ranges = partial(msyncext.flush_ranges, m, RANGES)
            calls: dict[str, Callable[[], object]] = {
                "flush_ranges(m, pairs)": flush_ranges,
                "flush_ranges(m, pairs, max_gap=0)": partial(flush_ranges, max_gap=0),
                "loop of msyncext.flush(m, off, n)": partial(loop, m, msyncext.flush),
                "loop of m.flush(off, n)": partial(loop, m, mmap.mmap.flush),
                "msyncext.flush(m), whole map": partial(msyncext.flush, m),
                "reference: os.pwrite + os.fdatasync": partial(os.fdatasync, fd),
            }
            batch(m, fd, int, False)
            out[f"{p}dirty pages after the 256 stores"] = c.dirty_pages(fd)
            n = 6 if ctx.quick else 16  # the first round warms up
            got = c.rounds(
                n,
                {k: partial(batch, m, fd, f, k[:3] == "ref") for k, f in calls.items()},
            )
        for name, runs in got.items():
            out[f"{p}{name} [ms]"] = c.median(ms for ms, _ in runs[1:])
            if isinstance(runs[-1][1], int):
                out[f"{p}{name} [msync calls]"] = runs[-1][1]
    return out
