"""B2: a thread that flushes beside a CPU-bound thread (the GIL and the convoy).

The flusher dirties one byte of a disk-backed page and flushes that page
(MS_SYNC), again and again: a durable record write. The CPU thread counts.
msyncext releases the GIL for the syscall, so the CPU thread runs on; but on
a GIL build the flusher must win the GIL back after every syscall, and a
CPU-bound thread hands it over only every sys.getswitchinterval(): each flush
then costs its own time plus up to one switch interval (the convoy).
mmap.flush holds the GIL through the syscall instead, stalling the CPU
thread. Every window of a round is paired with the CPU thread's solo speed
of the same round, so load from other processes mostly cancels.
"""

from __future__ import annotations

import mmap
import sys

from common import (
    PAGE,
    Body,
    Context,
    Figures,
    cpu_body,
    mapped_file,
    median,
    rotate,
    run_threads,
)

import msyncext

INTERVALS_MS = (5.0, 1.0, 0.1)
GIL = getattr(sys, "_is_gil_enabled", lambda: True)()


def flusher(m: mmap.mmap, ours: bool) -> Body:
    flush = msyncext.flush if ours else mmap.mmap.flush

    def body(stop: list[bool]) -> float:
        n = 0
        while not stop[0]:
            m[0] = n & 0xFF
            flush(m, 0, PAGE)
            n += 1
        return n

    return body


def run(ctx: Context) -> Figures:
    rounds, secs = (3, 0.25) if ctx.quick else (10, 0.5)
    names = {True: "msyncext.flush", False: "mmap.flush"}
    windows = ["cpu", True, False] + [
        (ms, ours) for ms in INTERVALS_MS for ours in names
    ]
    got: dict[object, list[float]] = {w: [] for w in windows}
    share: dict[object, list[float]] = {w: [] for w in windows}
    default = sys.getswitchinterval()
    with mapped_file(ctx.disk_dir, 16 * PAGE) as (m, _):
        for r in range(rounds):
            for w in rotate(windows, r):
                if w == "cpu":
                    got[w] += run_threads([cpu_body], secs)
                elif isinstance(w, bool):
                    got[w] += run_threads([flusher(m, w)], secs)
                else:
                    sys.setswitchinterval(w[0] / 1e3)
                    try:
                        cpu, flushes = run_threads([cpu_body, flusher(m, w[1])], secs)
                    finally:
                        sys.setswitchinterval(default)
                    got[w].append(flushes)
                    share[w].append(cpu)
            for w in windows[3:]:
                share[w][-1] = 100 * share[w][-1] / got["cpu"][-1]
    out: Figures = {"CPU thread alone [loops/s]": median(got["cpu"])}
    for ours, name in names.items():
        out[f"flusher alone, {name} [flushes/s]"] = median(got[ours])
    for ms, ours in windows[3:]:
        at = f"switch interval {ms:g} ms"
        out[f"{at}: flusher beside CPU, {names[ours]} [flushes/s]"] = median(
            got[(ms, ours)]
        )
        out[f"{at}: CPU thread beside {names[ours]} [% of alone]"] = median(
            share[(ms, ours)]
        )
        if ours and GIL:  # each flush, then one wait for the GIL
            solo = median(got[True])
            out[f"{at}: convoy model 1/(interval + 1/alone) [flushes/s]"] = 1 / (
                ms / 1e3 + 1 / solo
            )
    return out
