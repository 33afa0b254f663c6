"""An append-only log with group commit, and what to do when write-back fails.

Reserve the file's blocks before mapping it. A map cannot grow a file, so
the log is made at its full size; made with ftruncate it is sparse, and a
store into a hole needs a block at that moment: on a full file system there
is none, and the kernel kills the process with SIGBUS, which Python cannot
catch, so no error handling runs. os.posix_fallocate reserves every block
up front and fails cleanly with OSError (ENOSPC) instead. (On copy-on-write
file systems, btrfs or ZFS, overwriting a reserved block can still need a
new one: there a reservation makes SIGBUS rarer, not impossible.)

Records go into the map. A group of them is made durable with one
flush_ranges call over their bytes; only then is the header (the committed
length) updated and flushed, so that after a power cut the header never
counts records that did not reach the disk. Acknowledge a record only after
commit() has returned.

msyncext.WritebackError means the kernel could not write some pages and has
dropped them: anything written since the last successful flush may be
lost, and the kernel reports that only once, so a second flush would
"succeed" without writing it. Never just retry the flush: rewrite the
unacknowledged records from the application's own copy, call
msyncext.clear_writeback_error(map), then flush again. If that fails too,
let the error stop the writer. Once the storage is repaired, Log.open()
the file in a new process: it holds exactly the acknowledged records, and
appends go after them. (In the failed process, msyncext refuses every
flush of that file until clear_writeback_error is called for it.)
"""

from __future__ import annotations

import mmap
import os
import struct
import tempfile
from pathlib import Path

import msyncext

HEADER = struct.Struct("<Q")  # bytes 0..7: where the committed records end
LENGTH = struct.Struct("<I")  # each record: its length, then its bytes


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


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Log:
    def __init__(self, m: mmap.mmap) -> None:
        """The log in ``m``; use Log.create() or Log.open()."""
        self.map = m
        (self.end,) = HEADER.unpack_from(m)
        if not HEADER.size <= self.end <= len(m):
            raise ValueError(f"not a log: its header says {self.end}")
        # Our own copy of every record not yet acknowledged: (offset, bytes).
        self.pending: list[tuple[int, bytes]] = []

    @classmethod
    def create(cls, path: Path, capacity: int) -> Log:
        """A new, empty log of ``capacity`` bytes, its blocks reserved."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            reserve(fd, capacity)  # ENOSPC now, rather than SIGBUS later
            m = mmap.mmap(fd, capacity)
            HEADER.pack_into(m, 0, HEADER.size)
            msyncext.flush(m, 0, HEADER.size)
            os.fsync(fd)  # the size and the allocation
        except BaseException:
            os.unlink(path)  # nothing is left half made
            raise
        finally:
            os.close(fd)
        fsync_directory(path.parent)  # the new name (new_file_durable.py)
        return cls(m)

    @classmethod
    def open(cls, path: Path) -> Log:
        """An existing log, after a crash or a stop: what its header counts."""
        with path.open("r+b") as f:
            return cls(mmap.mmap(f.fileno(), 0))

    def append(self, payload: bytes) -> None:
        record = LENGTH.pack(len(payload)) + payload
        if self.end + len(record) > len(self.map):
            raise ValueError("the log is full")
        self.map[self.end : self.end + len(record)] = record
        self.pending.append((self.end, record))
        self.end += len(record)

    def commit(self) -> int:
        """Make the pending records durable; return how many to acknowledge."""
        try:
            self._sync()
        except msyncext.WritebackError:
            for offset, record in self.pending:  # rewrite them from our copy
                self.map[offset : offset + len(record)] = record
            msyncext.clear_writeback_error(self.map)
            self._sync()  # a second failure propagates: stop writing
        acknowledged = len(self.pending)
        self.pending.clear()
        return acknowledged

    def _sync(self) -> None:
        # Two calls, in this order: the records, then the header that counts them.
        ranges = [(offset, len(record)) for offset, record in self.pending]
        msyncext.flush_ranges(self.map, ranges)
        HEADER.pack_into(self.map, 0, self.end)
        msyncext.flush(self.map, 0, HEADER.size)

    def close(self) -> None:
        self.map.close()


def read_committed(path: Path) -> list[bytes]:
    """The records the header counts, as a reader after a crash sees them."""
    data = path.read_bytes()
    (end,) = HEADER.unpack_from(data)
    records, offset = [], HEADER.size
    while offset < end:
        (size,) = LENGTH.unpack_from(data, offset)
        offset += LENGTH.size
        records.append(data[offset : offset + size])
        offset += size
    return records


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "events.log"
        log = Log.create(path, capacity=1 << 20)
        acknowledged: list[bytes] = []
        for group in range(3):
            records = [f"group {group} event {i}".encode() for i in range(4)]
            for record in records:
                log.append(record)
            log.commit()
            acknowledged += records  # now tell the clients
        log.append(b"never committed")  # a crash here: nobody was told
        log.close()

        log = Log.open(path)  # the restart
        log.append(b"after the restart")
        log.commit()
        acknowledged.append(b"after the restart")
        log.close()
        assert read_committed(path) == acknowledged
        print(
            f"{len(acknowledged)} records acknowledged in 4 group commits and "
            "read back; the uncommitted one is not counted"
        )


if __name__ == "__main__":
    main()
