"""Helpers for the reliability tests: loop devices, page-cache facts, isolation.

A small ext4 filesystem on a loop device over a plain backing file lets a
test read what the "device" received: the loop driver writes every block
it is sent into the backing file, so reading the backing file after a
flush shows exactly which bytes reached the device. Everything here cleans
up after itself, whatever happens in between.

Not a test module: tests/ is on sys.path (pytest's prepend import mode), so
the test modules ``import blockdev``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import functools
import mmap
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

PAGE = mmap.PAGESIZE


@functools.cache
def _c_library_name() -> str | None:
    return ctypes.util.find_library("c")


def c_library() -> ctypes.CDLL:
    """The C library's own functions, errno kept (for mlock and munlock).

    Not ``ctypes.CDLL(None)``: that takes each symbol from the first
    library defining it, and a preloaded library may define its own.
    AddressSanitizer's runtime (.ci/sanitize.sh preloads it) makes mlock and
    munlock do nothing, and the tests that need EBUSY from MS_INVALIDATE
    over locked pages need the kernel's lock. A new object each call, so
    that a caller's argtypes stay its own.
    """
    return ctypes.CDLL(_c_library_name(), use_errno=True)


# --------------------------------------------------------------------------
# cachestat(2): how many pages of a file range are cached, dirty, in write-back


class _CachestatRange(ctypes.Structure):
    _fields_ = (("off", ctypes.c_uint64), ("len", ctypes.c_uint64))


class _Cachestat(ctypes.Structure):
    _fields_ = (
        ("nr_cache", ctypes.c_uint64),
        ("nr_dirty", ctypes.c_uint64),
        ("nr_writeback", ctypes.c_uint64),
        ("nr_evicted", ctypes.c_uint64),
        ("nr_recently_evicted", ctypes.c_uint64),
    )


# Same number on x86_64 and aarch64 (the generic syscall table).
_SYS_CACHESTAT = 451


@dataclass(frozen=True)
class PageCounts:
    cached: int
    dirty: int
    writeback: int


def cachestat(fd: int, offset: int = 0, length: int = 0) -> PageCounts:
    """Page counts of ``[offset, offset + length)`` of ``fd`` (0 = to EOF)."""
    libc = ctypes.CDLL(None, use_errno=True)
    rng = _CachestatRange(offset, length)
    out = _Cachestat()
    if libc.syscall(_SYS_CACHESTAT, fd, ctypes.byref(rng), ctypes.byref(out), 0):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return PageCounts(int(out.nr_cache), int(out.nr_dirty), int(out.nr_writeback))


@functools.cache
def cachestat_missing() -> str | None:
    """Why cachestat(2) cannot be called here at all (an old kernel, QEMU's
    user mode, a seccomp filter), or None."""
    if not sys.platform.startswith("linux"):
        return "cachestat(2) is Linux-only"
    if os.uname().machine not in ("x86_64", "aarch64"):
        return f"cachestat syscall number not known on {os.uname().machine}"
    with tempfile.TemporaryFile() as f:
        try:
            cachestat(f.fileno())
        except OSError as exc:
            if exc.errno in (errno.ENOSYS, errno.EPERM):
                return f"cachestat(2) unavailable: {exc}"
            raise
    return None


@functools.cache
def cachestat_unavailable(directory: str) -> str | None:
    """Why dirty-page counts cannot be read for files in ``directory``."""
    missing = cachestat_missing()
    if missing is not None:
        return missing
    fd, path = tempfile.mkstemp(dir=directory)
    try:
        os.write(fd, b"\0" * PAGE)
        counts = cachestat(fd)
        if counts.dirty != 1:
            return f"{directory} does not account dirty pages (tmpfs?)"
        return None
    finally:
        os.close(fd)
        os.unlink(path)


# --------------------------------------------------------------------------
# Files whose page cache is made of single pages


def page_granular_map(
    path: str, npages: int, fill: bytes = b"\0"
) -> tuple[int, mmap.mmap]:
    """A shared map of a new ``npages``-page file, one folio per page.

    Linux 6.x caches files in large folios (ext4 since 6.16), and dirty
    tracking and write-back work per folio: msync of one page of a 32 KiB
    folio writes all 32 KiB. That is a kernel fact about granularity, not a
    flush of the wrong range, but it hides whether msyncext asked for the
    right pages. So the file's blocks are written and synced, its cache is
    dropped, and the map is read with MADV_RANDOM (no readahead): each fault
    then brings in a single page and each page is dirty on its own.
    Returns (fd, map); the caller closes both.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, fill * (npages * PAGE))
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        if cachestat(fd).cached:
            raise RuntimeError("could not drop the page cache of the new file")
        m = mmap.mmap(fd, npages * PAGE)
        m.madvise(mmap.MADV_RANDOM)
    except BaseException:
        os.close(fd)
        raise
    return fd, m


