"""``python -m msyncext [--time] [PATH]``: what to paste into a bug report.

Without PATH: msyncext's version and build, the Python running it, the
platform, the page size, the flags this platform's msync accepts and how
write-back failures are tracked. With PATH: also names the file system that
holds that regular file and maps it read-only from a read-only descriptor;
nothing is written or flushed, and nothing that can block is opened (FIFOs,
devices and pseudo-files are refused before any open).

``--time`` also times MS_SYNC flushes of the file. That needs a descriptor
open for writing (Linux drops the shared flag of a map of a read-only
descriptor, and msync then syncs nothing), which reaches beyond this
process: closing it sends IN_CLOSE_WRITE to inotify watchers, opening it
breaks other processes' leases on the file, and the first whole-file MS_SYNC
writes back every page other processes left dirty in the file. So it is
asked for, never the default. The file's bytes are never changed.
"""

import argparse
import errno
import mmap
import os
import re
import stat
import sys
import time

import msyncext
from msyncext import _msync

TYPE_CHECKING = False  # as in __init__.py: typing is not imported at run time
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import NoReturn

REPEAT = 7  # flushes timed per measurement; the median is shown

TRACKING = {
    "PROCMAP_QUERY": "per file (device, inode), each mapping looked up with "
    "this ioctl (Linux 6.11+)",
    "/proc/self/maps": "per file (device, inode), each mapping looked up by "
    "parsing it (no PROCMAP_QUERY here)",
    "none": "no way to tell a mapping's file here: while a failure is "
    "recorded, every flush is refused",
}

# File systems whose files the kernel makes up as they are read: no page
# cache behind them, so nothing for msync to write back (most cannot even
# be mapped).
PSEUDO_FILE_SYSTEMS = frozenset(
    {
        "proc",
        "sysfs",
        "debugfs",
        "tracefs",
        "securityfs",
        "cgroup",
        "cgroup2",
        "configfs",
        "bpf",
        "pstore",
        "efivarfs",
        "fusectl",
        "binfmt_misc",
        "selinuxfs",
        "nsfs",
    }
)
# File systems that keep files in memory only: nothing on them is durable.
MEMORY_ONLY = frozenset({"tmpfs", "ramfs", "devtmpfs"})

TIME_HELP = (
    "also time MS_SYNC flushes of PATH. This opens PATH read-write (its bytes "
    "are never changed), which other processes can see: closing it sends "
    "IN_CLOSE_WRITE to inotify watchers (build tools, sync clients), opening "
    "it breaks other processes' leases on the file, and the first whole-file "
    "MS_SYNC writes back every page other processes left dirty in it (on ext4 "
    "with a device cache flush). Without --time the file is opened read-only "
    "and nothing is flushed."
)


def _row(label: str, value: object) -> None:
    print(f"{label + ':':<21}{value}")


def _flag_names() -> dict[int, str]:
    # By value, never by bit tests: MS_SYNC is 0 on FreeBSD.
    sync, asynchronous = msyncext.MS_SYNC, msyncext.MS_ASYNC
    invalidate = msyncext.MS_INVALIDATE
    return {
        sync: "MS_SYNC",
        asynchronous: "MS_ASYNC",
        sync | invalidate: "MS_SYNC | MS_INVALIDATE",
        asynchronous | invalidate: "MS_ASYNC | MS_INVALIDATE",
    }


def _gil() -> str:
    import sysconfig

    free_threaded = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))
    is_enabled = getattr(sys, "_is_gil_enabled", None)
    now = "on" if is_enabled is None or is_enabled() else "off"
    build = "free-threaded build" if free_threaded else "GIL build"
    return f"{build}, GIL {now} now"


def report_environment() -> None:
    version = sys.version.replace("\n", " ")
    uname = os.uname()
    tracking = getattr(_msync, "writeback_tracking", None)
    how = tracking() if tracking is not None else "unknown"
    names = _flag_names()
    _row("msyncext", f"{msyncext.__version__} ({_msync.BUILD_MODE} build)")
    _row("extension", _msync.__file__)
    _row("python", f"{sys.implementation.name} {version}")
    _row("threading", _gil())
    _row("platform", f"{uname.sysname} {uname.release} {uname.machine}")
    _row("kernel build", uname.version)
    _row("PAGESIZE", msyncext.PAGESIZE)
    _row(
        "constants",
        ", ".join(
            f"{name}={getattr(msyncext, name)}"
            for name in ("MS_SYNC", "MS_ASYNC", "MS_INVALIDATE")
        ),
    )
    _row(
        "VALID_FLAGS",
        ", ".join(f"{names[v]} ({v})" for v in sorted(msyncext.VALID_FLAGS)),
    )
    _row("write-back failures", f"{how}: {TRACKING.get(how, 'unknown')}")
    _row("MS_ASYNC write-out", _write_out())


