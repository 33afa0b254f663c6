"""B5: write back a map whose every page is dirty (64 MiB; 256 MiB in full runs).

Against os.fdatasync of the same file and mmap.flush; MB = 10^6 bytes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from common import MIB, Context, Figures, mapped_file, median, rotate

import msyncext


def run(ctx: Context) -> Figures:
    out: Figures = {}
    for mib in (64,) if ctx.quick else (64, 256):
        rounds = 3 if ctx.quick else 5
        with mapped_file(ctx.disk_dir, mib * MIB, page_granular=False) as (m, fd):
            methods: dict[str, Callable[[], object]] = {
                "msyncext.flush(m)": lambda: msyncext.flush(m),
                "m.flush()": m.flush,
                "os.fdatasync(fd)": lambda: os.fdatasync(fd),
            }
            rates: dict[str, list[float]] = {k: [] for k in methods}
            for r in range(rounds):
                for name in rotate(list(methods), r):
                    m[:] = bytes([r + 1]) * len(m)  # every page dirty
                    t0 = time.perf_counter()
                    methods[name]()
                    rates[name].append(len(m) / 1e6 / (time.perf_counter() - t0))
        for name, values in rates.items():
            out[f"{mib} MiB: {name} [MB/s]"] = median(values)
    return out
