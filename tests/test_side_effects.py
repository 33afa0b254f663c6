"""The write-out leaves the rest of the process alone (issue 20).

MS_ASYNC's early write-out (test_writeout.py) and evict=True must not change
what the rest of the process, or another process, sees. Issue 20 found eight
ways in which they did; each test here is written from its description of
one point, and from the behaviour the fix is to have:

1. no POSIX record lock of the process is released (closing any descriptor
   of a file releases them all, so the write-out works in a thread whose
   descriptor table is its own);
2. no write-back error is consumed (the write-out only starts the write,
   SYNC_FILE_RANGE_WRITE, and never waits for it or checks it);
3. nothing is opened but the mapped regular file: not a FIFO or a symlink
   that now has the mapping's name, and nothing blocks;
4. btrfs files with one inode number in two subvolumes are both written;
5. a file mapped through overlayfs is written (its pages are the upper
   file's);
6. nothing is held once the call returns (umount right after close works);
7. the thread is named msyncext-wout and leaves once idle, so that the
   process is single-threaded again for os.fork();
8. the caller's latency stays bounded with many files.

And where the thread cannot get a descriptor table of its own (a seccomp
filter refuses close_range), no write-out is started at all.

Every scenario runs in a fresh ``python -I`` child (blockdev.run_isolated):
the thread, the record and the locks belong to a process. msyncext is not
imported at module level, so that a child can install a seccomp filter
before the first import. Tests that mount need MSYNCEXT_TEST_MOUNTS=1 (and
root); the others need only a disk whose dirty pages cachestat(2) counts.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import mmap
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import blockdev
import powercut
import pytest

PAGE = mmap.PAGESIZE
LINUX_MS_ASYNC = 1  # <sys/mman.h>, for the libc control
WRITTEN_BOUND = 10.0  # s: far below the flusher's 30 s, far above a write-out
CALL_BOUND = 2.0  # s: an MS_ASYNC call that has not returned by then is stuck
EVICT_BOUND = 10.0  # s: an MS_SYNC of 64 pages under load, with room to spare
EXIT_BOUND = 3.0  # s: the old exit waited its full 5 s for a stuck thread
IDLE_BOUND = 5.0  # s: the thread is gone this long after the last MS_ASYNC
# s: the worst MS_ASYNC call among 200 files: the README's bound on the wait
# for the hand-over (50 ms), plus what a loaded two-core machine adds to a
# wakeup. The CPU bound below is the one that tells a caller that waits
# from one that writes out itself.
LATENCY_BOUND = 0.250
# s: the calling thread's CPU time in any one of those calls, which only
# hand a range over (~10 us); writing 4 MiB out itself took 2-8 ms here.
LATENCY_CPU_BOUND = 0.001
THREAD_NAME = "msyncext-wout"
REPORTED = ("ENOSPC", "EIO")  # what a lost write-back reports here

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"),
    reason="the write-out and these scenarios are Linux's",
)


def _require(*reasons: str | None) -> None:
    """Skip with the first reason given (gates are checked in the test, not
    at import, so that the children do not pay for them)."""
    for reason in reasons:
        if reason is not None:
            pytest.skip(reason)


def _disk_reason() -> str | None:
    return blockdev.cachestat_unavailable(tempfile.gettempdir())


@functools.cache
def seccomp_unavailable() -> str | None:
    """Why a seccomp filter cannot be installed here (another architecture;
    QEMU's user mode, which refuses PR_SET_SECCOMP), or None. Tried in a
    child: a filter cannot be taken off again."""
    if os.uname().machine not in _AUDIT_ARCH:
        return f"the seccomp filter knows no {os.uname().machine}"
    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
        "import test_side_effects as t; t._refuse_syscall(t._SYS_UNUSED, 1)"
    )
    done = subprocess.run(
        [sys.executable, "-I", "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if done.returncode != 0:
        last = done.stderr.strip().splitlines()[-1:] or ["(no message)"]
        return f"no seccomp filter can be installed here: {last[0]}"
    return None


def _run(function: str, *args: str, timeout: float = 60, **kw: Any) -> str:
    done = blockdev.run_isolated(
        "test_side_effects", function, *args, timeout=timeout, **kw
    )
    print(done.stdout)
    return done.stdout


# --------------------------------------------------------------------------
# Helpers for the children


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.msync.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    libc.sync_file_range.argtypes = (
        ctypes.c_int,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_uint,
    )
    libc.mount.argtypes = (
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_ulong,
        ctypes.c_void_p,
    )
    libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)
    libc.inotify_init1.argtypes = (ctypes.c_int,)
    libc.inotify_add_watch.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32)
    libc.prctl.argtypes = (
        ctypes.c_int,
        ctypes.c_ulong,
        ctypes.c_ulong,
        ctypes.c_ulong,
        ctypes.c_ulong,
    )
    return libc


def _errno_name(err: int | None) -> str:
    return errno.errorcode.get(err or 0, str(err))


def _outcome(call: Callable[[], object]) -> str:
    """What a call did: ``ok``, or the exception's type (and errno name)."""
    try:
        call()
    except OSError as exc:
        return f"{type(exc).__name__}({_errno_name(exc.errno)})"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return "ok"


def _within(call: Callable[[], object], seconds: float) -> str:
    """_outcome(call), run in a thread so that a call that blocks is reported
    (``still blocked after N s``) rather than hanging the child."""
    result: list[str] = []
    worker = threading.Thread(target=lambda: result.append(_outcome(call)), daemon=True)
    worker.start()
    worker.join(seconds)
    return result[0] if result else f"still blocked after {seconds:.0f} s"


def _new_map(path: str, npages: int) -> tuple[int, mmap.mmap]:
    """A shared map of a new sparse file of ``npages`` pages (all clean)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    os.ftruncate(fd, npages * PAGE)
    return fd, mmap.mmap(fd, npages * PAGE)


def _dirty(m: mmap.mmap) -> None:
    """Change a byte in every page of the map."""
    for offset in range(0, len(m), PAGE):
        m[offset] = (m[offset] + 1) & 0xFF


def _dirty_count(fd: int) -> int:
    return blockdev.cachestat(fd).dirty


def _written_early(fd: int, seconds: float = WRITTEN_BOUND) -> str:
    """``yes`` once no page of the file is dirty (written, or under
    write-back), or how many still are after ``seconds``."""
    deadline = time.monotonic() + seconds
    while (dirty := _dirty_count(fd)) != 0:
        if time.monotonic() > deadline:
            return f"{dirty} pages still dirty after {seconds:.0f} s"
        time.sleep(0.005)
    return "yes"


def _written_and_done(fd: int, seconds: float = WRITTEN_BOUND) -> str:
    """``yes`` once no page is dirty nor under write-back (the write-back has
    ended, in success or failure), or what is left after ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        counts = blockdev.cachestat(fd)
        if counts.dirty == counts.writeback == 0:
            return "yes"
        if time.monotonic() > deadline:
            return f"{counts} after {seconds:.0f} s"
        time.sleep(0.005)


def _address(m: mmap.mmap) -> int:
    anchor = ctypes.c_char.from_buffer(m)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor


def _libc_ms_async(m: mmap.mmap) -> None:
    """msync(MS_ASYNC) as every other binding calls it: on Linux, nothing."""
    if _libc().msync(_address(m), len(m), LINUX_MS_ASYNC) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _maps_line(address: int) -> list[str]:
    """The fields of the /proc/self/maps line of ``address`` (the path as
    one field, spaces kept)."""
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.rstrip("\n").split(maxsplit=5)
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if lo <= address < hi:
                return fields
    raise AssertionError(f"{address:#x} is not mapped")


# Another process asks for the write lock without waiting: refused (EAGAIN
# or EACCES, by POSIX) while this process holds it. If it is free, the prober
# takes it, and lets go as it exits.
_LOCK_PROBE = """
import errno, fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
try:
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
except OSError as exc:
    if exc.errno not in (errno.EAGAIN, errno.EACCES):
        raise
    print("held")
else:
    print("free")
"""


def _lock_seen_by_another_process(path: str) -> str:
    done = subprocess.run(
        [sys.executable, "-I", "-c", _LOCK_PROBE, path],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return done.stdout.strip()


IN_OPEN = 0x20
_INOTIFY_EVENT = struct.Struct("iIII")


def _watch_opens(path: str) -> int:
    """An inotify descriptor that hears every open of ``path``. (An O_PATH
    open is not one: it opens nothing.)"""
    libc = _libc()
    fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    if fd < 0 or libc.inotify_add_watch(fd, path.encode(), IN_OPEN) < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"inotify on {path}: {os.strerror(err)}")
    return fd


def _opens_heard(watch: int) -> int:
    """Opens heard so far (inotify merges an event into the same one queued
    just before it, unread: two opens in a row may count as one)."""
    count = 0
    while True:
        try:
            events = os.read(watch, 65536)
        except BlockingIOError:
            return count
        at = 0
        while at < len(events):
            _, mask, _, name_len = _INOTIFY_EVENT.unpack_from(events, at)
            at += _INOTIFY_EVENT.size + name_len
            count += bool(mask & IN_OPEN)


# --------------------------------------------------------------------------
# Point 1: POSIX record locks


def child_locks_are_kept(directory: str) -> None:
    import fcntl

    import msyncext

    path = os.path.join(directory, "locked.bin")
    fd, m = _new_map(path, 64)
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    before = _lock_seen_by_another_process(path)
    assert before == "held", f"the lock, before anything: {before}"

    def ms_async() -> None:
        _dirty(m)
        msyncext.flush(m, flags=msyncext.MS_ASYNC)
        written = _written_and_done(fd)
        assert written == "yes", f"MS_ASYNC's write-out: {written}"

    def evict() -> None:
        _dirty(m)
        msyncext.flush(m, evict=True)

    def clear() -> None:
        assert msyncext.clear_writeback_error(m) is None

    seen = {}
    for what, step in (
        ("MS_ASYNC, its pages written", ms_async),
        ("flush(evict=True)", evict),
        ("clear_writeback_error", clear),
    ):
        # Taken again before each step (a no-op while held), so that each
        # step is judged on its own.
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        outcome = _outcome(step)
        seen[what] = f"{outcome}, lock {_lock_seen_by_another_process(path)}"
    print(seen)
    assert seen == dict.fromkeys(seen, "ok, lock held"), (
        f"this process's lockf() lock, as another process sees it after: {seen}"
    )
    m.close()
    os.close(fd)


def test_point1_the_processs_record_locks_are_kept(tmp_path: Path) -> None:
    """Issue 20, point 1: MS_ASYNC's write-out and evict=True opened the file
    and closed that descriptor, which releases every POSIX record lock the
    process holds on it: another process could then take the lock."""
    _require(_disk_reason())
    _run("child_locks_are_kept", str(tmp_path))


# --------------------------------------------------------------------------
# Point 2: write-back errors are not consumed


def _fsync_anew(path: str) -> str:
    """os.fsync through a descriptor opened now."""
    fd = os.open(path, os.O_RDWR)
    try:
        return _outcome(lambda: os.fsync(fd))
    finally:
        os.close(fd)


def child_errors_are_not_consumed(directory: str) -> None:
    import msyncext

    libc = _libc()
    seen: dict[str, object] = {}

    # The controls, without msyncext. The first file fills the tmpfs under
    # the device; every write of the files after it fails.
    control = os.path.join(directory, "control-libc")
    fd, m = _new_map(control, 4096)
    _dirty(m)
    _libc_ms_async(m)
    time.sleep(0.5)
    seen["libc MS_ASYNC: pages still dirty 0.5 s later"] = _dirty_count(fd)
    seen["libc MS_ASYNC, then fsync of a new descriptor"] = _fsync_anew(control)
    m.close()
    os.close(fd)

    # Only starting the write-out (what msyncext's write-out is to do),
    # through a descriptor of its own, closed at once.
    control = os.path.join(directory, "control-write-only")
    fd, m = _new_map(control, 2048)
    _dirty(m)
    other = os.open(control, os.O_RDONLY)
    assert libc.sync_file_range(other, 0, 0, 2) == 0  # SYNC_FILE_RANGE_WRITE
    os.close(other)
    seen["sync_file_range(WRITE): written and done"] = _written_and_done(fd)
    time.sleep(0.5)
    seen["sync_file_range(WRITE), then fsync of a new descriptor"] = _fsync_anew(
        control
    )
    m.close()
    os.close(fd)

    # msyncext's MS_ASYNC.
    subject = os.path.join(directory, "subject")
    fd, m = _new_map(subject, 2048)
    _dirty(m)
    msyncext.flush(m, flags=msyncext.MS_ASYNC)
    seen["msyncext MS_ASYNC: written and done"] = _written_and_done(fd)
    time.sleep(0.5)  # whatever the write-out does after the write, done
    seen["msyncext MS_ASYNC, then fsync of a new descriptor"] = _fsync_anew(subject)
    seen["the map's next MS_SYNC flush"] = _outcome(lambda: msyncext.flush(m))
    print(seen)

    # Either errno is the lost write-back; the message shows which one.
    os_error = {f"OSError({name})" for name in REPORTED}
    refused = {f"WritebackError({name})" for name in REPORTED}
    found = {}
    for key, value in seen.items():
        errors = refused if "MS_SYNC" in key else os_error
        found[key] = "reported" if value in errors else value
    expected = {
        "libc MS_ASYNC: pages still dirty 0.5 s later": 4096,
        "libc MS_ASYNC, then fsync of a new descriptor": "reported",
        "sync_file_range(WRITE): written and done": "yes",
        "sync_file_range(WRITE), then fsync of a new descriptor": "reported",
        "msyncext MS_ASYNC: written and done": "yes",
        "msyncext MS_ASYNC, then fsync of a new descriptor": "reported",
        "the map's next MS_SYNC flush": "reported",
    }
    assert found == expected, f"a write-back that failed, as seen after: {seen}"
    m.close()
    os.close(fd)


@pytest.fixture
def failing_ext4() -> Iterator[blockdev.LoopFS]:
    """test_record's failing device: ext4 without a journal (writable after
    a failure) on a loop device over a 12 MiB tmpfs."""
    _require(blockdev.loop_unavailable())
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


def test_point2_a_failed_write_out_is_reported_to_a_new_descriptor(
    failing_ext4: blockdev.LoopFS,
) -> None:
    """Issue 20, point 2: the write-out waited for its write (WAIT_AFTER) and
    so marked the failure seen: an fsync through a descriptor opened after
    it returned 0 for the lost data. Without msyncext it reports the error;
    the controls show that, and that starting the write alone hides
    nothing."""
    # The controls count dirty pages (the failing device itself is ext4).
    _require(blockdev.cachestat_missing())
    _run("child_errors_are_not_consumed", failing_ext4.mountpoint)


# --------------------------------------------------------------------------
# Point 3: a FIFO or a symlink where the mapping's name points


NAME_VARIANTS = ("fifo", "symlink-to-fifo", "symlink-to-file")


def child_nothing_but_the_file_is_opened(directory: str, variant: str) -> None:
    import msyncext

    path = os.path.join(directory, "data")
    _, m = _new_map(path, 64)  # its descriptor stays open, as the map does
    _dirty(m)
    # The file goes; /proc/self/maps now names the mapping "data (deleted)",
    # a name anyone who can write the directory can give to something else.
    os.unlink(path)
    shown = f"{path} (deleted)"
    assert _maps_line(_address(m))[-1] == shown, _maps_line(_address(m))
    if variant == "fifo":
        never = shown
        os.mkfifo(never)
    elif variant == "symlink-to-fifo":
        never = os.path.join(directory, "pipe")
        os.mkfifo(never)
        os.symlink(never, shown)
    else:
        never = os.path.join(directory, "target")
        with open(never, "wb") as f:
            f.truncate(64 * PAGE)
        os.symlink(never, shown)
    watch = _watch_opens(never)

    seen: dict[str, object] = {}
    seen["MS_ASYNC of the mapped file"] = _within(
        lambda: msyncext.flush(m, flags=msyncext.MS_ASYNC), CALL_BOUND
    )
    ofd, other = _new_map(os.path.join(directory, "other"), 64)
    _dirty(other)
    seen["MS_ASYNC of another file"] = _within(
        lambda: msyncext.flush(other, flags=msyncext.MS_ASYNC), CALL_BOUND
    )
    seen["the other file written early"] = _written_early(ofd)
    seen["flush(evict=True) of the mapped file"] = _within(
        lambda: msyncext.flush(m, evict=True), EVICT_BOUND
    )
    seen[f"the {variant.split('-')[-1]} opened"] = _opens_heard(watch) > 0
    print(json.dumps(seen))
    # The parent measures from here to the end of the process: a thread stuck
    # in open() made the exit wait its full bound. (Nothing is closed, so
    # that a call still blocked has what it uses.)
    print(f"exiting at {time.monotonic()!r}", flush=True)


@pytest.mark.parametrize("variant", NAME_VARIANTS)
def test_point3_nothing_but_the_mapped_file_is_opened(
    tmp_path: Path, variant: str
) -> None:
    """Issue 20, point 3: the write-out opened the mapping's name, whatever
    it now was: a FIFO named "data (deleted)" blocked its thread for good
    (no other file written early, evict=True hung, exit waited 5 s), and a
    symlink there was followed. (A symlink at the file's old name after a
    rename is never consulted: /proc/self/maps follows a rename.)"""
    _require(_disk_reason())
    out = _run(
        "child_nothing_but_the_file_is_opened", str(tmp_path), variant, timeout=90
    )
    ended = time.monotonic()
    lines = out.splitlines()
    seen = json.loads(lines[-2])
    exit_took = ended - float(lines[-1].removeprefix("exiting at "))
    seen["interpreter exit"] = (
        "prompt" if exit_took < EXIT_BOUND else f"took {exit_took:.1f} s"
    )
    opened = f"the {variant.split('-')[-1]} opened"
    assert seen == {
        "MS_ASYNC of the mapped file": "ok",
        "MS_ASYNC of another file": "ok",
        "the other file written early": "yes",
        "flush(evict=True) of the mapped file": "ok",
        opened: False,
        "interpreter exit": "prompt",
    }, f"{variant} at the mapping's name: {seen}"


# --------------------------------------------------------------------------
# Point 4: btrfs, one inode number in two subvolumes


BTRFS_ROUNDS = 5
BTRFS_PAGES = 64


def child_btrfs_both_written(root: str) -> None:
    import msyncext

    fa, fb = (os.open(f"{root}/{sub}/f", os.O_RDWR) for sub in ("sub_a", "sub_b"))
    ma, mb = (mmap.mmap(fd, BTRFS_PAGES * PAGE) for fd in (fa, fb))
    sa, sb = os.fstat(fa), os.fstat(fb)
    # What the point rests on: one inode number, and in /proc/self/maps one
    # device; only stat tells the two files apart.
    assert sa.st_ino == sb.st_ino, (sa.st_ino, sb.st_ino)
    assert _maps_line(_address(ma))[3:5] == _maps_line(_address(mb))[3:5]
    rounds = []
    # The two requests meet in the queue only if the thread has not taken
    # the first before the second comes: a few rounds make that near sure.
    for _ in range(BTRFS_ROUNDS):
        _dirty(ma)
        _dirty(mb)
        before = (_dirty_count(fa), _dirty_count(fb))
        assert before == (BTRFS_PAGES, BTRFS_PAGES), before
        msyncext.flush(ma, flags=msyncext.MS_ASYNC)
        msyncext.flush(mb, flags=msyncext.MS_ASYNC)
        rounds.append({"sub_a/f": _written_early(fa), "sub_b/f": _written_early(fb)})
        if rounds[-1] != {"sub_a/f": "yes", "sub_b/f": "yes"}:
            break
    print(rounds)
    assert rounds == [{"sub_a/f": "yes", "sub_b/f": "yes"}] * BTRFS_ROUNDS, (
        f"written early, round by round: {rounds}"
    )
    for m in (ma, mb):
        m.close()
    for fd in (fa, fb):
        os.close(fd)


def test_point4_btrfs_files_with_one_inode_number_are_both_written() -> None:
    """Issue 20, point 4: the queue merged two files that share device and
    inode number in /proc/self/maps (btrfs subvolumes): one of them was
    never written early."""
    _require(_disk_reason(), powercut.fs_unavailable("btrfs"))
    # A rig is a fresh btrfs on a loop device; its power is never cut here.
    with powercut.rig("btrfs", "image") as rig:
        root = rig.mountpoint
        for sub in ("sub_a", "sub_b"):
            powercut.run("btrfs", "subvolume", "create", f"{root}/{sub}")
            # The first file of each subvolume: inode number 257 in both.
            with open(f"{root}/{sub}/f", "xb") as f:
                f.truncate(BTRFS_PAGES * PAGE)
        powercut.run("btrfs", "filesystem", "sync", root)
        _run("child_btrfs_both_written", root)


# --------------------------------------------------------------------------
# Point 5: overlayfs


OVERLAY_PAGES = 256


def child_overlay_written(merged: str, upper: str) -> None:
    import msyncext

    seen: dict[str, object] = {}
    for who in ("libc", "msyncext"):
        fd, m = _new_map(os.path.join(merged, who), OVERLAY_PAGES)
        _dirty(m)
        # The map's pages are the upper file's: counted through it.
        real = os.open(os.path.join(upper, who), os.O_RDONLY)
        seen[f"{who}: dirty before"] = _dirty_count(real)
        if who == "libc":
            _libc_ms_async(m)
            time.sleep(1.0)
            seen["libc MS_ASYNC: still dirty 1 s later"] = _dirty_count(real)
        else:
            msyncext.flush(m, flags=msyncext.MS_ASYNC)
            seen["msyncext MS_ASYNC: written early"] = _written_early(real)
        os.close(real)
        m.close()
        os.close(fd)
    print(seen)
    assert seen == {
        "libc: dirty before": OVERLAY_PAGES,
        "libc MS_ASYNC: still dirty 1 s later": OVERLAY_PAGES,
        "msyncext: dirty before": OVERLAY_PAGES,
        "msyncext MS_ASYNC: written early": "yes",
    }, f"a map through an overlay mount: {seen}"


@contextmanager
def _overlay(base: str) -> Iterator[tuple[str, str]]:
    """An overlay mount over directories in ``base``: (merged, upper)."""
    blockdev.refuse_unless_asked()
    lower, upper, work, merged = (
        os.path.join(base, name) for name in ("lower", "upper", "work", "merged")
    )
    for directory in (lower, upper, work, merged):
        os.mkdir(directory)
    powercut.run(
        "mount",
        "-t",
        "overlay",
        "msyncext-overlay",
        "-o",
        f"lowerdir={lower},upperdir={upper},workdir={work}",
        merged,
    )
    try:
        yield merged, upper
    finally:
        powercut.unmount(merged)


def test_point5_a_map_through_overlayfs_is_written_early() -> None:
    """Issue 20, point 5: sync_file_range on the overlay's file starts
    nothing (the overlay inode's page cache is empty; the pages are the
    upper file's), so nothing was written early."""
    _require(blockdev.loop_unavailable(), blockdev.cachestat_missing())
    with open("/proc/filesystems") as f:
        if "overlay" not in f.read().split():
            pytest.skip("this kernel has no overlay file system")
    with blockdev.loop_ext4(32) as fs, _overlay(fs.mountpoint) as (merged, upper):
        _run("child_overlay_written", merged, upper)


# --------------------------------------------------------------------------
# Point 6: nothing held after the call


UMOUNT_ROUNDS = 20


def child_umount_right_after_close(device: str, mountpoint: str) -> None:
    import msyncext

    libc = _libc()

    def mount() -> None:
        if libc.mount(device.encode(), mountpoint.encode(), b"ext4", 0, None) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"mount {device}: {os.strerror(err)}")

    def unmount() -> str:
        if libc.umount2(mountpoint.encode(), 0) == 0:
            return "ok"
        return _errno_name(ctypes.get_errno())

    rounds: list[str] = []
    mounted = True  # by the parent
    try:
        for _ in range(UMOUNT_ROUNDS):
            if not mounted:
                mount()
                mounted = True
            fd, m = _new_map(os.path.join(mountpoint, "f"), 4096)
            _dirty(m)
            msyncext.flush(m, flags=msyncext.MS_ASYNC)
            m.close()
            os.close(fd)
            rounds.append(unmount())  # right away
            # A busy file system lets go once the write-out is done.
            deadline = time.monotonic() + 30
            while rounds[-1] != "ok" and unmount() != "ok":
                assert time.monotonic() < deadline, "the file system stayed busy"
                time.sleep(0.01)
            mounted = False
    finally:
        if not mounted:
            mount()  # the parent unmounts it
    print(rounds)
    assert rounds == ["ok"] * UMOUNT_ROUNDS, (
        f"umount right after MS_ASYNC, close and os.close, round by round: {rounds}"
    )


