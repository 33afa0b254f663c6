"""Flush from asyncio code without blocking the event loop, and survive cancellation.

msync with MS_SYNC waits for the disk. Run it in a worker thread: msyncext
releases the GIL for the syscall, so the event loop keeps running meanwhile.

A thread cannot be stopped. When the task awaiting it is cancelled (the
timeout of asyncio.wait_for or asyncio.timeout, a TaskGroup whose other task
failed, shutdown), a plain `await asyncio.to_thread(msyncext.flush, m)`
stops waiting while the worker is still in msync with the map exported.
Closing the map then raises BufferError, which replaces the TimeoutError,
and the map stays open. in_worker() below instead waits for the worker to
finish before the cancellation goes on: the flush completes, the map can be
closed, and the caller gets its TimeoutError or CancelledError, only as
late as the flush took (msync cannot be interrupted). If the flush failed
meanwhile, its WritebackError is raised instead: lost data outranks a
deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import mmap
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import msyncext

T = TypeVar("T")


async def in_worker(call: Callable[[], T]) -> T:
    """call() in the default executor; returns or raises only once it is done."""
    # A plain future, not a task: nothing but this coroutine can cancel it.
    job = asyncio.get_running_loop().run_in_executor(None, call)
    try:
        return await asyncio.shield(job)
    except asyncio.CancelledError:
        # The worker still uses the buffer: wait for it, however often this
        # task is cancelled again, then let the first cancellation go on.
        while not job.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait([job])
        if (failure := job.exception()) is not None:
            raise failure from None
        raise


async def write_and_flush(m: mmap.mmap, offset: int, data: bytes) -> None:
    m[offset : offset + len(data)] = data
    await in_worker(functools.partial(msyncext.flush, m, offset, len(data)))


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "state.bin"
        with path.open("w+b") as f:
            f.truncate(1 << 20)
            with mmap.mmap(f.fileno(), 0) as m:
                # A write and its flush, under a deadline...
                await asyncio.wait_for(write_and_flush(m, 100, b"hello"), timeout=10)
                # ...several at once (each in a thread of the default executor)...
                await asyncio.gather(
                    *(write_and_flush(m, i * 65_536, os.urandom(512)) for i in range(4))
                )
                # ...many ranges in one call...
                ranges = [(i * 4_096, 16) for i in range(0, 256, 8)]
                for offset, size in ranges:
                    m[offset : offset + size] = b"x" * size
                calls = await in_worker(
                    functools.partial(msyncext.flush_ranges, m, ranges)
                )
                # ...and a flush cancelled while it runs: the task ends
                # cancelled only once the flush is over, so the map closes.
                task = asyncio.create_task(write_and_flush(m, 200, b"late"))
                await asyncio.sleep(0)  # it has handed the flush to a worker
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                assert task.cancelled()
        plural = "s" * (calls != 1)
        print(
            f"flushed 5 writes, {len(ranges)} ranges in {calls} msync call{plural}, "
            "and one cancelled in flight; the map closed"
        )


if __name__ == "__main__":
    asyncio.run(main())
