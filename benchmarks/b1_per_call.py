"""B1: the cost of one call that flushes one clean page, on tmpfs and on disk.

On tmpfs the syscall does no I/O, so this is the floor: what the call itself
costs. On ext4 every MS_SYNC call also sends a cache flush to the device.
pyperf times each contender in its own worker processes; the names are bound
once, as in a hot loop.
"""

from __future__ import annotations

import functools
import itertools
import os
import time
from collections.abc import Callable

from common import (
    PAGE,
    SHM,
    Context,
    Figures,
    kept_map,
    libc_msync,
    pinned_address,
    pyperf_ns,
)

import msyncext

PYPERF = True


NAMES = (
    "msyncext.flush(m, 0, PAGE)",
    "msyncext.flush(m, 100, 200), unaligned",
    "m.flush(0, PAGE)",
    "ctypes msync(addr, PAGE, MS_SYNC)",
    "os.fdatasync(fd)",
)


@functools.cache
def contenders(directory: str) -> dict[str, Callable[[], object]]:
    """Built once per worker process, on its first timing call.

    partial() adds the same few nanoseconds to every contender, less than a
    Python-level wrapper would.
    """
    m, fd = kept_map(directory)
    msyncext.flush(m)  # every page clean
    addr = pinned_address(m)
    part = functools.partial
    calls = (
        part(msyncext.flush, m, 0, PAGE),
        part(msyncext.flush, m, 100, 200),
        part(m.flush, 0, PAGE),
        part(libc_msync(), addr, PAGE, msyncext.MS_SYNC),
        part(os.fdatasync, fd),
    )
    return dict(zip(NAMES, calls, strict=True))


def timed(loops: int, directory: str, name: str) -> float:
    call = contenders(directory)[name]
    t0 = time.perf_counter()
    for _ in itertools.repeat(None, loops):
        call()
    return time.perf_counter() - t0


def run(ctx: Context) -> Figures:
    out: Figures = {}
    for medium, directory in (("tmpfs", SHM), ("disk", ctx.disk_dir)):
        for name in NAMES:
            out |= pyperf_ns(ctx, f"{medium}: {name}", timed, directory, name)
        if f"{medium}: {NAMES[0]} [ns]" in out:
            ours = out[f"{medium}: {NAMES[0]} [ns]"]
            for other in NAMES[2:4]:
                out[f"{medium}: msyncext.flush / {other} [x]"] = (
                    ours / out[f"{medium}: {other} [ns]"]
                )
    return out