def test_point6_umount_right_after_close_succeeds() -> None:
    """Issue 20, point 6: the write-out thread kept its descriptor of the
    file until the write had finished: umount right after the application
    closed its map and descriptor said "target is busy"."""
    _require(blockdev.loop_unavailable())
    with blockdev.loop_ext4(64) as fs:
        try:
            _run("child_umount_right_after_close", fs.device, fs.mountpoint)
        finally:
            if not powercut.is_mounted(fs.mountpoint):
                powercut.run("mount", "-t", "ext4", fs.device, fs.mountpoint)


# --------------------------------------------------------------------------
# Point 7: the thread


def _threads() -> dict[str, str]:
    """This process's tasks: id -> name (comm)."""
    names = {}
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                names[task] = f.read().strip()
        except FileNotFoundError:  # it ended meanwhile
            pass
    return names


def child_the_thread_is_named_and_leaves(directory: str) -> None:
    import msyncext

    fd, m = _new_map(os.path.join(directory, "f"), 64)
    alone = _threads()
    seen: dict[str, object] = {}

    def started_by_ms_async() -> list[str]:
        _dirty(m)
        msyncext.flush(m, flags=msyncext.MS_ASYNC)
        now = _threads()
        return sorted(name for task, name in now.items() if task not in alone)

    seen["threads started by MS_ASYNC"] = started_by_ms_async()
    last = time.monotonic()
    seen["written early"] = _written_early(fd)
    while len(_threads()) > len(alone) and time.monotonic() - last < IDLE_BOUND:
        time.sleep(0.05)
    seen[f"threads left {IDLE_BOUND:.0f} s after it"] = len(_threads()) - len(alone)
    if sys.version_info >= (3, 12):
        # 3.12+ warns at os.fork() in a multi-threaded process. The warning
        # is recorded, not made an error: under -W error, os.fork() of 3.12.1
        # and 3.13.0 raised nothing here (and printed nothing).
        with warnings.catch_warnings(record=True) as heard:
            warnings.simplefilter("always")
            pid = os.fork()
            if pid == 0:
                os._exit(0)
        os.waitpid(pid, 0)
        seen["os.fork()"] = [str(w.message) for w in heard] or "no warning"
    # Gone is not given up: the next MS_ASYNC starts another.
    seen["threads started by the next MS_ASYNC"] = started_by_ms_async()
    seen["written early again"] = _written_early(fd)
    print(seen)
    expected: dict[str, object] = {
        "threads started by MS_ASYNC": [THREAD_NAME],
        "written early": "yes",
        f"threads left {IDLE_BOUND:.0f} s after it": 0,
        "threads started by the next MS_ASYNC": [THREAD_NAME],
        "written early again": "yes",
    }
    if sys.version_info >= (3, 12):
        expected["os.fork()"] = "no warning"
    assert seen == expected, f"the write-out thread: {seen}"
    m.close()
    os.close(fd)


