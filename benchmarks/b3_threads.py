"""B3: 1 to 8 threads, each dirtying and flushing one page of its own file, in
flushes/s summed: msyncext's overlap in the kernel, mmap.flush's take turns."""

import contextlib
from functools import partial

import common as c


def run(ctx: c.Context) -> c.Figures:
    n, secs = (2, 0.3) if ctx.quick else (7, 0.5)
    with contextlib.ExitStack() as files:
        new = partial(c.mapped_file, ctx.disk_dir, 16 * c.PAGE)
        maps = [files.enter_context(new())[0] for _ in range(8)]
        got = c.rounds(
            n,
            {
                f"{k} threads, {name} [flushes/s]": partial(
                    c.threads, [c.flusher(m, flush) for m in maps[:k]], secs
                )
                for k in (1, 2, 4, 8)
                for name, flush in c.FLUSHES.items()
            },
        )
    return {key: c.median(map(sum, rates)) for key, rates in got.items()}
