"""Make a new file written through a map durable: its data, size and name.

1. msyncext.flush (MS_SYNC) writes the map's data back to the file. POSIX
   leaves it unspecified when a store through a map reaches the file
   otherwise, so do this first even though Linux's fsync would write it too.
2. os.fsync(fd) for the size and the other metadata. POSIX does not promise
   that msync writes them. (On Linux, the project's power-cut tests found the
   grown size kept after MS_SYNC alone on ext4, XFS and btrfs: behaviour of
   those file systems, not a promise.)
3. os.fsync of the directory, opened read-only, so that the file's name (the
   directory entry) survives a power cut; without it the whole file can
   vanish. To replace an existing file instead, write a temporary file this
   way, os.replace() it over the old one, then fsync the directory again.

On macOS neither msync nor fsync flushes the drive's own cache;
fcntl F_FULLFSYNC does.
"""

from __future__ import annotations

import mmap
import os
import sys
import tempfile
from pathlib import Path

import msyncext

if sys.platform == "darwin":
    import fcntl


def create_durably(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.ftruncate(fd, len(data))  # a map cannot grow a file: size it first
        with mmap.mmap(fd, len(data)) as m:
            m[:] = data
            msyncext.flush(m)  # 1. the data
        os.fsync(fd)  # 2. the size and metadata
        if sys.platform == "darwin":
            fcntl.fcntl(fd, fcntl.F_FULLFSYNC)  # the drive's cache too
    finally:
        os.close(fd)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # 3. the directory entry
    finally:
        os.close(dir_fd)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "snapshot.bin"
        data = os.urandom(3 * msyncext.PAGESIZE + 100)
        create_durably(path, data)
        assert path.read_bytes() == data
        print(f"{path.name}: {len(data)} bytes; data, size and directory entry synced")


if __name__ == "__main__":
    main()
