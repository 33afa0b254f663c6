"""``python -m msyncext [PATH]``: what to paste into a bug report.

Without PATH: msyncext's version and build, the Python running it, the
platform, the page size, the flags this platform's msync accepts and how
write-back failures are tracked. With PATH: also maps that file read-only,
names its file system and times MS_SYNC flushes of its (clean) pages. The
file is never written: a read-only map has no dirty pages of its own, so
the flushes only ask the kernel to write back what others left dirty.
"""

import argparse
import errno
import mmap
import os
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


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo (octal).
    return field.encode().decode("unicode_escape")


def file_system(path: str) -> str:
    """The file system holding ``path``: type, source, mount point, options."""
    real = os.path.realpath(path)
    try:
        with open("/proc/self/mountinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        st = os.statvfs(real)
        return (
            f"unknown (no /proc/self/mountinfo); block size {st.f_bsize}, "
            f"{st.f_bavail * st.f_frsize} bytes free"
        )
    best: tuple[str, str] | None = None
    for line in lines:
        # id parent dev root mountpoint options [optional...] - type source super
        left, _, right = line.partition(" - ")
        fields = left.split()
        point = _unescape(fields[4])
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        # The longest mount point wins; of equal ones the last (the topmost).
        if inside and (best is None or len(point) >= len(best[0])):
            fstype, source, *_ = [*right.split(), "", ""]
            best = (point, f"{fstype} ({_unescape(source)}), options {fields[5]}")
    if best is None:
        return "unknown (no mount in /proc/self/mountinfo holds it)"
    point, what = best
    return f"{what}, mounted at {point}"


def _median_us(call: "Callable[[], object]", repeat: int = REPEAT) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter_ns()
        call()
        times.append(time.perf_counter_ns() - started)
    return sorted(times)[len(times) // 2] / 1000


def _fail(parser: argparse.ArgumentParser, message: str) -> "NoReturn":
    parser.exit(2, f"{parser.prog}: error: {message}\n")


def open_file(parser: argparse.ArgumentParser, path: str) -> tuple[int, bool, int]:
    """A descriptor of ``path``, whether it is open for writing, and its size.

    Writable if allowed, though nothing is written: Linux drops the shared
    flag of a map of a read-only descriptor, and msync then syncs nothing,
    which would time the call and not the disk. The map itself is read-only.
    Exits with status 2 and a message if ``path`` cannot be mapped.
    """
    writable = True
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ETXTBSY):
            _fail(parser, f"cannot open {path}: {exc.strerror}")
        writable = False
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            _fail(parser, f"cannot open {path}: {exc.strerror}")
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        _fail(parser, f"{path} is not a regular file")
    if st.st_size == 0:
        os.close(fd)
        _fail(
            parser,
            f"{path} is empty: there is nothing to map (give a file of at "
            "least one byte; it is read, never written)",
        )
    return fd, writable, st.st_size


def report_file(path: str, fd: int, writable: bool, size: int) -> None:
    with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as m:
        pages = -(-size // msyncext.PAGESIZE)
        _row("file", f"{path} ({size} bytes, {pages} pages)")
        _row("file system", file_system(path))
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
    if not writable:
        print(
            "  (the file is not writable here, so it was mapped from a "
            "read-only descriptor: Linux then syncs nothing, and these "
            "times are the call's, not the disk's)"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m msyncext",
        description="Print what msyncext sees here, for a bug report. With "
        "PATH, also map that file read-only, name its file system and time "
        "MS_SYNC flushes of it (the file is never written).",
    )
    parser.add_argument(
        "path", nargs="?", help="an existing, non-empty file on the file system"
    )
    args = parser.parse_args(argv)
    # A path that cannot be mapped fails before anything is printed.
    opened = open_file(parser, args.path) if args.path is not None else None
    report_environment()
    if opened is not None:
        print()
        try:
            report_file(args.path, *opened)
        finally:
            os.close(opened[0])


if __name__ == "__main__":
    main()