def _write_out() -> str:
    """Whether MS_ASYNC starts the write-out here, and where it does not."""
    status = getattr(_msync, "writeout_status", None)
    state, why = status() if status is not None else ("unavailable", "unknown")
    if state != "available":
        return f"not started here ({why}): MS_ASYNC is the kernel's own"
    return (
        "started by a background thread with a descriptor table of its own; "
        "not for files on FUSE, NFS or SMB, under a lease, deleted, or with a "
        "file system mounted over their path"
    )


class Mount:
    """A line of /proc/self/mountinfo: what is mounted where."""

    __slots__ = ("fstype", "options", "point", "source")

    def __init__(self, fstype: str, source: str, options: str, point: str) -> None:
        self.fstype, self.source, self.options, self.point = (
            fstype,
            source,
            options,
            point,
        )


_OCTAL_ESCAPE = re.compile(rb"\\([0-7]{3})")


def _unescape(field: bytes) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo (octal
    # bytes); the rest of a path is its bytes as they are, UTF-8 or not.
    raw = _OCTAL_ESCAPE.sub(lambda m: bytes([int(m[1], 8)]), field)
    return os.fsdecode(raw)


def find_mount(path: str) -> Mount | None:
    """The mount that holds ``path`` (the longest mount point above it, the
    topmost of equal ones), from /proc/self/mountinfo; None if none shows it.
    Raises OSError if mountinfo cannot be read."""
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo", "rb") as f:
        lines = f.read().splitlines()
    best = None
    for line in lines:
        # id parent dev root mountpoint options [optional...] - type source super
        left, _, right = line.partition(b" - ")
        fields = left.split()
        point = _unescape(fields[4])
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= len(best.point)):
            fstype, source, *_ = [*right.split(), b"", b""]
            best = Mount(
                _unescape(fstype),
                _unescape(source),
                _unescape(fields[5]),
                point,
            )
    if best is None and os.stat(real).st_dev == os.stat("/").st_dev:
        # In a chroot, mountinfo lists only the mounts below the root, not
        # the one that holds the root itself: this file is on that one.
        best = Mount(
            "unknown",
            "the mount that holds this chroot's root, which mountinfo does not list",
            "unknown",
            "/",
        )
    return best


def _kind(mode: int) -> str:
    """What a non-regular file is, for a message."""
    kinds = (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    )
    return next((what for test, what in kinds if test(mode)), "not a file")


