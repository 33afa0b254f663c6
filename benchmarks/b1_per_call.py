"""B1: one call that flushes one clean page, timed by pyperf: on tmpfs (no I/O,
the call's own cost) and on disk (where ext4 sends a cache flush to the device)."""

import os
from collections.abc import Callable
from functools import partial

import common as c

import msyncext


def run(ctx: c.Context) -> c.Figures:
    out: c.Figures = {}
    for medium, directory in (("tmpfs", c.SHM), ("disk", ctx.disk_dir)):
        m, fd = c.kept.enter_context(c.mapped_file(directory, 16 * c.PAGE))
        msync, addr = c.libc_msync(m)
        msyncext.flush(m)  # every page clean; each call bound once, as in a loop
        calls: dict[str, Callable[[], object]] = {
            "msyncext.flush(m, 0, PAGE)": partial(msyncext.flush, m, 0, c.PAGE),
            "msyncext.flush(m, 100, 200), unaligned": partial(
                msyncext.flush, m, 100, 200
            ),
            "m.flush(0, PAGE)": partial(m.flush, 0, c.PAGE),
            "ctypes msync(addr, PAGE, MS_SYNC)": partial(
                msync, addr, c.PAGE, msyncext.MS_SYNC
            ),
            "os.fdatasync(fd)": partial(os.fdatasync, fd),
        }
        for name, call in calls.items():
            out |= c.pyperf_ns(ctx, f"{medium}: {name}", call)
    return out