def test_point7_the_thread_is_named_and_leaves_when_idle(tmp_path: Path) -> None:
    """Issue 20, point 7: after one MS_ASYNC the process stayed
    multi-threaded for life (3.12+ then warns at every os.fork(), an error
    under -W error), and the thread had the interpreter's name."""
    _require(_disk_reason())
    _run(
        "child_the_thread_is_named_and_leaves",
        str(tmp_path),
        python_flags=("-W", "error"),
    )


# --------------------------------------------------------------------------
# Point 8: the caller's latency with many files


LATENCY_FILES = 200
LATENCY_PAGES = 1024  # 4 MiB


def child_latency_with_many_files(directory: str) -> None:
    import msyncext

    files = [
        _new_map(os.path.join(directory, f"f{i}"), LATENCY_PAGES)
        for i in range(LATENCY_FILES)
    ]
    for _, m in files:
        _dirty(m)
    took, cpu = [], []
    for _, m in files:
        cpu_started = time.thread_time_ns()
        started = time.perf_counter_ns()
        msyncext.flush(m, flags=msyncext.MS_ASYNC)
        took.append((time.perf_counter_ns() - started) / 1e9)
        cpu.append((time.thread_time_ns() - cpu_started) / 1e9)
    worst, worst_cpu = max(took), max(cpu)
    print(
        f"{LATENCY_FILES} MS_ASYNC calls of 4 MiB each: worst {worst * 1e3:.2f} ms, "
        f"median {statistics.median(took) * 1e6:.1f} us, "
        f"{sum(t > 1e-3 for t in took)} over 1 ms; the calling thread's CPU time "
        f"in them {sum(cpu) * 1e3:.2f} ms, the most in one {worst_cpu * 1e3:.2f} ms"
    )
    for i, (fd, m) in enumerate(files):
        m.close()
        os.close(fd)
        os.unlink(os.path.join(directory, f"f{i}"))  # nothing left to write
    # The wall time is what the caller sees; the CPU time says whether the
    # call did the write-out itself (its wall time then depends on the load
    # and the device: 21-64 ms here).
    assert (worst < LATENCY_BOUND, worst_cpu < LATENCY_CPU_BOUND) == (True, True), (
        f"the slowest of {LATENCY_FILES} MS_ASYNC calls took {worst * 1e3:.1f} ms "
        f"(bound {LATENCY_BOUND * 1e3:.0f} ms); the most CPU time of the calling "
        f"thread in one was {worst_cpu * 1e3:.2f} ms (bound "
        f"{LATENCY_CPU_BOUND * 1e3:.0f} ms)"
    )


