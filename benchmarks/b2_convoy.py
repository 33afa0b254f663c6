"""B2: a thread that flushes beside a CPU-bound thread. msyncext releases the GIL
for the syscall, but on a GIL build must win it back from a thread that yields it
only every switch interval (the convoy); mmap.flush holds it, stalling the CPU
thread, whose share is its speed against its speed alone in the same round."""

from collections.abc import Callable
from functools import partial

import common as c

INTERVALS_MS = (5.0, 1.0, 0.1) if c.GIL else (5.0,)  # free-threaded: no convoy


def run(ctx: c.Context) -> c.Figures:
    n, secs = (3, 0.25) if ctx.quick else (10, 0.5)
    with c.mapped_file(ctx.disk_dir, 16 * c.PAGE) as (m, _):
        runs: dict[str, Callable[[], list[float]]] = {
            "cpu": partial(c.threads, [c.cpu], secs)
        }
        for name, flush in c.FLUSHES.items():
            runs[name] = partial(c.threads, [c.flusher(m, flush)], secs)
            for ms in INTERVALS_MS:
                pair = [c.cpu, c.flusher(m, flush)]
                runs[f"{ms:g} ms: {name}"] = partial(c.threads, pair, secs, ms)
        got = c.rounds(n, runs)
    alone = [r for [r] in got["cpu"]]
    out: c.Figures = {"CPU thread alone [loops/s]": c.median(alone)}
    for name in c.FLUSHES:
        out[f"flusher alone, {name} [flushes/s]"] = c.median(r for [r] in got[name])
    solo = out["flusher alone, msyncext.flush [flushes/s]"]
    for ms in INTERVALS_MS:
        at = f"switch interval {ms:g} ms: "
        for name in c.FLUSHES:
            both = got[f"{ms:g} ms: {name}"]
            out[f"{at}flusher beside CPU, {name} [flushes/s]"] = c.median(
                f for _, f in both
            )
            out[f"{at}CPU thread beside {name} [% of alone]"] = c.median(
                100 * r / a for (r, _), a in zip(both, alone, strict=True)
            )
        if c.GIL:  # each msyncext flush, then one wait for the GIL
            out[f"{at}convoy model 1/(interval + 1/alone) [flushes/s]"] = 1 / (
                ms / 1e3 + 1 / solo
            )
    return out
