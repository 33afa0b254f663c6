"""Flush from asyncio code without blocking the event loop.

msync with MS_SYNC waits for the disk. Run it in a worker thread with
asyncio.to_thread: msyncext releases the GIL for the syscall, so the event
loop keeps running meanwhile. The mmap cannot be closed or resized while
the flush runs (that raises BufferError), so close it only after awaiting.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import tempfile
from pathlib import Path

import msyncext


async def write_and_flush(m: mmap.mmap, offset: int, data: bytes) -> None:
    m[offset : offset + len(data)] = data
    await asyncio.to_thread(msyncext.flush, m, offset, len(data))


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "state.bin"
        with path.open("w+b") as f:
            f.truncate(1 << 20)
            with mmap.mmap(f.fileno(), 0) as m:
                # One write and flush at a time, from a coroutine...
                await write_and_flush(m, 100, b"hello")
                # ...several at once (each in a thread of the default executor)...
                await asyncio.gather(
                    *(write_and_flush(m, i * 65_536, os.urandom(512)) for i in range(4))
                )
                # ...or many ranges in one call (to_thread passes keywords on).
                ranges = [(i * 4_096, 16) for i in range(0, 256, 8)]
                for offset, size in ranges:
                    m[offset : offset + size] = b"x" * size
                calls = await asyncio.to_thread(
                    msyncext.flush_ranges, m, ranges, flags=msyncext.MS_SYNC
                )
        plural = "s" * (calls != 1)
        print(
            f"flushed 5 writes, then {len(ranges)} ranges in {calls} msync call{plural}"
        )


if __name__ == "__main__":
    asyncio.run(main())
