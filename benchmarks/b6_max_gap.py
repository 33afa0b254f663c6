"""B6: flush_ranges' max_gap, swept over layouts with clean and with dirty gaps.

64 target pages k KiB apart, and the 256 random pages of B4. With clean
gaps, merging runs saves one msync (a device cache flush on ext4) per run;
with dirty gaps (every page between the targets dirty too), merging also
writes those pages now, inside the call.
"""

from __future__ import annotations

import random
import sys
import time

from common import MIB, PAGE, Context, Figures, mapped_file, median, rotate

import msyncext

GAPS = {"0": 0, "64K": 64 << 10, "256K": 256 << 10, "1M": MIB, "4M": 4 * MIB}
GAPS["unlimited"] = sys.maxsize


def run(ctx: Context) -> Figures:
    rounds = 2 if ctx.quick else 7
    layouts = {
        f"every {k}K": [i * (k * 1024 // PAGE) for i in range(64)]
        for k in (() if ctx.quick else (8, 32, 128, 512, 2048))
    }
    layouts["B4 random"] = sorted(random.Random(4).sample(range(16384), 256))
    size = max(max(t) for t in layouts.values()) * PAGE + PAGE
    out: Figures = {}
    with mapped_file(ctx.disk_dir, size) as (m, _):
        for layout, pages in layouts.items():
            ranges = [(p * PAGE, 1) for p in pages]
            lo, hi = pages[0] * PAGE, pages[-1] * PAGE + PAGE
            for gaps in ("clean", "dirty"):
                ms: dict[str, list[float]] = {g: [] for g in GAPS}
                calls: dict[str, int] = {}
                for r in range(rounds):
                    for gap in rotate(list(GAPS), r):
                        msyncext.flush(m)
                        if gaps == "dirty":
                            m[lo:hi] = bytes([r]) * (hi - lo)
                        for p in pages:
                            m[p * PAGE] = r + 1
                        t0 = time.perf_counter()
                        calls[gap] = msyncext.flush_ranges(m, ranges, max_gap=GAPS[gap])
                        ms[gap].append((time.perf_counter() - t0) * 1e3)
                for gap, values in ms.items():
                    key = f"{layout}, {gaps} gaps, max_gap={gap}"
                    out[f"{key} [ms]"] = median(values)
                    out[f"{key} [msync calls]"] = calls[gap]
    return out