def test_point8_the_callers_latency_stays_bounded_with_200_files(
    tmp_path: Path,
) -> None:
    """Issue 20, point 8: past 64 queued files the caller started the
    write-out itself, and waited for the device queue (the slowest call of
    200 took 64.6 ms)."""
    _require(_disk_reason())
    _run("child_latency_with_many_files", str(tmp_path), timeout=120)


# --------------------------------------------------------------------------
# The fallback: no descriptor table of the thread's own, no write-out


_SYS_CLOSE_RANGE = 436  # x86_64 and aarch64 alike
_SYS_OPENAT2 = 437  # likewise
_SYS_UNUSED = 1000  # no system call has this number: the probe's filter
_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2
_SECCOMP_RET_ALLOW = 0x7FFF0000
_SECCOMP_RET_ERRNO = 0x00050000
# Classic BPF opcodes: BPF_LD|BPF_W|BPF_ABS, BPF_JMP|BPF_JEQ|BPF_K, BPF_RET|BPF_K.
_LOAD_WORD, _JUMP_IF_EQUAL, _RETURN = 0x20, 0x15, 0x06


class _SockFilter(ctypes.Structure):
    _fields_ = (
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    )


class _SockFprog(ctypes.Structure):
    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter)))


def _refuse_close_range() -> None:
    """Install a seccomp filter under which close_range(2) fails with EPERM,
    as a container profile that does not know it would make it."""
    _refuse_syscall(_SYS_CLOSE_RANGE, errno.EPERM)
    libc = _libc()
    # A range with no descriptor in it: 0 if allowed, EPERM now.
    far = ctypes.c_uint(1 << 30)
    assert libc.syscall(_SYS_CLOSE_RANGE, far, far, ctypes.c_uint(0)) == -1
    assert ctypes.get_errno() == errno.EPERM, _errno_name(ctypes.get_errno())


