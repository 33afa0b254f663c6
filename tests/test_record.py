"""The write-back record, tried adversarially: one test per point of issue 14.

Issue 14 lists ways in which the record of write-back failures (see
test_faults.py) breaks its promise: a flush that says success for data the
device never received (points 1, 2, 3 and 5), a forked child that hangs
(6), a healthy file refused because it looks like the failed one (7, 8), a
healthy flush stalled behind another thread's parse of /proc/self/maps (9),
and a ctypes view whose map can be closed under a flush (10). Each test
here is written from the issue's description of its point and names it.
(Points 4 and 11 are tested elsewhere.)

The failing device is test_faults' (ext4 on a loop device whose backing
file lives on a tmpfs far smaller than the filesystem), with ext4 made
without a journal: a journal aborts on the first failed write and leaves
the filesystem read-only, while these scenarios go on creating and mapping
files after the failure. Without a journal ext4 reports the loss once
(ENOSPC) and says 0 to every later msync: only the record stands between
the caller and a lying success.

The record is per process, so every scenario runs in a fresh ``python -I``
child (blockdev.run_isolated) and asserts there; the parent builds and
removes the devices whatever the child does. Tests that mount file systems
also need MSYNCEXT_TEST_MOUNTS=1 (and root).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import blockdev
import powercut
import pytest
import test_faults as faults

needs_loop = faults.needs_loop
needs_mounts = pytest.mark.skipif(
    os.environ.get("MSYNCEXT_TEST_MOUNTS") != "1",
    reason="set MSYNCEXT_TEST_MOUNTS=1 to run tests that mount file systems "
    "(needs root)",
)
linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"),
    reason="the scenarios use Linux facts (MAP_FIXED_NOREPLACE, /proc)",
)

PAGE = mmap.PAGESIZE
FILE_BYTES = faults.FILE_BYTES
MAP_FAILED = 2**64 - 1 if ctypes.sizeof(ctypes.c_void_p) == 8 else 2**32 - 1
HUNG_SECONDS = 20.0  # a forked child that has not exited by then is hung


@pytest.fixture
def failing_ext4() -> Iterator[blockdev.LoopFS]:
    """test_faults' failing device, ext4 without a journal: writable after
    the failure (a journal would abort and leave it read-only)."""
    with (
        blockdev.tmpfs("12m") as small,
        blockdev.loop_ext4(
            64,
            backing_dir=small,
            mount_options="errors=continue",
            mkfs_options=("-O", "^has_journal"),
        ) as fs,
    ):
        yield fs


def _run(function: str, *args: str, timeout: float = 180) -> str:
    done = blockdev.run_isolated("test_record", function, *args, timeout=timeout)
    print(done.stdout)
    return done.stdout


def _skip_if_the_child_did(out: str) -> None:
    """A child that found a scenario's precondition missing said so."""
    for line in out.splitlines():
        if line.startswith("skip: "):
            pytest.skip(line[len("skip: ") :])


# --------------------------------------------------------------------------
# Helpers for the children


def _libc() -> ctypes.CDLL:
    libc = faults._libc()
    libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return libc


def _outcome(call: Callable[[], object]) -> str:
    """What a call did, as text: ``ok``, or the exception's type (and errno
    name), so that one assertion can show every step of a scenario."""
    try:
        call()
    except OSError as exc:
        name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        return f"{type(exc).__name__}({name})"
    except Exception as exc:
        return type(exc).__name__
    return "ok"


def _refused(first: int) -> str:
    return f"WritebackError({errno.errorcode[first]})"


@contextlib.contextmanager
def _fixed_map(
    address: int, length: int, fd: int = -1, *, shared: bool = True
) -> Iterator[memoryview]:
    """A map of ``fd`` (anonymous if -1) at exactly ``address``
    (MAP_FIXED_NOREPLACE: never over an existing mapping), as a writable
    memoryview; unmapped on leaving."""
    libc = _libc()
    flags = (mmap.MAP_SHARED if shared else mmap.MAP_PRIVATE) | (
        faults.MAP_FIXED_NOREPLACE
    )
    if fd < 0:
        flags |= mmap.MAP_ANONYMOUS
    got = libc.mmap(address, length, mmap.PROT_READ | mmap.PROT_WRITE, flags, fd, 0)
    if got != address:
        if got not in (None, MAP_FAILED):
            libc.munmap(got, length)  # an old kernel took it as a hint
        raise OSError(
            ctypes.get_errno(),
            f"no map at {address:#x}: {os.strerror(ctypes.get_errno())}",
        )
    buf = memoryview((ctypes.c_char * length).from_address(got)).cast("B")
    try:
        yield buf
    finally:
        buf.release()
        libc.munmap(got, length)


