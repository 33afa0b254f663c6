"""B8: what flush_ranges itself costs, per call and per pair, in time and memory.

On tmpfs, where msync does no I/O: a one-pair batch against flush (pyperf),
then N scattered one-byte ranges (MS_ASYNC, so the syscalls stay cheap) as
a list of int pairs and as an (N, 2) int64 NumPy array (when NumPy is
installed). Extra peak memory is measured in a fresh process (the larger of
tracemalloc's peak and the growth of the peak RSS).
"""

from __future__ import annotations

import functools
import itertools
import json
import mmap
import random
import subprocess
import sys
import time
from typing import Any

from common import MIB, PAGE, SHM, Context, Figures, kept_map, median, pyperf_ns

import msyncext

PYPERF = True
SIZE = 64 * MIB
SIZES = (1_000, 100_000, 1_000_000)

PROBE = """
import json, mmap, random, resource, sys, tempfile, tracemalloc, msyncext
n, kind, size = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
f = tempfile.TemporaryFile(dir="/dev/shm"); f.truncate(size)
m = mmap.mmap(f.fileno(), size)
if kind == "list":
    r = random.Random(1); pairs = [(r.randrange(size), 1) for _ in range(n)]
else:
    import numpy as np
    pairs = np.ones((n, 2), dtype=np.int64)
    pairs[:, 0] = np.random.default_rng(1).integers(0, size, n)
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
tracemalloc.start()
msyncext.flush_ranges(m, pairs, flags=msyncext.MS_ASYNC)
peak = tracemalloc.get_traced_memory()[1]
rss = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) * 1024
print(json.dumps(max(peak, rss) / n))
"""


def one_pair(loops: int, ranges: bool) -> float:
    m = map_of(PAGE)
    call = msyncext.flush_ranges if ranges else msyncext.flush
    args = (m, [(0, PAGE)]) if ranges else (m, 0, PAGE)
    t0 = time.perf_counter()
    for _ in itertools.repeat(None, loops):
        call(*args)
    return time.perf_counter() - t0


def run(ctx: Context) -> Figures:
    single = "one pair: msyncext.flush(m, 0, PAGE)"
    batch = "one pair: msyncext.flush_ranges(m, [(0, PAGE)])"
    out = pyperf_ns(ctx, single, one_pair, False) | pyperf_ns(
        ctx, batch, one_pair, True
    )
    if not out:  # a pyperf worker
        return out
    extra = (out[f"{batch} [ns]"] - out[f"{single} [ns]"]) / 1e3
    out["target: a one-pair batch costs at most 1 us more than flush"] = verdict(
        extra <= 1, f"{extra:+.2f} us"
    )
    try:
        import numpy as np
    except ImportError:
        np = None
    m = map_of(SIZE)
    r = random.Random(8)
    kinds: dict[str, Any] = {}
    sizes = SIZES[:2] if ctx.quick else SIZES  # 10^6 takes seconds a call
    for n in sizes:
        kinds["list"] = [(r.randrange(SIZE), 1) for _ in range(n)]
        if np is not None:
            kinds["array"] = np.array(kinds["list"], dtype=np.int64)
        repeats = max(2, 10**5 // n) if ctx.quick else max(3, 10**6 // n)
        for kind, pairs in kinds.items():
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                msyncext.flush_ranges(m, pairs, flags=msyncext.MS_ASYNC)
                times.append(time.perf_counter() - t0)
            out[f"{n:,} pairs, {kind} [ns per pair]"] = median(times) / n * 1e9
    worst = max(v for k, v in out.items() if "list [ns per pair]" in k)
    out["target: at most 0.5 us per further pair (list of int pairs)"] = verdict(
        worst <= 500, f"worst {worst:.0f} ns"
    )
    for kind in kinds:
        probe = [sys.executable, "-I", "-c", PROBE, str(sizes[-1]), kind, str(SIZE)]
        text = subprocess.run(probe, capture_output=True, text=True, check=True)
        out[f"{sizes[-1]:,} pairs, {kind} [extra peak bytes per pair]"] = json.loads(
            text.stdout
        )
    if np is not None:
        slower = [
            n
            for n in sizes
            if out[f"{n:,} pairs, array [ns per pair]"]
            > out[f"{n:,} pairs, list [ns per pair]"]
        ]
        out["target: an (n, 2) array no slower per pair than a list"] = verdict(
            not slower, f"slower at n = {slower}" if slower else "at every n"
        )
    worst = max(v for k, v in out.items() if "bytes per pair" in k)
    out["target: at most 64 bytes of extra peak memory per pair"] = verdict(
        worst <= 64, f"worst {worst:.0f} B"
    )
    return out


@functools.cache
def map_of(size: int) -> mmap.mmap:
    return kept_map(SHM, size)[0]


def verdict(met: bool, detail: str) -> str:
    return f"{'met' if met else 'MISSED'} ({detail})"