def _median_us(call: "Callable[[], object]", repeat: int = REPEAT) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter_ns()
        call()
        times.append(time.perf_counter_ns() - started)
    return sorted(times)[len(times) // 2] / 1000


def _fail(parser: argparse.ArgumentParser, message: str) -> "NoReturn":
    parser.exit(2, f"{parser.prog}: error: {message}\n")


class Target:
    """An open, mapped regular file, and where it lives."""

    def __init__(
        self,
        path: str,
        fd: int,
        m: mmap.mmap,
        writable: bool,
        mount: Mount | None,
        mount_error: str | None,
    ) -> None:
        self.path, self.fd, self.map, self.writable = path, fd, m, writable
        self.mount, self.mount_error = mount, mount_error

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


def _open(path: str, writable: bool) -> int:
    # O_NONBLOCK: should the path have become a FIFO since it was checked,
    # the open still returns at once (the fstat after it refuses it).
    how = os.O_RDWR if writable else os.O_RDONLY
    return os.open(path, how | os.O_NONBLOCK | os.O_NOCTTY)


def open_target(parser: argparse.ArgumentParser, path: str, timed: bool) -> Target:
    """``path`` opened and mapped, or exit with status 2 and a message.

    Checked before any open: a FIFO's open can block, a device's can act.
    Read-only unless ``timed``: only then is a writable descriptor needed
    (see the module's docstring), and it falls back to read-only where the
    file may not be written.
    """
    try:
        before = os.stat(path)
    except OSError as exc:
        _fail(parser, f"cannot open {path}: {exc.strerror}")
    if not stat.S_ISREG(before.st_mode):
        _fail(
            parser,
            f"{path} is not a regular file ({_kind(before.st_mode)}): only a "
            "regular file's pages can be mapped and flushed",
        )
    mount, mount_error = None, None
    try:
        mount = find_mount(path)
    except OSError as exc:
        mount_error = f"no /proc/self/mountinfo: {exc.strerror}"
    if mount is not None and mount.fstype in PSEUDO_FILE_SYSTEMS:
        _fail(
            parser,
            f"{path} is a pseudo-file of {mount.fstype} (mounted at "
            f"{mount.point}): the kernel makes its contents up as it is read, "
            "with no pages of a file behind them, so msync has nothing to do "
            "for it. Give a file on the file system your program maps from.",
        )
    writable = timed
    try:
        fd = _open(path, writable)
    except OSError as exc:
        if not writable or exc.errno not in (
            errno.EACCES,
            errno.EPERM,
            errno.EROFS,
            errno.ETXTBSY,
        ):
            _fail(parser, f"cannot open {path}: {exc.strerror}")
        writable = False
        try:
            fd = _open(path, writable)
        except OSError as exc:
            _fail(parser, f"cannot open {path}: {exc.strerror}")
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        _fail(parser, f"{path} is not a regular file ({_kind(st.st_mode)})")
    if st.st_size == 0:
        os.close(fd)
        maybe = "" if mount is not None else " (or a pseudo-file, as in /proc)"
        _fail(
            parser,
            f"{path} is empty{maybe}: there is nothing to map (give a file "
            "of at least one byte; it is read, never written)",
        )
    try:
        m = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    except OSError as exc:
        os.close(fd)
        _fail(parser, f"cannot map {path}: {exc.strerror}")
    return Target(path, fd, m, writable, mount, mount_error)


def _file_system(target: Target) -> str:
    mount = target.mount
    if mount is None:
        if target.mount_error is not None:
            st = os.statvfs(target.path)
            return (
                f"unknown ({target.mount_error}); block size {st.f_bsize}, "
                f"{st.f_bavail * st.f_frsize} bytes free"
            )
        return "unknown (no mount in /proc/self/mountinfo holds it)"
    return (
        f"{mount.fstype} ({mount.source}), options {mount.options}, "
        f"mounted at {mount.point}"
    )


def report_file(target: Target, timed: bool) -> None:
    size = len(target.map)
    pages = -(-size // msyncext.PAGESIZE)
    fstype = target.mount.fstype if target.mount is not None else None
    memory_only = fstype is not None and fstype in MEMORY_ONLY
    _row("file", f"{target.path} ({size} bytes, {pages} pages)")
    _row("file system", _file_system(target))
    if memory_only:
        print(
            f"  ({fstype} keeps its files in memory only: nothing on it is "
            "durable, whatever is flushed)"
        )
    if not timed:
        _row("flush timings", "not measured (--time measures them: see --help)")
        return
    m = target.map
    try:
        # Writes back what others left dirty, so that the timed flushes
        # find clean pages.
        first = _median_us(lambda: msyncext.flush(m), repeat=1)
        page = _median_us(lambda: msyncext.flush(m, 0, 1))
        whole = _median_us(lambda: msyncext.flush(m))
    except OSError as exc:
        _row("flush", f"failed: {exc!r}")
        return
    _row("first flush", f"{first:.1f} µs (the whole map, as it was)")
    print(f"MS_SYNC flush of clean pages, median of {REPEAT}:")
    _row("  one page", f"{page:.1f} µs")
    _row("  whole map", f"{whole:.1f} µs")
    if memory_only:
        print(
            "  (memory only: no device was written, so these times are the "
            "call's own, and no flush here makes data durable)"
        )
    if not target.writable:
        print(
            "  (the file is not writable here, so it was mapped from a "
            "read-only descriptor: Linux then syncs nothing, and these "
            "times are the call's, not the disk's)"
        )


def main(argv: "list[str] | None" = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m msyncext",
        description="Print what msyncext sees here, for a bug report. With "
        "PATH, also name the file system that holds it and map it read-only "
        "(opened read-only; nothing is written or flushed). With --time as "
        "well, time MS_SYNC flushes of it.",
    )
    parser.add_argument("path", nargs="?", help="an existing, non-empty regular file")
    parser.add_argument("--time", action="store_true", help=TIME_HELP)
    args = parser.parse_args(argv)
    if args.time and args.path is None:
        _fail(parser, "--time needs a PATH to time flushes of")
    # A path that cannot be mapped fails before anything is printed.
    target = (
        open_target(parser, args.path, args.time) if args.path is not None else None
    )
    try:
        report_environment()
        if target is not None:
            print()
            report_file(target, args.time)
    finally:
        if target is not None:
            target.close()


if __name__ == "__main__":
    # Die of SIGPIPE when the reader goes (`| head -1`), as cat or ls do:
    # Python ignores it and would end in a BrokenPipeError traceback.
    import signal

    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    main()
