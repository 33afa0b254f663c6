"""Write a file through a map so that it survives a power cut whole, or not at all.

Never write under the final name: a failure part way (a full disk, a
failed write-back, a crash) would leave a file of zeros or half the data
there, and a retry would find it. Instead:

1. Create a temporary file in the same directory (os.replace cannot cross
   file systems) and reserve its blocks with os.posix_fallocate: a store
   into an unreserved hole on a full file system kills the process with
   SIGBUS, where posix_fallocate raises OSError (ENOSPC). Map it, copy.
2. msyncext.flush (MS_SYNC) writes the data back. POSIX leaves it
   unspecified when a store through a map reaches the file otherwise.
3. os.fsync(fd) for the size and the other metadata, which POSIX does not
   promise that msync writes. (The project's power-cut tests found the
   grown size kept after MS_SYNC alone on ext4, XFS and btrfs: behaviour of
   those file systems, not a promise.) On macOS neither msync nor fsync
   flushes the drive's own cache; fcntl F_FULLFSYNC does.
4. os.replace() it onto the final name, atomically: a reader sees the old
   file or the new one, never a mix.
5. os.fsync the directory, so that the new name survives a power cut.

If anything fails before step 4 the temporary file is removed and the error
raised: the final name holds what it held before (or nothing), and calling
again is a clean retry. mmap refuses a length of 0, so empty data is
written without a map.
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


def reserve(fd: int, size: int) -> None:
    """Allocate the file's first ``size`` bytes; OSError (ENOSPC) if full."""
    if hasattr(os, "posix_fallocate"):
        os.posix_fallocate(fd, 0, size)
        return
    # macOS has no posix_fallocate: writing zeros allocates the blocks.
    with open(fd, "r+b", closefd=False) as f:
        zeros = bytes(1 << 20)
        for offset in range(0, size, len(zeros)):
            f.write(zeros[: size - offset])


def write_durably(path: Path, data: bytes) -> None:
    # mkstemp: a new name (O_EXCL), readable by its owner only; os.fchmod
    # the descriptor if others must read the file.
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        try:
            write_and_sync(fd, data)
        finally:
            os.close(fd)
        os.replace(name, path)  # 4.
    except BaseException:
        os.unlink(name)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # 5. the directory entry
    finally:
        os.close(dir_fd)


def write_and_sync(fd: int, data: bytes) -> None:
    """Steps 1 to 3, into the new file ``fd``."""
    if data:
        reserve(fd, len(data))  # 1.
        with mmap.mmap(fd, len(data)) as m:
            m[:] = data
            try:
                msyncext.flush(m)  # 2. the data
            except msyncext.WritebackError:
                # This file is given up (a retry writes a new one): forget
                # its failure, and with it msyncext's hold on its inode.
                msyncext.clear_writeback_error(m)
                raise
    os.fsync(fd)  # 3. the size and metadata
    if sys.platform == "darwin":
        fcntl.fcntl(fd, fcntl.F_FULLFSYNC)  # the drive's cache too


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "snapshot.bin"
        data = os.urandom(3 * msyncext.PAGESIZE + 100)
        write_durably(path, data)
        assert path.read_bytes() == data
        write_durably(path, b"")  # replaces it, atomically, with an empty file
        assert path.read_bytes() == b""
        assert os.listdir(tmp) == ["snapshot.bin"]
        print(
            f"{path.name}: {len(data)} bytes, then empty; data, size and "
            "directory entry synced each time"
        )


if __name__ == "__main__":
    main()
