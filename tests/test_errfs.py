"""Tests of errfs, the FUSE file system whose writes fail with a chosen errno.

What msync(2) reports on it, observed here (Linux 6.18, libfuse 3.14):

- The errno of a failed write-back is the daemon's, unchanged, whatever it
  is: every errno below came back from msync(MS_SYNC) as answered.
- It is reported once per open file description (the file's errseq): the
  failed pages are clean afterwards, the next msync returns 0 while the
  writes still fail, and the data never reaches the backing file.
- msync(MS_SYNC) on a shared file mapping always calls fsync on the range,
  dirty or not: FUSE writes the dirty pages back and, if that went well,
  sends FSYNC (datasync=1) to the daemon. After a failed write-back it
  returns that error without sending FSYNC. So the daemon's FSYNC answer
  matters even for a clean page: msync of a clean page fails while FSYNC
  is armed, and returns 0 while only WRITE is. The kernel does not record
  an FSYNC error: every msync reports it again, and the data was written.
  ENOSYS to FSYNC is taken as "no fsync here" for the rest of the mount
  (msync then returns 0 and FSYNC is never sent again): ErrFS refuses it.

Everything that touches the mount runs in a child process
(ErrFS.run_isolated, bounded in time, which aborts the FUSE connection if
the child hangs in the kernel); the children are the ``child_*`` functions
of this module, which they import by path. pytest's faulthandler_timeout
covers the parent, which only reads the backing directory.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from errfs import Control, ErrFS, errfs, errfs_unavailable, parse, parse_control

PAGE = mmap.PAGESIZE
MS_SYNC = 4  # Linux's value (the mmap module does not export it)
CHILD_TIMEOUT = 60.0

# Errnos a failed write-back can carry: EIO, ENOSPC, EINVAL, ENOMEM and EBUSY
# are block-layer statuses, EDQUOT and EROFS file-system ones; a FUSE daemon
# (or a network file system) can answer any errno, as the rest show.
ERRNOS = (
    "EIO",
    "ENOSPC",
    "EINVAL",
    "ENOMEM",
    "EBUSY",
    "EDQUOT",
    "EROFS",
    "EINTR",
    "EFBIG",
    "EAGAIN",
    "EPERM",
    "ENODEV",
)

needs_errfs = pytest.mark.skipif(
    errfs_unavailable() is not None, reason=errfs_unavailable() or ""
)


@pytest.fixture
def fs(tmp_path: Path) -> Iterator[ErrFS]:
    with errfs(tmp_path / "errfs") as mounted:
        yield mounted


def _run(fs: ErrFS, function: str, *args: str, timeout: float = CHILD_TIMEOUT) -> None:
    fs.run_isolated("test_errfs", function, str(fs.directory), *args, timeout=timeout)


# --------------------------------------------------------------------------
# Helpers for the children


def msync(m: mmap.mmap, offset: int, length: int, flags: int = MS_SYNC) -> int:
    """libc msync over bytes [offset, offset + length) of ``m``: 0 or the errno."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.msync.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    anchor = ctypes.c_char.from_buffer(m)
    address = ctypes.addressof(anchor) + offset  # page-aligned: a map starts so
    del anchor  # the map can be closed again
    if libc.msync(ctypes.c_void_p(address), ctypes.c_size_t(length), flags) == 0:
        return 0
    return ctypes.get_errno()


def _code(name: str) -> tuple[int, str]:
    """The errno called ``name``, and the name the daemon's log gives it."""
    value = getattr(errno, name)
    return value, errno.errorcode[value]


