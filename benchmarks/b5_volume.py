"""B5: write back a map whose every page is dirty (64 MiB, and 256 in full runs),
against mmap.flush and os.fdatasync of the same file; MB = 10^6 bytes."""

import mmap
import os
import time
from collections.abc import Callable
from functools import partial

import common as c

import msyncext


def rate(m: mmap.mmap, call: Callable[[], object]) -> float:
    m[:] = b"\x01" * len(m)  # every page dirty
    t0 = time.perf_counter()
    call()
    return len(m) / 1e6 / (time.perf_counter() - t0)


def run(ctx: c.Context) -> c.Figures:
    out: c.Figures = {}
    for mib in (64,) if ctx.quick else (64, 256):
        with c.mapped_file(ctx.disk_dir, mib * c.MIB, page_granular=False) as (m, fd):
            got = c.rounds(
                3 if ctx.quick else 5,
                {
                    f"{mib} MiB: msyncext.flush(m) [MB/s]": partial(
                        rate, m, partial(msyncext.flush, m)
                    ),
                    f"{mib} MiB: m.flush() [MB/s]": partial(rate, m, m.flush),
                    f"{mib} MiB: os.fdatasync(fd) [MB/s]": partial(
                        rate, m, partial(os.fdatasync, fd)
                    ),
                },
            )
        out |= {k: c.median(v) for k, v in got.items()}
    return out