def _reaches_msync(buf: Any, address: int) -> str:
    """Outcome of a flush with MS_INVALIDATE over the first page of ``buf``
    (at ``address``), mlocked: msync itself says EBUSY, so a plain
    ``OSError(EBUSY)`` proves the flush reached msync, and a
    WritebackError that it was refused before."""
    import msyncext

    libc = _libc()
    assert libc.mlock(address, PAGE) == 0, os.strerror(ctypes.get_errno())
    try:
        return _outcome(
            lambda: msyncext.flush(
                buf, 0, 1, flags=msyncext.MS_SYNC | msyncext.MS_INVALIDATE
            )
        )
    finally:
        libc.munlock(address, PAGE)


def _new_file(path: str, size: int) -> int:
    """A new sparse file of ``size`` bytes (its pages stay clean)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.ftruncate(fd, size)
    return fd


def _crowd(count: int) -> tuple[int, int]:
    """``count`` distinct mappings (VMAs) in this process: one anonymous
    region of ``count`` pages, every other page read-only so that
    neighbours cannot merge. Returns (address, length) for munmap."""
    libc = _libc()
    length = count * PAGE
    base = libc.mmap(
        None,
        length,
        mmap.PROT_READ | mmap.PROT_WRITE,
        mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
        -1,
        0,
    )
    assert base not in (None, MAP_FAILED), os.strerror(ctypes.get_errno())
    for page in range(1, count, 2):
        if libc.mprotect(base + page * PAGE, PAGE, mmap.PROT_READ) != 0:
            raise OSError(ctypes.get_errno(), "mprotect")
    with open("/proc/self/maps") as f:
        lines = sum(1 for _ in f)
    assert lines >= count, f"only {lines} mappings"
    return base, length


class _Retrier:
    """A thread that flushes the failed map in a loop until stopped, each
    flush refused with WritebackError: the application that keeps retrying."""

    def __init__(self, call: Callable[[], object]) -> None:
        self.calls = 0
        self.unexpected: list[str] = []
        self._stop = threading.Event()
        self._call = call
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            outcome = _outcome(self._call)
            if not outcome.startswith("WritebackError("):
                self.unexpected.append(f"a retry of the failed map: {outcome}")
                return
            self.calls += 1

    def __enter__(self) -> _Retrier:
        self._thread.start()
        deadline = time.monotonic() + 30
        while self.calls < 2 and not self.unexpected:
            assert time.monotonic() < deadline, "the retrying thread is stuck"
            time.sleep(0.001)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)
        assert not self._thread.is_alive(), "the retrying thread hung"
        assert not self.unexpected, self.unexpected


# --------------------------------------------------------------------------
# Point 1: a resize that moves the map


def _resize_moves_the_map(path: str) -> None:
    import msyncext

    fd, m, _ = faults._dirty_file(path)
    first = faults._first_failure(m)
    address = faults._address(m)
    # Something right above the map's end, so that growing it in place is
    # impossible and mremap must move it (if that place is taken already,
    # so much the better).
    above = contextlib.ExitStack()
    with contextlib.suppress(OSError):
        above.enter_context(_fixed_map(address + len(m), 16 * PAGE, shared=False))
    with above:
        m.resize(len(m) + 16 * PAGE)
        moved = faults._address(m)
        assert moved != address, "mremap grew the map in place"
        print(f"moved from {address:#x} to {moved:#x}")
        outcomes = {
            "the moved map": _outcome(lambda: msyncext.flush(m)),
            "a range of it": _outcome(lambda: msyncext.flush(m, PAGE, 1)),
        }
    assert outcomes == dict.fromkeys(outcomes, _refused(first)), (
        f"after the failure, a flush of the same map moved by resize(): {outcomes}"
    )
    m.close()
    os.close(fd)


@needs_loop
@needs_mounts
def test_point1_a_map_moved_by_resize_is_still_refused(
    failing_ext4: blockdev.LoopFS,
) -> None:
    """Issue 14, point 1: after a WritebackError, resize() grows the map and
    mremap moves it to new addresses; its flush must still raise."""
    _run("_resize_moves_the_map", f"{failing_ext4.mountpoint}/big")


# --------------------------------------------------------------------------
# Point 2: a shrink, then a healthy map in the freed tail


def _shrink_then_a_map_in_the_tail(path: str, healthy_dir: str) -> None:
    import msyncext

    fd, m, _ = faults._dirty_file(path)
    first = faults._first_failure(m)
    address = faults._address(m)
    kept = FILE_BYTES // 2
    m.resize(kept)
    if faults._address(m) != address:
        # Linux shrinks in place; QEMU's user mode moves a map on every
        # mremap that may move it, and then no tail is freed.
        print(f"skip: a shrink moved the map ({address:#x} to {faults._address(m):#x})")
        m.close()
        os.close(fd)
        return
    hfd = _new_file(os.path.join(healthy_dir, "in-the-tail.bin"), 8 * PAGE)
    with _fixed_map(address + kept, 8 * PAGE, hfd) as healthy:
        healthy[PAGE] = 1
        healthy_outcome = _outcome(lambda: msyncext.flush(healthy))
    failed_outcome = _outcome(lambda: msyncext.flush(m))
    assert (healthy_outcome, failed_outcome) == ("ok", _refused(first)), (
        f"a healthy map in the freed tail flushed: {healthy_outcome}; then the "
        f"shrunk failed map flushed: {failed_outcome}"
    )
    m.close()
    os.close(fd)
    os.close(hfd)


@needs_loop
@needs_mounts
def test_point2_a_healthy_map_in_the_freed_tail_forgets_nothing(
    failing_ext4: blockdev.LoopFS, tmp_path: Path
) -> None:
    """Issue 14, point 2: after the failed map shrinks, a healthy file mapped
    in the freed addresses flushes, and the failed map stays refused."""
    out = _run(
        "_shrink_then_a_map_in_the_tail",
        f"{failing_ext4.mountpoint}/big",
        str(tmp_path),
    )
    _skip_if_the_child_did(out)


# --------------------------------------------------------------------------
# Point 3: no free descriptor at the moment of failure


def _no_free_descriptor(path: str) -> None:
    import msyncext

    fd, m, _ = faults._dirty_file(path)
    # A second map of the same file (and open file description, so the
    # kernel has told of the failure once for both), made before it.
    m2 = mmap.mmap(fd, 4 * PAGE)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = 64 if soft == resource.RLIM_INFINITY else min(soft, 64)
    assert len(os.listdir("/proc/self/fd")) < limit - 4
    fillers: list[int] = []
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        with contextlib.suppress(OSError):
            while len(fillers) < limit:
                fillers.append(os.open("/dev/null", os.O_RDONLY))
        with pytest.raises(OSError, match="Too many open files"):
            os.open("/dev/null", os.O_RDONLY)
        first = faults._first_failure(m)  # at the fd limit
    finally:
        for filler in fillers:
            os.close(filler)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    outcomes = {
        "the failed map": _outcome(lambda: msyncext.flush(m)),
        "the second map": _outcome(lambda: msyncext.flush(m2)),
    }
    assert outcomes == dict.fromkeys(outcomes, _refused(first)), (
        f"after a failure seen with no free descriptor: {outcomes}"
    )
    m2.close()
    m.close()
    os.close(fd)


@needs_loop
@needs_mounts
def test_point3_a_failure_at_the_descriptor_limit_covers_every_map(
    failing_ext4: blockdev.LoopFS,
) -> None:
    """Issue 14, point 3: the failure happens while the process has no free
    descriptor (EMFILE); a second map of the file made before it must still
    be refused afterwards."""
    _run("_no_free_descriptor", f"{failing_ext4.mountpoint}/big")


# --------------------------------------------------------------------------
# Point 5: a closed mmap subclass under an array


def _closed_subclass_under_an_array(directory: str) -> None:
    import numpy as np

    import msyncext

    class MyMap(mmap.mmap):
        pass

    size = 16 * PAGE
    fd = _new_file(os.path.join(directory, "subclass.bin"), size)
    mine = MyMap(fd, size)
    arr: Any = np.ndarray((size,), np.uint8, buffer=mine)
    assert arr.base is mine
    address = arr.__array_interface__["data"][0]
    arr[PAGE] = 1
    msyncext.flush(arr)  # open: flushes
    mine.close()  # numpy holds no export of it
    outcomes = {
        "closed": _outcome(lambda: msyncext.flush(arr)),
        "closed, flush_ranges": _outcome(lambda: msyncext.flush_ranges(arr, [(0, 1)])),
    }
    # Another file mapped where the closed map was: flushing the array now
    # would sync that file and say success.
    ofd = _new_file(os.path.join(directory, "other.bin"), size)
    with _fixed_map(address, size, ofd) as other:
        other[PAGE] = 2
        outcomes["another file at its addresses"] = _outcome(
            lambda: msyncext.flush(arr)
        )
        outcomes["another file, flush_ranges"] = _outcome(
            lambda: msyncext.flush_ranges(arr, [(PAGE, 1)])
        )
    assert outcomes == dict.fromkeys(outcomes, "ValueError"), (
        f"flush of an array over a closed mmap.mmap subclass: {outcomes}"
    )
    os.close(ofd)
    os.close(fd)


@linux_only
def test_point5_a_closed_mmap_subclass_under_an_array_is_refused(
    tmp_path: Path,
) -> None:
    """Issue 14, point 5: an array over a closed mmap.mmap SUBCLASS must be
    refused with ValueError, also once another file is mapped there."""
    pytest.importorskip("numpy")
    _run("_closed_subclass_under_an_array", str(tmp_path))


# --------------------------------------------------------------------------
# Point 6: fork while another thread is inside the record


FORKS = 20
CHILD_OK, CHILD_LOST_RECORD, CHILD_HEALTHY_FAILED, CHILD_ERROR = 0, 3, 4, 5


def _forked_child(healthy: mmap.mmap, failed: mmap.mmap) -> None:
    """In the child: one flush of a healthy map, then the failed map (which
    the child shares) must still be refused. Never returns."""
    import msyncext

    code = CHILD_ERROR
    try:
        if _outcome(lambda: msyncext.flush(healthy)) != "ok":
            code = CHILD_HEALTHY_FAILED
        else:
            failed_outcome = _outcome(lambda: msyncext.flush(failed))
            if failed_outcome.startswith("WritebackError("):
                code = CHILD_OK
            elif failed_outcome == "ok":
                code = CHILD_LOST_RECORD
    finally:
        os._exit(code)


def _fork_while_retrying(path: str, healthy_dir: str) -> None:
    import msyncext

    fd, m, _ = faults._dirty_file(path)
    hfd, healthy = faults._healthy_map(healthy_dir)
    faults._first_failure(m)
    # Many mappings, made after the failed map and so listed before it in
    # /proc/self/maps: a lookup of its address reads through them all, and a
    # thread retrying it spends most of its time inside the record.
    crowd, crowd_len = _crowd(20_000)
    exits: list[int] = []
    hung = None
    with _Retrier(lambda: msyncext.flush(m)) as retrier:
        for attempt in range(FORKS):
            with warnings.catch_warnings():
                # 3.12+: "This process is multi-threaded, use of fork() may
                # lead to deadlocks in the child": exactly the point.
                warnings.simplefilter("ignore", DeprecationWarning)
                pid = os.fork()
            if pid == 0:
                _forked_child(healthy, m)
            deadline = time.monotonic() + HUNG_SECONDS
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    exits.append(os.waitstatus_to_exitcode(status))
                    break
                if time.monotonic() > deadline:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    hung = attempt
                    break
                time.sleep(0.01)
            if hung is not None:
                break
        calls = retrier.calls
    print(f"forks {len(exits) + (hung is not None)}, retries {calls}, exits {exits}")
    assert hung is None, (
        f"forked child {hung} hung in its first msyncext call for "
        f"{HUNG_SECONDS:.0f} s (killed); children before it exited {exits}"
    )
    assert exits == [CHILD_OK] * FORKS, (
        f"exit codes of the forked children: {exits} ({CHILD_LOST_RECORD}: the "
        f"failed map flushed with success, {CHILD_HEALTHY_FAILED}: the healthy "
        f"flush failed, {CHILD_ERROR}: another error)"
    )
    _libc().munmap(crowd, crowd_len)
    healthy.close()
    m.close()
    os.close(hfd)
    os.close(fd)


@needs_loop
@needs_mounts
def test_point6_a_child_forked_during_a_retry_neither_hangs_nor_forgets(
    failing_ext4: blockdev.LoopFS, tmp_path: Path
) -> None:
    """Issue 14, point 6: after a failure, a thread retries the failed map
    while the main thread forks; each child's first msyncext call must
    return (no deadlock on the record's lock), and the child keeps the
    parent's record."""
    _run(
        "_fork_while_retrying",
        f"{failing_ext4.mountpoint}/big",
        str(tmp_path),
        timeout=FORKS * HUNG_SECONDS + 120,
    )


# --------------------------------------------------------------------------
# Point 7: a new file with the failed file's inode number


def _inode_reuse(directory: str) -> None:
    import msyncext

    path_a = os.path.join(directory, "a")
    fd, m, _ = faults._dirty_file(path_a)
    faults._first_failure(m)
    ino_a = os.fstat(fd).st_ino
    address = faults._address(m)
    # ext4 without a journal gives a deleted inode's number to a new file at
    # once only within the same second (later it waits a few seconds, see
    # recently_deleted() in fs/ext4/ialloc.c): start at a second's start.
    time.sleep(1 - time.time() % 1 + 0.01)
    second = int(time.time())
    m.close()
    os.close(fd)
    os.unlink(path_a)
    # The caller rewrites the lost data into a new file. Its pages stay
    # clean: the device is full, so dirty ones could fail for real.
    fdb = _new_file(os.path.join(directory, "b"), FILE_BYTES)
    ino_b = os.fstat(fdb).st_ino
    same_second = int(time.time()) == second
    print(
        f"A's inode {ino_a}, B's inode {ino_b}: "
        f"{'the same' if ino_a == ino_b else 'different'} "
        f"(within one second: {same_second})"
    )
    # Where the kernel would put it anyway: the addresses A's map had.
    with _fixed_map(address, FILE_BYTES, fdb) as b:
        outcomes = {
            "flush(B)": _outcome(lambda: msyncext.flush(b)),
            "flush(B), a range": _outcome(lambda: msyncext.flush(b, 5 * PAGE, 9)),
            "MS_INVALIDATE over B's mlocked page": _reaches_msync(b, address),
            "clear_writeback_error(B)": repr(msyncext.clear_writeback_error(b)),
        }
    expected = {
        "flush(B)": "ok",
        "flush(B), a range": "ok",
        "MS_INVALIDATE over B's mlocked page": "OSError(EBUSY)",
        "clear_writeback_error(B)": "None",
    }
    assert outcomes == expected, (
        f"a new file B after the failed file A (inode {ino_a}) was deleted, "
        f"B's inode {ino_b}, mapped at A's addresses: {outcomes}"
    )
    os.close(fdb)


@needs_loop
@needs_mounts
def test_point7_a_new_file_with_the_failed_files_inode_number_flushes(
    failing_ext4: blockdev.LoopFS,
) -> None:
    """Issue 14, point 7: the failed file A is deleted; a new file B in the
    same directory (possibly given A's inode number) mapped at A's old
    addresses must flush, really reaching msync."""
    _run("_inode_reuse", failing_ext4.mountpoint)


# --------------------------------------------------------------------------
# Point 8: btrfs subvolumes

BTRFS_MIB = 128  # mkfs.btrfs wants about 110 MiB at least
BTRFS_SPARE_MIB = 8  # what the tmpfs holds beyond the metadata: data fails


def _btrfs_metadata_extents(image: str) -> list[tuple[int, int]]:
    """(offset, length) on the device of every non-data chunk stripe."""
    tree = powercut.run("btrfs", "inspect-internal", "dump-tree", "-t", "chunk", image)
    extents = []
    for chunk in tree.split("CHUNK_ITEM")[1:]:
        length = re.search(r"\blength (\d+)", chunk)
        kind = re.search(r"\btype (\S+)", chunk)
        assert length, chunk
        assert kind, chunk
        if kind.group(1).startswith("DATA"):
            continue
        for offset in re.findall(r"stripe \d+ devid \d+ offset (\d+)", chunk):
            extents.append((int(offset), int(length.group(1))))
    assert extents, tree
    return extents


@contextlib.contextmanager
def _failing_btrfs() -> Iterator[str]:
    """A btrfs on a loop device whose DATA writes fail, with subvolumes
    sub_a and sub_b, each holding one file f; yields the mount point.

    The image lives on a tmpfs; the blocks of its system and metadata chunks
    are allocated there in advance (fallocate keeps their content), and the
    tmpfs is then given only BTRFS_SPARE_MIB beyond that. So the file data
    fills it and fails (ENOSPC), while metadata writes keep succeeding: the
    filesystem is not forced read-only, and a clean file flushes.
    """
    with contextlib.ExitStack() as stack:
        small = stack.enter_context(blockdev.tmpfs(f"{BTRFS_MIB + 16}m"))
        image = os.path.join(small, "device.img")
        with open(image, "xb") as f:
            f.truncate(BTRFS_MIB << 20)
        stack.callback(os.unlink, image)
        powercut.run("mkfs.btrfs", "-q", "-f", image)
        fd = os.open(image, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, 1 << 20)  # the superblock's neighbourhood
            for offset, length in _btrfs_metadata_extents(image):
                os.posix_fallocate(fd, offset, length)
        finally:
            os.close(fd)
        st = os.statvfs(small)
        used = (st.f_blocks - st.f_bfree) * st.f_frsize
        powercut.run(
            "mount", "-o", f"remount,size={used + (BTRFS_SPARE_MIB << 20)}", small
        )
        device = powercut.run("losetup", "--find", "--show", image).strip()
        stack.callback(
            subprocess.run, ["losetup", "-d", device], timeout=60, check=False
        )
        mountpoint = tempfile.mkdtemp(prefix="msyncext-btrfs-")
        stack.callback(os.rmdir, mountpoint)
        powercut.run("mount", "-t", "btrfs", device, mountpoint)
        stack.callback(powercut.unmount, mountpoint)
        for sub in ("sub_a", "sub_b"):
            try:
                powercut.run("btrfs", "subvolume", "create", f"{mountpoint}/{sub}")
            except RuntimeError as exc:
                # QEMU's user mode does not know btrfs's subvolume ioctl.
                if os.strerror(errno.ENOSYS) in str(exc):
                    pytest.skip(f"btrfs subvolume create: {os.strerror(errno.ENOSYS)}")
                raise
            # The first file of each subvolume: inode number 257 in both.
            with open(f"{mountpoint}/{sub}/f", "xb") as f:
                f.truncate(FILE_BYTES if sub == "sub_a" else 16 * PAGE)
        powercut.run("btrfs", "filesystem", "sync", mountpoint)
        yield mountpoint


def _maps_line(address: int) -> str:
    """The /proc/self/maps line of the mapping that covers ``address``."""
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= address < hi:
                return line.rstrip("\n")
    raise AssertionError(f"{address:#x} is not mapped")


def _maps_identity(address: int) -> tuple[str, int]:
    """(device as "major:minor", inode) that /proc/self/maps shows."""
    fields = _maps_line(address).split()
    return fields[3], int(fields[4])


@contextlib.contextmanager
def _subvolume_maps(root: str) -> Iterator[tuple[mmap.mmap, mmap.mmap]]:
    """Maps of all of sub_a/f and sub_b/f of _failing_btrfs, once the facts
    that make the two files hard to tell apart are checked: the same inode
    number and, in the maps, the same device; only stat tells them apart.
    Closed on leaving."""
    fa = os.open(f"{root}/sub_a/f", os.O_RDWR)
    fb = os.open(f"{root}/sub_b/f", os.O_RDWR)
    try:
        sa, sb = os.fstat(fa), os.fstat(fb)
        with mmap.mmap(fa, FILE_BYTES) as ma, mmap.mmap(fb, 16 * PAGE) as mb:
            seen_a = _maps_identity(faults._address(ma))
            seen_b = _maps_identity(faults._address(mb))
            print(f"stat: dev {sa.st_dev} / {sb.st_dev}, ino {sa.st_ino} / {sb.st_ino}")
            print(f"/proc/self/maps: {seen_a} / {seen_b}")
            assert sa.st_ino == sb.st_ino == 257
            assert seen_a == seen_b
            assert sa.st_dev != sb.st_dev
            yield ma, mb
    finally:
        os.close(fb)
        os.close(fa)


def _btrfs_subvolumes(root: str) -> None:
    import msyncext

    with _subvolume_maps(root) as (ma, mb):
        at_b = faults._address(mb)
        for offset in range(0, FILE_BYTES, PAGE):
            ma[offset : offset + faults.MARK] = os.urandom(faults.MARK)
        first = faults._first_failure(ma)
        outcomes = {
            "flush(sub_b/f)": _outcome(lambda: msyncext.flush(mb)),
            "MS_INVALIDATE over sub_b/f's mlocked page": _reaches_msync(mb, at_b),
            "clear_writeback_error(sub_b/f)": repr(msyncext.clear_writeback_error(mb)),
            "flush(sub_a/f) after that": _outcome(lambda: msyncext.flush(ma)),
        }
    expected = {
        "flush(sub_b/f)": "ok",
        "MS_INVALIDATE over sub_b/f's mlocked page": "OSError(EBUSY)",
        "clear_writeback_error(sub_b/f)": "None",
        "flush(sub_a/f) after that": _refused(first),
    }
    assert outcomes == expected, f"after sub_a/f failed: {outcomes}"


@needs_loop
@needs_mounts
def test_point8_btrfs_subvolumes_are_told_apart() -> None:
    """Issue 14, point 8: sub_a/f and sub_b/f on one btrfs share inode number
    257 and, in /proc/self/maps, the device; after sub_a/f fails, the clean
    sub_b/f flushes (reaching msync), clearing sub_b/f finds nothing, and
    sub_a/f stays refused."""
    reason = powercut.fs_unavailable("btrfs")
    if reason is not None:
        pytest.skip(reason)
    with _failing_btrfs() as root:
        _run("_btrfs_subvolumes", root)


# --------------------------------------------------------------------------
# Point 9: a healthy flush stalls behind a retry of the failed map


STALL_FLUSHES = 200
STALL_SECONDS = 15.0  # the most a measurement may take (the old code: ~5 s)
# How long after the partner begins its call a measured flush starts: the
# partner is then inside its flush (the old code: parsing /proc/self/maps
# with the record's lock held, ~25 ms here) rather than still on its way.
UNDER_WAY = 0.0005


class _Partner:
    """A thread that makes one call of ``call`` each time it is asked, the
    other thread of a measurement. ``refused``: each call must raise
    WritebackError (a retry of the failed map); otherwise succeed."""

    def __init__(self, call: Callable[[], object], *, refused: bool) -> None:
        self.unexpected: list[str] = []
        self._call = call
        self._refused = refused
        self._go = threading.Semaphore(0)
        self._started = threading.Semaphore(0)
        self._done = threading.Semaphore(0)
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while True:
            self._go.acquire()
            if self._stopping:
                return
            self._started.release()
            outcome = _outcome(self._call)
            if self._refused:
                expected = outcome.startswith("WritebackError(")
            else:
                expected = outcome == "ok"
            if not expected:
                self.unexpected.append(f"the partner's flush: {outcome}")
            self._done.release()

    def begin(self) -> None:
        """Return once the thread is about to make its call."""
        self._go.release()
        assert self._started.acquire(timeout=60), "the partner thread is stuck"

    def end(self) -> None:
        """Wait for the call to return."""
        assert self._done.acquire(timeout=60), "the partner's call hung"

    def __enter__(self) -> _Partner:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopping = True
        self._go.release()
        self._thread.join(60)
        assert not self._thread.is_alive(), "the partner thread hung"
        assert not self.unexpected, self.unexpected


def _median_flush_us(
    call: Callable[[], object], partner: _Partner
) -> tuple[float, int]:
    """Median duration of ``call`` in µs, each call made UNDER_WAY seconds
    after the partner thread began its own, over STALL_FLUSHES calls (fewer
    if they take more than STALL_SECONDS in all, at least 20)."""
    durations = []
    give_up = time.monotonic() + STALL_SECONDS
    for _ in range(STALL_FLUSHES):
        partner.begin()
        time.sleep(UNDER_WAY)
        t0 = time.perf_counter_ns()
        call()
        durations.append(time.perf_counter_ns() - t0)
        partner.end()
        if len(durations) >= 20 and time.monotonic() > give_up:
            break
    return statistics.median(durations) / 1000, len(durations)


def _stall(path: str) -> None:
    import msyncext

    if msyncext._msync.writeback_tracking() != "PROCMAP_QUERY":
        # Each lookup is then a parse of /proc/self/maps, whose cost grows
        # with the mappings: ~78 ms at 50,000 here, with nothing to wait for.
        print(
            "skip: no PROCMAP_QUERY (Linux 6.11+): a healthy flush's own lookup "
            "parses /proc/self/maps, O(mappings), whatever the record's locking"
        )
        return

    def shm_map(name: str) -> tuple[int, mmap.mmap]:
        fd = os.open(f"/dev/shm/{name}-{os.getpid()}", os.O_RDWR | os.O_CREAT, 0o600)
        os.unlink(f"/dev/shm/{name}-{os.getpid()}")
        os.ftruncate(fd, 4 * PAGE)
        return fd, mmap.mmap(fd, 4 * PAGE)

    sfd, target = shm_map("stall-target")
    ofd, other = shm_map("stall-other")
    fd, m, _ = faults._dirty_file(path)
    # Made after the failed map, so below it: /proc/self/maps lists them
    # first, and a lookup of the failed map's address reads through them.
    crowd, crowd_len = _crowd(50_000)

    def flush_target() -> None:
        msyncext.flush(target)

    # Each flush is timed while another thread's flush is under way: first
    # of another healthy map, with nothing recorded; then, with a failure
    # recorded, a retry of the failed map. Both figures pay the same thread
    # switches (and GIL hand-overs); only the record differs.
    with _Partner(lambda: msyncext.flush(other), refused=False) as partner:
        before, n_before = _median_flush_us(flush_target, partner)
    faults._first_failure(m)
    with _Partner(lambda: msyncext.flush(m), refused=True) as partner:
        after, n_after = _median_flush_us(flush_target, partner)
    bound = 20 * before + 50
    print(
        f"median flush of a /dev/shm map, 50,000 mappings, while another "
        f"thread flushes: {before:.1f} µs with nothing recorded ({n_before} flushes), "
        f"{after:.1f} µs with a failure recorded and its map retried "
        f"({n_after} flushes); bound {bound:.1f} µs"
    )
    assert after <= bound, (
        f"a healthy flush took {after:.1f} µs (median of {n_after}) while "
        f"another thread retried the failed map, {before:.1f} µs with nothing "
        f"recorded: more than 20x + 50 µs"
    )
    _libc().munmap(crowd, crowd_len)
    for closing in (m, target, other):
        closing.close()
    for descriptor in (fd, sfd, ofd):
        os.close(descriptor)


@needs_loop
@needs_mounts
@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm")
def test_point9_a_healthy_flush_does_not_wait_for_a_retry_of_the_failed_map(
    failing_ext4: blockdev.LoopFS,
) -> None:
    """Issue 14, point 9: with a failure recorded, 50,000 mappings and a
    thread retrying the failed map, a flush of an unrelated /dev/shm map
    costs about what it costs with nothing recorded, not a parse of
    /proc/self/maps."""
    _skip_if_the_child_did(_run("_stall", f"{failing_ext4.mountpoint}/big"))


# --------------------------------------------------------------------------
# Point 10: a ctypes view of a numpy.memmap


def _ctypes_view_pinned(directory: str, how: str) -> None:
    import test_races

    test_races._memmap_against_flushes(directory, "close", how, "ctypes")


@linux_only
@pytest.mark.parametrize("how", ["flush", "flush_ranges"])
def test_point10_a_ctypes_view_of_a_memmap_pins_the_map(
    tmp_path: Path, how: str
) -> None:
    """Issue 14, point 10: while a flush of ``(c_char * n).from_buffer(arr)``
    over a numpy.memmap is in msync, another thread's ``arr._mmap.close()``
    must fail with BufferError, and no flush meets an unmapped range.

    test_races' memmap race (test_memmap_pinned_against_close_and_resize),
    with the ctypes view as the flushed buffer."""
    pytest.importorskip("numpy")
    import test_races

    reason = blockdev.cachestat_unavailable(str(tmp_path))
    if reason is not None:
        pytest.skip(reason)
    if not os.path.exists(f"/proc/self/task/{threading.get_native_id()}/syscall"):
        pytest.skip("no /proc/PID/task/TID/syscall to see a flush in msync")
    if os.uname().machine not in test_races._MSYNC_SYSCALL:
        pytest.skip(f"msync's syscall number not known on {os.uname().machine}")
    _run("_ctypes_view_pinned", str(tmp_path), how)


# --------------------------------------------------------------------------
# The parse of /proc/self/maps: what kernels before 6.11 get


def _tracking_is_the_parse() -> None:
    import msyncext

    assert msyncext._msync.writeback_tracking() == "/proc/self/maps"


@needs_loop
@needs_mounts
@pytest.mark.parametrize(
    "scenario",
    ["_resize_moves_the_map", "every view", "address reuse", "_inode_reuse"],
)
def test_the_parse_of_proc_self_maps_keeps_the_same_promises(
    failing_ext4: blockdev.LoopFS,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    scenario: str,
) -> None:
    """Kernels without PROCMAP_QUERY (before 6.11) answer ENOTTY and the
    mapping is found by parsing /proc/self/maps; MSYNCEXT_NO_PROCMAP_QUERY=1
    takes that path here, and the scenarios hold the same."""
    monkeypatch.setenv("MSYNCEXT_NO_PROCMAP_QUERY", "1")
    _run("_tracking_is_the_parse")
    big = f"{failing_ext4.mountpoint}/big"
    if scenario == "every view":
        blockdev.run_isolated(
            "test_faults", "_every_view_of_the_file", big, str(tmp_path)
        )
    elif scenario == "address reuse":
        blockdev.run_isolated("test_faults", "_address_reuse", big, str(tmp_path))
    elif scenario == "_inode_reuse":
        _run(scenario, failing_ext4.mountpoint)
    else:
        _run(scenario, big)


# --------------------------------------------------------------------------
# When unsure, refuse


def _no_proc(path: str, healthy_dir: str) -> None:
    # A mount namespace of this process's own, without /proc, before msyncext
    # is imported: it can never tell which file a buffer is mapped from.
    libc = _libc()
    clone_newns, ms_rec, ms_private, mnt_detach = 0x20000, 0x4000, 0x40000, 2
    assert libc.unshare(clone_newns) == 0, os.strerror(ctypes.get_errno())
    # Private first, so that the unmount stays in this namespace. /proc, not
    # "/": in a chroot "/" is no mount point.
    if libc.mount(b"none", b"/proc", None, ms_rec | ms_private, None) != 0:
        print(f"skip: /proc cannot be made private: {os.strerror(ctypes.get_errno())}")
        return
    assert libc.umount2(b"/proc", mnt_detach) == 0, os.strerror(ctypes.get_errno())
    assert not os.path.exists("/proc/self/maps")
    try:
        with open("/proc/self/maps"):
            pass
    except FileNotFoundError:
        pass
    else:
        # QEMU's user mode answers an open of /proc/self/maps itself.
        print("skip: /proc/self/maps opens without /proc (QEMU's user mode)")
        return
    import msyncext

    assert msyncext._msync.writeback_tracking() == "/proc/self/maps"
    hfd, healthy = faults._healthy_map(healthy_dir)
    msyncext.flush(healthy)  # nothing recorded: the lookup is not needed
    fd, m, _ = faults._dirty_file(path)
    first = faults._first_failure(m)
    # A failure is recorded and no file can be established: every flush is
    # refused, saying why, rather than passed.
    for call in (lambda: msyncext.flush(healthy), lambda: msyncext.flush(m, 0, 1)):
        with pytest.raises(msyncext.WritebackError) as info:
            call()
        assert info.value.errno == first
        assert "cannot tell which file" in str(info.value), str(info.value)
    # Cleared through the buffer that failed, flushes work again.
    assert msyncext.clear_writeback_error(m) == first
    msyncext.flush(healthy)
    m.close()
    healthy.close()
    os.close(fd)
    os.close(hfd)


@needs_loop
@needs_mounts
def test_when_the_file_cannot_be_established_every_flush_is_refused(
    failing_ext4: blockdev.LoopFS, tmp_path: Path
) -> None:
    """Issue 14: 'When unsure, refuse.' Without /proc (in a mount namespace
    of the child's own) a recorded failure cannot be placed: no flush of any
    buffer reports success until it is cleared."""
    out = _run("_no_proc", f"{failing_ext4.mountpoint}/big", str(tmp_path))
    if out.startswith("skip: "):
        pytest.skip(out[len("skip: ") :].strip())