def refuse_openat2() -> None:
    """Install a seccomp filter under which openat2(2) answers ENOSYS, as on
    kernels before 5.6, under QEMU's user mode and under valgrind."""
    _refuse_syscall(_SYS_OPENAT2, errno.ENOSYS)


def _refuse_syscall(number: int, err: int) -> None:
    """Install a seccomp filter under which system call ``number`` fails
    with ``err`` (this process and its threads, from now on)."""
    libc = _libc()
    program = (
        # seccomp_data: nr at offset 0, arch at offset 4.
        _SockFilter(_LOAD_WORD, 0, 0, 4),
        _SockFilter(_JUMP_IF_EQUAL, 0, 3, _AUDIT_ARCH[os.uname().machine]),
        _SockFilter(_LOAD_WORD, 0, 0, 0),
        _SockFilter(_JUMP_IF_EQUAL, 0, 1, number),
        _SockFilter(_RETURN, 0, 0, _SECCOMP_RET_ERRNO | err),
        _SockFilter(_RETURN, 0, 0, _SECCOMP_RET_ALLOW),
    )
    filters = (_SockFilter * len(program))(*program)
    fprog = _SockFprog(len(program), filters)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    where = ctypes.addressof(fprog)
    if libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, where, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")


def child_no_write_out_without_a_private_table(directory: str) -> None:
    import fcntl

    assert "msyncext" not in sys.modules
    _refuse_close_range()
    import msyncext

    path = os.path.join(directory, "locked.bin")
    fd, m = _new_map(path, 64)
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    seen: dict[str, object] = {}
    _dirty(m)
    seen["MS_ASYNC"] = _within(
        lambda: msyncext.flush(m, flags=msyncext.MS_ASYNC), CALL_BOUND
    )
    time.sleep(1.5)
    seen["dirty 1.5 s later"] = _dirty_count(fd)
    seen["the lock after MS_ASYNC"] = _lock_seen_by_another_process(path)
    seen["flush(evict=True)"] = _within(
        lambda: msyncext.flush(m, evict=True), EVICT_BOUND
    )
    seen["dirty after it"] = _dirty_count(fd)
    seen["the lock after evict"] = _lock_seen_by_another_process(path)
    print(seen)
    assert seen == {
        "MS_ASYNC": "ok",
        "dirty 1.5 s later": 64,  # the kernel's MS_ASYNC: nothing
        "the lock after MS_ASYNC": "held",
        "flush(evict=True)": "ok",
        "dirty after it": 0,
        "the lock after evict": "held",
    }, f"with close_range refused by seccomp: {seen}"
    m.close()
    os.close(fd)


