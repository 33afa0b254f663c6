"""An append-only log with group commit, and what to do when write-back fails.

Records go into a mapped file created at its full size. A group of them is
made durable with one flush_ranges call over their bytes; only then is the
header (the committed length) updated and flushed, so that after a power
cut the header never points at records that did not reach the disk.
Acknowledge a record only after commit() has returned.

msyncext.WritebackError means the kernel could not write some pages and has
dropped them: anything written since the last successful flush may be
lost, and the kernel reports that only once, so a second flush would
"succeed" without writing it. Stop acknowledging, rewrite the unacknowledged
records from the application's own copy, call
msyncext.clear_writeback_error(map), then flush again; if that fails too,
let the error stop the writer. Never just retry the flush.
"""

from __future__ import annotations

import errno
import mmap
import os
import struct
import tempfile
from pathlib import Path

import msyncext

HEADER = struct.Struct("<Q")  # bytes 0..7: where the committed records end
LENGTH = struct.Struct("<I")  # each record: its length, then its bytes


class Log:
    def __init__(self, path: Path, capacity: int) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.ftruncate(fd, capacity)
            os.fsync(fd)  # the size; then the directory entry (new_file_durable.py)
            self.map = mmap.mmap(fd, capacity)
        finally:
            os.close(fd)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self.end = HEADER.size
        HEADER.pack_into(self.map, 0, self.end)
        # Our own copy of every record not yet acknowledged: (offset, bytes).
        self.pending: list[tuple[int, bytes]] = []

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


class DemoLog(Log):
    """For the demo: the next flush fails once, as on a failing disk."""

    fail_next = False

    def _sync(self) -> None:
        if self.fail_next:
            self.fail_next = False
            raise msyncext.WritebackError(errno.EIO, os.strerror(errno.EIO))
        super()._sync()


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
        log = DemoLog(path, capacity=1 << 20)
        acknowledged = 0
        for group in range(3):
            for i in range(4):
                log.append(f"group {group} event {i}".encode())
            log.fail_next = group == 1
            acknowledged += log.commit()
        log.close()
        records = read_committed(path)
        assert len(records) == acknowledged
        print(
            f"{acknowledged} records acknowledged in 3 group commits "
            f"(one group rewritten after a write-back failure); "
            f"{len(records)} read back"
        )


if __name__ == "__main__":
    main()