_FS_IOC_FIEMAP = 0xC020660B
_FIEMAP_FLAG_SYNC = 0x1
_FIEMAP_EXTENT_DELALLOC = 0x4
_FIEMAP_EXTENT_UNWRITTEN = 0x800
_FIEMAP_HEAD = struct.Struct("=QQIIII")
_FIEMAP_EXTENT = struct.Struct("=QQQQQIIII")


def physical_offsets(fd: int, npages: int) -> list[int]:
    """Device byte offset of each file page, from the FIEMAP ioctl."""
    slots = 64
    arg = bytearray(_FIEMAP_HEAD.size + slots * _FIEMAP_EXTENT.size)
    _FIEMAP_HEAD.pack_into(arg, 0, 0, npages * PAGE, _FIEMAP_FLAG_SYNC, 0, slots, 0)
    fcntl.ioctl(fd, _FS_IOC_FIEMAP, arg)
    mapped = _FIEMAP_HEAD.unpack_from(arg, 0)[3]
    where: dict[int, int] = {}
    for i in range(mapped):
        logical, physical, length, _, _, flags, *_ = _FIEMAP_EXTENT.unpack_from(
            arg, _FIEMAP_HEAD.size + i * _FIEMAP_EXTENT.size
        )
        if flags & (_FIEMAP_EXTENT_DELALLOC | _FIEMAP_EXTENT_UNWRITTEN):
            raise RuntimeError(f"extent at {logical} is not written yet ({flags:#x})")
        for done in range(0, length, PAGE):
            where[(logical + done) // PAGE] = physical + done
    missing = [p for p in range(npages) if p not in where]
    if missing:
        raise RuntimeError(f"FIEMAP found no blocks for pages {missing}")
    return [where[p] for p in range(npages)]


# --------------------------------------------------------------------------
# Loop devices


def _run(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}"
        )
    return done.stdout


#: The tests that mount file systems or attach loop devices change the
#: machine's state (briefly, and undone after), so they run only when asked,
#: even as root: CI asks (.ci/run), a developer may.
MOUNTS_VARIABLE = "MSYNCEXT_TEST_MOUNTS"


def mounts_not_asked() -> str | None:
    """Why the tests that mount must not run: not asked for, or None."""
    if os.environ.get(MOUNTS_VARIABLE) != "1":
        return (
            f"set {MOUNTS_VARIABLE}=1 to run tests that mount file systems (needs root)"
        )
    return None


def refuse_unless_asked() -> None:
    # A test that mounts without going through loop_unavailable() (or
    # powercut.fs_unavailable()) first fails here instead of mounting.
    not_asked = mounts_not_asked()
    if not_asked is not None:
        raise RuntimeError(f"a test mounts without checking its gate: {not_asked}")


