"""B8: what flush_ranges itself costs, on tmpfs (msync does no I/O): a one-pair
batch against flush (pyperf), then N scattered one-byte ranges (MS_ASYNC) as a
list of int pairs and as an (N, 2) NumPy array if NumPy is installed: time per
pair, and extra peak memory per pair by tracemalloc, which sees msyncext's."""

import random
import time
import tracemalloc
from functools import partial
from typing import Any

import common as c

import msyncext

SIZE, ASYNC = 64 * c.MIB, msyncext.MS_ASYNC


def verdict(met: bool, detail: str) -> str:
    return f"{'met' if met else 'MISSED'} ({detail})"


def run(ctx: c.Context) -> c.Figures:
    m = c.kept.enter_context(c.mapped_file(c.SHM, c.PAGE))[0]
    one, batch = "flush(m, 0, PAGE)", "flush_ranges(m, [(0, PAGE)])"
    out = c.pyperf_ns(
        ctx, f"one pair: msyncext.{one}", partial(msyncext.flush, m, 0, c.PAGE)
    )
    out |= c.pyperf_ns(
        ctx,
        f"one pair: msyncext.{batch}",
        partial(msyncext.flush_ranges, m, [(0, c.PAGE)]),
    )
    if not out:  # a pyperf worker
        return out
    extra = (
        out[f"one pair: msyncext.{batch} [ns]"] - out[f"one pair: msyncext.{one} [ns]"]
    ) / 1e3
    out["target: a one-pair batch costs at most 1 us more than flush"] = verdict(
        extra <= 1, f"{extra:+.2f} us"
    )
    try:
        import numpy as np
    except ImportError:
        np = None  # type: ignore[assignment]
    r, ns, peak = random.Random(8), {}, {}
    with c.mapped_file(c.SHM, SIZE) as (m, _):
        for n in (1_000, 100_000, 1_000_000):
            kinds: dict[str, Any] = {"list": [(r.randrange(SIZE), 1) for _ in range(n)]}
            if np is not None:
                kinds["array"] = np.array(kinds["list"], dtype=np.int64)
            for kind, pairs in kinds.items():
                times = []
                for _ in range(max(5, 10**5 // n) if ctx.quick else max(9, 10**6 // n)):
                    t0 = time.perf_counter()
                    msyncext.flush_ranges(m, pairs, flags=ASYNC)
                    times.append(time.perf_counter() - t0)
                tracemalloc.start()
                msyncext.flush_ranges(m, pairs, flags=ASYNC)
                peak[kind] = tracemalloc.get_traced_memory()[1] / n
                tracemalloc.stop()
                ns[n, kind] = c.median(times) / n * 1e9
                out[f"{n:,} pairs, {kind} [ns per pair]"] = ns[n, kind]
                out[f"{n:,} pairs, {kind} [extra peak bytes per pair]"] = peak[kind]
    worst = max(v for (_, kind), v in ns.items() if kind == "list")
    out["target: at most 0.5 us per further pair (list of int pairs)"] = verdict(
        worst <= 500, f"worst {worst:.0f} ns"
    )
    if np is not None:
        slower = [
            n for (n, kind), v in ns.items() if kind == "array" and v > ns[n, "list"]
        ]
        out["target: an (n, 2) array no slower per pair than a list"] = verdict(
            not slower, f"slower at n = {slower}" if slower else "at every n"
        )
    worst = max(peak.values())  # at the largest n
    out["target: at most 64 bytes of extra peak memory per pair"] = verdict(
        worst <= 64, f"worst {worst:.0f} B"
    )
    return out