def test_fallback_without_close_range_no_write_out_and_the_lock_kept(
    tmp_path: Path,
) -> None:
    """Issue 20's fallback: where the thread cannot make its descriptor
    table private (close_range refused, as a seccomp profile may), msyncext
    starts no write-out (MS_ASYNC is then the kernel's: nothing), keeps the
    process's lock, and evict=True still returns."""
    _require(_disk_reason(), seccomp_unavailable())
    _run("child_no_write_out_without_a_private_table", str(tmp_path))


def child_without_openat2(directory: str) -> None:
    """The write-out with openat2 answering ENOSYS: it walks to the file one
    name at a time, still opens nothing but the mapped file (a FIFO or a
    symlink at its old path is left alone), and still starts the write."""
    assert "msyncext" not in sys.modules
    refuse_openat2()
    import msyncext

    fd, m = _new_map(os.path.join(directory, "plain.bin"), 64)
    _dirty(m)
    msyncext.flush(m, flags=msyncext.MS_ASYNC)
    assert _written_early(fd) == "yes", "MS_ASYNC started nothing without openat2"
    m.close()
    os.close(fd)
    for variant in NAME_VARIANTS:
        inner = os.path.join(directory, variant)
        os.mkdir(inner)
        child_nothing_but_the_file_is_opened(inner, variant)


def test_without_openat2_the_file_is_still_reached_and_only_it(
    tmp_path: Path,
) -> None:
    """Kernels before 5.6 (and QEMU 7.2's user mode, and valgrind) have no
    openat2: the walk from the mount's root falls back to one O_NOFOLLOW
    open per name, comparing each step's mount. Before that fallback,
    nothing could be reached there: no write-out, no file handle."""
    _require(_disk_reason(), seccomp_unavailable())
    _run("child_without_openat2", str(tmp_path))