def _map(fs: ErrFS, name: str, npages: int = 4) -> tuple[int, mmap.mmap, Path]:
    """A shared map of a new file on the mount, written back and clean.
    Returns (fd, map, the backing file's path)."""
    fd = os.open(fs.mountpoint / name, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    os.ftruncate(fd, npages * PAGE)
    os.fsync(fd)
    m = mmap.mmap(fd, npages * PAGE)
    # No readahead: each fault caches one page in a folio of its own, so
    # write-back works page by page (as in conftest.py).
    m.madvise(mmap.MADV_RANDOM)
    return fd, m, fs.backing / name


def _backing(path: Path, page: int, length: int = 8) -> bytes:
    with path.open("rb") as f:
        return os.pread(f.fileno(), length, page * PAGE)


class _Requests:
    """The daemon's requests for one file, step by step."""

    def __init__(self, fs: ErrFS, path: str) -> None:
        self.fs = fs
        self.path = path
        self.seen = len(fs.events())

    def since(self) -> list[tuple[str, str]]:
        """(operation, answer) of the WRITE and FSYNC requests since the last
        call."""
        events = self.fs.events()
        new, self.seen = events[self.seen :], len(events)
        return [
            (e.op, e.answer) for e in new if e.path == self.path and e.op != "flush"
        ]


def _close(fd: int, m: mmap.mmap) -> None:
    m.close()
    os.close(fd)


# --------------------------------------------------------------------------
# The children


def child_passthrough(directory: str) -> None:
    fs = ErrFS(Path(directory))
    root = fs.mountpoint
    (root / "a.txt").write_bytes(b"hello")
    assert (fs.backing / "a.txt").read_bytes() == b"hello"
    assert (root / "a.txt").read_bytes() == b"hello"
    (fs.backing / "b.txt").write_bytes(b"from below")
    assert (root / "b.txt").read_bytes() == b"from below"
    assert sorted(os.listdir(root)) == ["a.txt", "b.txt"]
    assert os.stat(root / "b.txt").st_size == 10
    assert os.statvfs(root).f_bsize > 0

    os.truncate(root / "a.txt", 2)
    with (root / "a.txt").open("r+b") as f:
        f.seek(8)
        f.write(b"!")
        f.flush()
        os.fsync(f.fileno())
        os.ftruncate(f.fileno(), 12)
    assert (fs.backing / "a.txt").read_bytes() == b"he" + bytes(6) + b"!" + bytes(3)

    os.mkdir(root / "d")
    os.rename(root / "b.txt", root / "d" / "c.txt")
    assert (fs.backing / "d" / "c.txt").read_bytes() == b"from below"
    os.unlink(root / "d" / "c.txt")
    os.rmdir(root / "d")
    os.unlink(root / "a.txt")
    assert os.listdir(fs.backing) == []

    # Through a shared map: msync writes the page to the backing file.
    fd, m, backing = _map(fs, "mapped.bin")
    m[PAGE : PAGE + 6] = b"mapped"
    assert msync(m, PAGE, PAGE) == 0
    assert _backing(backing, 1, 6) == b"mapped"

    # write(2) is write-through (no writeback cache): it fails at once while
    # writes are armed, and nothing reaches the backing file.
    fs.fail_writes("EIO")
    with pytest.raises(OSError, match="Input/output error") as info:
        os.pwrite(fd, b"nope", 0)
    assert info.value.errno == errno.EIO
    fs.heal()
    assert _backing(backing, 0, 4) == bytes(4)
    os.pwrite(fd, b"yes!", 0)
    assert _backing(backing, 0, 4) == b"yes!"
    _close(fd, m)


def child_write_back_fails(directory: str, name: str) -> None:
    """A failed write-back: msync says the daemon's errno once, then 0."""
    fs = ErrFS(Path(directory))
    err, logged = _code(name)
    fd, m, backing = _map(fs, "data.bin")
    requests = _Requests(fs, "/data.bin")
    # Armed before the page is dirtied: then even a write-back the kernel
    # starts on its own (other dirty data on the machine) fails.
    fs.fail_writes(name, fsync=False)
    m[0:4] = b"lost"

    assert msync(m, 0, PAGE) == err
    # The WRITE failed; the kernel returned its error without an FSYNC.
    assert requests.since() == [("write", logged)]
    # Once per open file: the failed page is clean now, the retry writes
    # nothing and returns 0 although the writes still fail.
    assert msync(m, 0, PAGE) == 0
    assert requests.since() == [("fsync", "ok")]
    assert _backing(backing, 0, 4) == bytes(4), "the lost write reached the file"
    # A clean page while only WRITE fails: FSYNC is sent and answers 0.
    assert msync(m, 2 * PAGE, PAGE) == 0
    assert requests.since() == [("fsync", "ok")]

    fs.heal()
    m[PAGE : PAGE + 4] = b"kept"
    assert msync(m, PAGE, PAGE) == 0
    assert requests.since() == [("write", "ok"), ("fsync", "ok")]
    assert _backing(backing, 1, 4) == b"kept"
    assert _backing(backing, 0, 4) == bytes(4), "page 0 was clean, never rewritten"
    _close(fd, m)


def child_write_and_fsync_fail(directory: str, name: str) -> None:
    """WRITE and FSYNC both fail (fail_writes' default)."""
    fs = ErrFS(Path(directory))
    err, logged = _code(name)
    fd, m, backing = _map(fs, "data.bin")
    requests = _Requests(fs, "/data.bin")
    fs.fail_writes(name)
    m[0:4] = b"lost"

    assert msync(m, 0, PAGE) == err
    assert requests.since() == [("write", logged)]
    # The retry has nothing to write, but its FSYNC fails: the same errno.
    assert msync(m, 0, PAGE) == err
    assert requests.since() == [("fsync", logged)]
    # So does msync of a page that was never dirty.
    assert msync(m, 2 * PAGE, PAGE) == err
    assert requests.since() == [("fsync", logged)]

    fs.heal()
    assert msync(m, 0, PAGE) == 0
    assert _backing(backing, 0, 4) == bytes(4)
    m[PAGE : PAGE + 4] = b"kept"
    assert msync(m, PAGE, PAGE) == 0
    assert _backing(backing, 1, 4) == b"kept"
    _close(fd, m)


def child_fsync_fails(directory: str, name: str) -> None:
    """Only FSYNC fails: the data lands, and every msync reports the errno."""
    fs = ErrFS(Path(directory))
    err, logged = _code(name)
    fd, m, backing = _map(fs, "data.bin")
    requests = _Requests(fs, "/data.bin")
    fs.fail_fsync(name)
    m[0:4] = b"sent"

    assert msync(m, 0, PAGE) == err
    assert requests.since() == [("write", "ok"), ("fsync", logged)]
    assert _backing(backing, 0, 4) == b"sent"
    # Not recorded by the kernel: each msync asks the daemon again.
    for _ in range(3):
        assert msync(m, 0, PAGE) == err
    assert requests.since() == [("fsync", logged)] * 3

    fs.heal()
    assert msync(m, 0, PAGE) == 0
    _close(fd, m)


def child_hang(directory: str, daemon_pid: str) -> None:
    """Dirty a page, stop the daemon, msync: waits for write-back forever."""
    fs = ErrFS(Path(directory))
    fd, m, _ = _map(fs, "data.bin")
    m[0:4] = b"hang"
    os.kill(int(daemon_pid), signal.SIGSTOP)
    print("msync", flush=True)
    msync(m, 0, PAGE)
    _close(fd, m)


def child_once_and_slow(directory: str, delay: str) -> None:
    """``once``: one failed WRITE, then the daemon heals itself; ``delay``:
    an msync that waits that long for the daemon, and succeeds."""
    fs = ErrFS(Path(directory))
    fd, m, backing = _map(fs, "data.bin")
    requests = _Requests(fs, "/data.bin")
    fs.fail_writes("EIO", fsync=False, once=True)
    m[0:4] = b"lost"
    assert msync(m, 0, PAGE) == errno.EIO
    assert requests.since() == [("write", "EIO")]
    assert parse(fs.control.read_text()) == Control({}, False, {})
    m[0:4] = b"kept"  # rewritten: dirty again, and written this time
    assert msync(m, 0, PAGE) == 0
    assert requests.since() == [("write", "ok"), ("fsync", "ok")]
    assert _backing(backing, 0, 4) == b"kept"

    fs.slow(float(delay), write=False)
    m[PAGE : PAGE + 4] = b"slow"
    started = time.monotonic()
    assert msync(m, PAGE, PAGE) == 0
    assert time.monotonic() - started >= float(delay)
    assert requests.since() == [("write", "ok"), ("fsync", "ok")]
    assert _backing(backing, 1, 4) == b"slow"
    fs.heal()
    _close(fd, m)


# --------------------------------------------------------------------------
# The tests


@needs_errfs
def test_passthrough(fs: ErrFS) -> None:
    _run(fs, "child_passthrough")


@needs_errfs
@pytest.mark.parametrize("name", ERRNOS)
def test_msync_reports_the_write_back_errno_once(fs: ErrFS, name: str) -> None:
    _run(fs, "child_write_back_fails", name)
    # The parent sees the daemon's log too: the WRITE of page 0 failed.
    assert any(
        event[:2] == ("write", "/data.bin")
        and event.detail.startswith("offset=0 ")
        and event.answer == _code(name)[1]
        for event in fs.events()
    ), fs.events()


@needs_errfs
@pytest.mark.parametrize("name", ["EIO", "ENOSPC", "EINVAL", "EDQUOT"])
def test_failing_fsync_fails_msync_of_clean_pages(fs: ErrFS, name: str) -> None:
    _run(fs, "child_write_and_fsync_fail", name)


@needs_errfs
@pytest.mark.parametrize("name", ["EIO", "ENOSPC", "EINVAL"])
def test_fsync_errors_are_not_recorded(fs: ErrFS, name: str) -> None:
    _run(fs, "child_fsync_fails", name)


def _start_up_seconds() -> float:
    """How long a child takes to start and import this module."""
    started = time.monotonic()
    tests = str(Path(__file__).parent)
    code = f"import sys; sys.path.insert(0, {tests!r}); import test_errfs"
    subprocess.run(
        [sys.executable, "-I", "-c", code],
        capture_output=True,
        timeout=CHILD_TIMEOUT,
        check=True,
    )
    return time.monotonic() - started


@needs_errfs
def test_a_failure_once_and_a_slow_answer(fs: ErrFS) -> None:
    _run(fs, "child_once_and_slow", "0.5")


@needs_errfs
def test_a_hung_daemon_is_cleaned_up(tmp_path: Path) -> None:
    """A child stuck in msync (the daemon stopped) survives SIGKILL; aborting
    the connection frees it, and errfs() still unmounts and ends the daemon."""
    # The child must be in msync when its time is up: 3 s, plus twice what
    # starting one takes (well under a second natively, seconds under QEMU).
    hang = 3 + 2 * _start_up_seconds()
    started = time.monotonic()
    with errfs(tmp_path / "errfs") as fs:
        assert fs.daemon_pid is not None
        assert fs.connection is not None
        with pytest.raises(
            AssertionError, match=r"survived SIGKILL.*connection aborted"
        ) as info:
            _run(fs, "child_hang", str(fs.daemon_pid), timeout=hang)
        assert "msync" in str(info.value)
        mountpoint, daemon = fs.mountpoint, fs.daemon_pid
    assert not fs.mounted()
    with pytest.raises(ProcessLookupError):
        os.kill(daemon, 0)
    assert not os.path.ismount(mountpoint)
    assert time.monotonic() - started < 60


# Without a mount


def test_control_file_syntax() -> None:
    assert parse_control("") == {}
    assert parse_control(" \n") == {}
    assert parse_control("EINVAL\n") == {"write": errno.EINVAL, "fsync": errno.EINVAL}
    assert parse_control("ENOSPC write") == {"write": errno.ENOSPC}
    assert parse_control("EDQUOT fsync") == {"fsync": errno.EDQUOT}
    assert parse_control("5 write fsync") == {"write": 5, "fsync": 5}
    for bad in ("ENOPE", "0", "512"):
        with pytest.raises(ValueError, match="not an errno name"):
            parse_control(bad)
    with pytest.raises(ValueError, match="unknown operation 'read'"):
        parse_control("EIO read")
    # A transient failure, and a slow device, alone or together.
    assert parse("EIO write once") == Control({"write": errno.EIO}, True, {})
    assert parse("delay 0.25") == Control({}, False, {"write": 0.25, "fsync": 0.25})
    assert parse("ENOSPC fsync\ndelay 2 write\n") == Control(
        {"fsync": errno.ENOSPC}, False, {"write": 2.0}
    )
    assert parse_control("delay 1 fsync\nEIO write") == {"write": errno.EIO}
    for bad in ("delay", "delay soon", "delay -1", "delay 31", "delay 1 read"):
        with pytest.raises(ValueError, match=r"delay|unknown operation"):
            parse(bad)


def test_arming_writes_the_control_file(tmp_path: Path) -> None:
    fs = ErrFS(tmp_path)
    fs.fail_writes("EROFS")
    assert parse_control(fs.control.read_text()) == {
        "write": errno.EROFS,
        "fsync": errno.EROFS,
    }
    fs.fail_writes("EBUSY", fsync=False)
    assert parse_control(fs.control.read_text()) == {"write": errno.EBUSY}
    fs.fail_fsync("EIO")
    assert parse_control(fs.control.read_text()) == {"fsync": errno.EIO}
    fs.fail_writes("EIO", fsync=False, once=True)
    assert parse(fs.control.read_text()) == Control({"write": errno.EIO}, True, {})
    fs.fail_writes("ENOSPC", fsync=False, delay=0.5)
    assert parse(fs.control.read_text()) == Control(
        {"write": errno.ENOSPC}, False, {"write": 0.5}
    )
    fs.slow(0.5, write=False)
    assert parse(fs.control.read_text()) == Control({}, False, {"fsync": 0.5})
    with pytest.raises(ValueError, match="write or fsync"):
        fs.slow(1, write=False, fsync=False)
    # ENOSYS would switch FSYNC off for the rest of the mount.
    with pytest.raises(ValueError, match="ENOSYS"):
        fs.fail_fsync("ENOSYS")
    with pytest.raises(ValueError, match="ENOSYS"):
        fs.fail_writes("ENOSYS")
    fs.fail_writes("ENOSYS", fsync=False)
    with pytest.raises(ValueError, match="not an errno name: 'EWHATEVER'"):
        fs.fail_writes("EWHATEVER")
    fs.heal()
    assert parse_control(fs.control.read_text()) == {}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["control"]


def test_mounting_needs_to_be_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MSYNCEXT_TEST_MOUNTS", raising=False)
    errfs_unavailable.cache_clear()
    try:
        reason = errfs_unavailable()
    finally:
        errfs_unavailable.cache_clear()
    assert reason is not None
    if os.uname().sysname == "Linux":
        assert "set MSYNCEXT_TEST_MOUNTS=1 to run tests that mount" in reason