@functools.cache
def loop_unavailable() -> str | None:
    """Why this machine cannot run the loop-device tests, or None.

    The gate of every test that mounts a file system, a tmpfs included, or
    attaches a loop device: first whether such tests were asked for.
    """
    not_asked = mounts_not_asked()
    if not_asked is not None:
        return not_asked
    if not sys.platform.startswith("linux"):
        return "loop devices and ext4 are Linux-only"
    if os.geteuid() != 0:
        return "needs root to attach loop devices and mount filesystems"
    for tool in ("losetup", "mkfs.ext4", "mount", "umount"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not os.path.exists("/dev/loop-control"):
        return "no /dev/loop-control: the loop driver is not available"
    probe = subprocess.run(
        ["losetup", "--find"], capture_output=True, text=True, timeout=30, check=False
    )
    if probe.returncode != 0:
        return f"losetup --find failed: {probe.stderr.strip()}"
    return None


def retry(action: Callable[[], object], what: str, seconds: float = 10.0) -> None:
    """Run ``action`` until it stops failing (devices let go asynchronously)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            action()
            return
        except RuntimeError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"gave up trying to {what}") from None
            time.sleep(0.1)


def _unmount(mountpoint: str) -> None:
    try:
        retry(lambda: _run("umount", mountpoint), f"unmount {mountpoint}")
    except RuntimeError:
        # Never leave a mount behind: detach it lazily, then still report.
        subprocess.run(["umount", "-l", mountpoint], timeout=60, check=False)
        raise


@dataclass(frozen=True)
class LoopFS:
    """A mounted ext4 filesystem on a loop device over ``backing``."""

    backing: str
    device: str
    mountpoint: str

    def read_device(self, offset: int, length: int) -> bytes:
        """What the device holds at ``offset``: a fresh read of the backing file."""
        with open(self.backing, "rb", buffering=0) as f:
            return os.pread(f.fileno(), length, offset)

    def device_blocks(self) -> Iterator[bytes]:
        """Every 4 KiB block the device holds, in order."""
        with open(self.backing, "rb") as f:
            while block := f.read(4096):
                yield block


@contextlib.contextmanager
def tmpfs(size: str, prefix: str = "msyncext-tmpfs-") -> Iterator[str]:
    """A fresh tmpfs of ``size`` (mount syntax, e.g. ``12m``), unmounted after,
    mounted on a new directory whose name starts with ``prefix``."""
    refuse_unless_asked()
    with contextlib.ExitStack() as stack:
        where = tempfile.mkdtemp(prefix=prefix)
        stack.callback(os.rmdir, where)
        _run(
            "mount",
            "-t",
            "tmpfs",
            "-o",
            f"size={size},mode=0700",
            "msyncext-test",
            where,
        )
        stack.callback(_unmount, where)
        yield where


@contextlib.contextmanager
def loop_ext4(
    size_mib: int = 32,
    *,
    backing_dir: str | None = None,
    mount_options: str = "",
    inodes: int = 1024,
    mkfs_options: tuple[str, ...] = (),
) -> Iterator[LoopFS]:
    """Build, attach and mount a small ext4 with 4 KiB blocks; always undo it.

    mkfs initialises the inode tables and journal up front (no lazy init),
    so no kernel thread writes to the device behind a test's back, and the
    inode count is small so that this costs little. ``mkfs_options`` go to
    mkfs.ext4 as well (e.g. ``("-O", "^has_journal")``).
    """
    refuse_unless_asked()
    with contextlib.ExitStack() as stack:
        workdir = tempfile.mkdtemp(prefix="msyncext-loop-")
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        backing = os.path.join(backing_dir or workdir, "device.img")
        with open(backing, "wb") as f:
            f.truncate(size_mib << 20)
        stack.callback(os.unlink, backing)
        _run(
            "mkfs.ext4", "-q", "-F", "-b", "4096", "-N", str(inodes),
            "-E", "lazy_itable_init=0,lazy_journal_init=0", *mkfs_options, backing,
        )  # fmt: skip
        device = _run("losetup", "--find", "--show", backing).strip()
        # losetup -d only asks: the kernel detaches once the device is
        # unused, so unlinking the backing file and unmounting a tmpfs
        # beneath it are retried by their callbacks.
        stack.callback(
            subprocess.run, ["losetup", "-d", device], timeout=60, check=False
        )
        mountpoint = os.path.join(workdir, "mnt")
        os.mkdir(mountpoint)
        opts = ["-o", mount_options] if mount_options else []
        _run("mount", "-t", "ext4", *opts, device, mountpoint)
        stack.callback(_unmount, mountpoint)
        yield LoopFS(backing, device, mountpoint)


# --------------------------------------------------------------------------
# Running a scenario in a fresh interpreter, so that a crash fails one test


TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def run_isolated(
    module: str,
    function: str,
    *args: str,
    timeout: float = 120,
    python_flags: tuple[str, ...] = (),
) -> subprocess.CompletedProcess[str]:
    """Run ``module.function(*args)`` in a fresh ``python -I``; check it ran.

    The child imports the installed msyncext (``-I`` keeps the source tree
    off sys.path) and this directory's modules by explicit path. A crash
    (a signal) or a non-zero exit fails with the child's output.
    ``python_flags`` go to the interpreter (e.g. ``("-X", "dev")``, whose
    debug allocator makes a use after free fail every time).
    """
    code = (
        f"import sys; sys.path.insert(0, {TESTS_DIR!r}); "
        f"import {module}; {module}.{function}(*sys.argv[1:])"
    )
    done = subprocess.run(
        [sys.executable, "-I", "-X", "faulthandler", *python_flags, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        how = (
            f"was killed by signal {-done.returncode}"
            if done.returncode < 0
            else f"exited with {done.returncode}"
        )
        raise AssertionError(
            f"{module}.{function}{args} {how}\n--- stdout\n{done.stdout}\n"
            f"--- stderr\n{done.stderr}"
        )
    return done
