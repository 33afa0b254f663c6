"""errfs: a FUSE passthrough file system whose writes fail with a chosen errno.

The kernel reports a failed write-back with whatever errno the storage gave,
and a FUSE daemon can give any errno. So msync(2) on a file of this file
system fails with the errno a test chooses: EIO, ENOSPC, EINVAL, ENOMEM,
EBUSY, EROFS, EDQUOT... which a loop device cannot produce on demand.

As a script (``python errfs.py BACKING_DIR MOUNTPOINT [CONTROL_FILE]``) it
serves BACKING_DIR at MOUNTPOINT, in the foreground and single-threaded
(needs mfusepy and libfuse). Every file operation goes to the backing
directory. The control file (default: ``control`` beside BACKING_DIR, so
outside the mount) decides the failures, and is read on every write and
fsync::

    (missing or empty)   everything works
    EINVAL               WRITE and FSYNC requests answer EINVAL
    EINVAL write         only WRITE requests fail (FSYNC answers 0)
    EINVAL fsync         only FSYNC requests fail (the data is written)
    EIO write once       the next WRITE fails, then the daemon removes this
                         line from the control file (a transient failure)
    delay 1.5 fsync      every FSYNC is answered 1.5 s late (WRITE and FSYNC
                         without a list): a slow device

One line of each kind at most; a delay line goes with an errno line or
alone. A failed WRITE leaves the backing file as it was. ``--events FILE``
appends a line per WRITE, FSYNC and FLUSH request with its answer.

For the tests, ``errfs(directory)`` mounts one in a daemon process of its
own (msync waits for the daemon: a daemon that needed the flushing process's
GIL would deadlock) and always unmounts it and ends the daemon. Code that
touches the mount is best run in a child process, ``ErrFS.run_isolated``:
a process waiting for write-back is in uninterruptible sleep, and only
aborting the FUSE connection frees it if the daemon stops answering.

Not a test module: tests/ is on sys.path, so the tests ``import errfs``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import functools
import importlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
FSNAME = "errfs"  # the mount's source and subtype: findmnt shows fuse.errfs
FUSECTL = "/sys/fs/fuse/connections"
ENABLE_VARIABLE = "MSYNCEXT_TEST_MOUNTS"
_OPS = ("write", "fsync")
# Open flags the backing file must not get: the kernel sends the offset of
# every write, so O_APPEND must not move it again; O_DIRECT would impose its
# alignment on the backing file.
_DROPPED = os.O_APPEND | getattr(os, "O_DIRECT", 0)

# --------------------------------------------------------------------------
# Can this machine run it?


@functools.cache
def errfs_unavailable() -> str | None:
    """Why this machine cannot run errfs tests, or None if it can."""
    if not sys.platform.startswith("linux"):
        return "errfs needs Linux FUSE"
    if os.environ.get(ENABLE_VARIABLE) != "1":
        return (
            f"set {ENABLE_VARIABLE}=1 to run tests that mount file systems (needs root)"
        )
    if os.geteuid() != 0:
        return "errfs tests need root (to mount, and to abort a hung FUSE connection)"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse: the fuse module is not loaded or not exposed here"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed (Debian: apt-get install fuse3)"
    # The daemon's own interpreter, as the daemon runs it: importing mfusepy
    # loads libfuse, and fails if libfuse is missing.
    probe = subprocess.run(
        [sys.executable, "-I", "-c", "import mfusepy"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if probe.returncode != 0:
        lines = probe.stderr.strip().splitlines() or ["(no output)"]
        return f"cannot import mfusepy (it needs libfuse): {lines[-1]}"
    return None


# --------------------------------------------------------------------------
# The daemon's side


def _errno_value(name: str) -> int:
    """The errno called ``name`` (or written as a number), checked."""
    value = int(name) if name.isdigit() else getattr(errno, name, None)
    # The kernel refuses replies with an error of 512 or more: the request
    # would never be answered.
    if not isinstance(value, int) or not 0 < value < 512:
        raise ValueError(f"not an errno name: {name!r}")
    return value


class Control(NamedTuple):
    """What a control file asks of the daemon."""

    errors: dict[str, int]  # operation: the errno to answer
    once: bool  # answer an error once, then forget the errno line
    delays: dict[str, float]  # operation: seconds to wait before answering


#: Longer would hold every process waiting on the mount for as long.
MAX_DELAY = 30.0


def _operations(words: list[str]) -> list[str]:
    for op in words:
        if op not in _OPS:
            raise ValueError(f"unknown operation {op!r} (not one of {_OPS})")
    return words or list(_OPS)


def parse(text: str) -> Control:
    """The whole of a control file's text, checked."""
    control = Control({}, False, {})
    for line in text.splitlines():
        words = line.split()
        if not words:
            continue
        if words[0] == "delay":
            try:
                seconds = float(words[1])
            except (IndexError, ValueError):
                raise ValueError(f"delay needs a number of seconds: {line!r}") from None
            if not 0 <= seconds <= MAX_DELAY:
                raise ValueError(f"delay {seconds} is not within 0..{MAX_DELAY} s")
            control.delays.update(dict.fromkeys(_operations(words[2:]), seconds))
            continue
        name, *ops = words
        value = _errno_value(name)
        once = "once" in ops
        ops = [op for op in ops if op != "once"]
        control.errors.update(dict.fromkeys(_operations(ops), value))
        control = control._replace(once=control.once or once)
    return control


def parse_control(text: str) -> dict[str, int]:
    """The failures a control file's text asks for: {operation: errno}."""
    return parse(text).errors


def _without_errors(text: str) -> str:
    """The control file's text once a ``once`` failure has been answered."""
    return "".join(
        line + "\n" for line in text.splitlines() if line.split()[:1] == ["delay"]
    )


class Passthrough:
    """mfusepy operations: every call goes to a file of the backing directory.

    Not a subclass of mfusepy.Operations, so that this module imports without
    mfusepy; mfusepy.FUSE looks the operations up by name, and the ones not
    defined here are left to libfuse (which answers ENOSYS).
    """

    use_ns = True  # nanosecond times (mfusepy warns without it)

    def __init__(self, root: str, control: str, events: str | None) -> None:
        self.root = root
        self.control = control
        self.events = (
            None
            if events is None
            else os.open(events, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        )

    def _real(self, path: str) -> str:
        return os.path.join(self.root, path.lstrip("/"))

    def _control(self) -> tuple[str, Control]:
        """The control file's text and what it asks for."""
        try:
            with open(self.control, encoding="ascii") as f:
                text = f.read()
        except FileNotFoundError:
            return "", Control({}, False, {})
        try:
            return text, parse(text)
        except ValueError as exc:
            print(f"errfs: bad control file {self.control}: {exc}", file=sys.stderr)
            return text, Control(dict.fromkeys(_OPS, errno.EIO), False, {})

    def _event(self, op: str, path: str, detail: str, err: int) -> None:
        if self.events is not None:
            answer = errno.errorcode.get(err, str(err)) if err else "ok"
            line = "\t".join((op, path, detail, answer))
            os.write(self.events, f"{line}\n".encode(errors="surrogateescape"))

    def _check(self, op: str, path: str, detail: str) -> None:
        text, control = self._control()
        delay = control.delays.get(op, 0.0)
        if delay:
            time.sleep(delay)  # single-threaded: every request waits as long
        err = control.errors.get(op, 0)
        if err and control.once:
            new = f"{self.control}.daemon"
            with open(new, "w", encoding="ascii") as f:
                f.write(_without_errors(text))
            os.replace(new, self.control)
        self._event(op, path, detail, err)
        if err:
            raise OSError(err, os.strerror(err))

    # Metadata

    def getattr(self, path: str, fh: int | None = None) -> dict[str, int]:
        st = os.lstat(self._real(path))
        return {
            "st_mode": st.st_mode,
            "st_ino": st.st_ino,
            "st_nlink": st.st_nlink,
            "st_uid": st.st_uid,
            "st_gid": st.st_gid,
            "st_size": st.st_size,
            "st_blocks": st.st_blocks,
            "st_atime": st.st_atime_ns,
            "st_mtime": st.st_mtime_ns,
            "st_ctime": st.st_ctime_ns,
        }

    def readdir(self, path: str, fh: int) -> list[str]:
        return [".", "..", *os.listdir(self._real(path))]

    def statfs(self, path: str) -> dict[str, int]:
        sv = os.statvfs(self._real(path))
        return {
            key: getattr(sv, key)
            for key in (
                "f_bsize",
                "f_frsize",
                "f_blocks",
                "f_bfree",
                "f_bavail",
                "f_files",
                "f_ffree",
                "f_favail",
                "f_namemax",
            )
        }

    def mkdir(self, path: str, mode: int) -> int:
        os.mkdir(self._real(path), mode)
        return 0

    def rmdir(self, path: str) -> int:
        os.rmdir(self._real(path))
        return 0

    def unlink(self, path: str) -> int:
        os.unlink(self._real(path))
        return 0

    def rename(self, old: str, new: str) -> int:
        os.rename(self._real(old), self._real(new))
        return 0

    def truncate(self, path: str, length: int, fh: int | None = None) -> int:
        if fh is None:
            os.truncate(self._real(path), length)
        else:
            os.ftruncate(fh, length)
        return 0

    # Open files: the handle is the backing file's descriptor.

    def create(self, path: str, mode: int, flags: int) -> int:
        return os.open(self._real(path), (flags & ~_DROPPED) | os.O_CREAT, mode)

    def open(self, path: str, flags: int) -> int:
        return os.open(self._real(path), flags & ~_DROPPED)

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        return os.pread(fh, size, offset)

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        self._check("write", path, f"offset={offset} size={len(data)}")
        return os.pwrite(fh, data, offset)

    def fsync(self, path: str, datasync: int, fh: int) -> int:
        self._check("fsync", path, f"datasync={datasync}")
        if datasync:
            os.fdatasync(fh)
        else:
            os.fsync(fh)
        return 0

    def flush(self, path: str, fh: int) -> int:
        self._event("flush", path, "-", 0)
        return 0

    def release(self, path: str, fh: int) -> int:
        os.close(fh)
        return 0


def _die_with_parent(parent: int) -> None:
    """SIGTERM this process when ``parent`` dies (libfuse then unmounts)."""
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # it died before the prctl
        sys.exit("errfs: the parent process is gone")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "errfs").split("\n")[0])
    parser.add_argument("backing", help="directory whose files are served")
    parser.add_argument("mountpoint")
    parser.add_argument(
        "control",
        nargs="?",
        help="file naming the errno to answer (default: BACKING/../control)",
    )
    parser.add_argument("--events", help="append a line per write/fsync/flush here")
    parser.add_argument(
        "--parent-pid",
        type=int,
        help="unmount and exit when this process (the one that started us) dies",
    )
    parser.add_argument("--debug", action="store_true", help="libfuse's -d trace")
    args = parser.parse_args(argv)

    backing = os.path.abspath(args.backing)
    control = args.control or os.path.join(os.path.dirname(backing), "control")
    if args.parent_pid is not None:
        _die_with_parent(args.parent_pid)
    # Imported here: the tests import this module without needing mfusepy.
    mfusepy = importlib.import_module("mfusepy")
    mfusepy.FUSE(
        Passthrough(backing, os.path.abspath(control), args.events),
        args.mountpoint,
        foreground=True,
        nothreads=True,
        debug=args.debug,
        fsname=FSNAME,
        subtype=FSNAME,
    )
    return 0


# --------------------------------------------------------------------------
# The tests' side


class Event(NamedTuple):
    """One request the daemon answered (from its --events file)."""

    op: str  # "write", "fsync" or "flush"
    path: str  # inside the mount, e.g. "/data.bin"
    detail: str  # "offset=0 size=4096", "datasync=1" or "-"
    answer: str  # "ok" or the errno's name


class _Mount(NamedTuple):
    device: tuple[int, int]
    fstype: str


def _mounts(mountpoint: str) -> list[_Mount]:
    """The mounts at ``mountpoint``, from /proc/self/mountinfo (which, unlike
    stat, never asks the file system anything: a hung daemon cannot hang it)."""
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            where = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[4])
            if where == mountpoint:
                major, minor = fields[2].split(":")
                fstype = fields[fields.index("-") + 1]
                found.append(_Mount((int(major), int(minor)), fstype))
    return found


def _run(*argv: str, timeout: float = 10) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as exc:
        return subprocess.CompletedProcess(argv, -1, "", f"timed out: {exc}")


@dataclass(frozen=True)
class ErrFS:
    """An errfs laid out in ``directory``: ``backing/`` served at ``mnt/``,
    ``control`` and ``events`` beside them, ``daemon.log`` for its output.

    Any process can make one from the directory and arm or heal the mount
    (the control file is all the state there is); errfs() runs the daemon.
    """

    directory: Path
    # Known to the process that mounted it (errfs()): the FUSE connection's
    # number under /sys/fs/fuse/connections, and the daemon's pid.
    connection: int | None = field(default=None, compare=False)
    daemon_pid: int | None = field(default=None, compare=False)

    @property
    def mountpoint(self) -> Path:
        return self.directory / "mnt"

    @property
    def backing(self) -> Path:
        return self.directory / "backing"

    @property
    def control(self) -> Path:
        return self.directory / "control"

    @property
    def events_file(self) -> Path:
        return self.directory / "events"

    @property
    def log(self) -> Path:
        return self.directory / "daemon.log"

    def _set_control(self, text: str) -> None:
        # Refuse what the daemon would not understand, and ENOSYS for FSYNC:
        # the kernel takes it as "no fsync here", answers 0 and never sends
        # FSYNC on this mount again.
        if parse_control(text).get("fsync") == errno.ENOSYS:
            raise ValueError("ENOSYS to FSYNC would turn fsync off for the mount")
        new = self.control.with_name(f".control-{os.getpid()}")
        new.write_text(text, encoding="ascii")
        os.replace(new, self.control)  # the daemon never reads half a file

    def fail_writes(
        self,
        errno_name: str,
        *,
        fsync: bool = True,
        once: bool = False,
        delay: float = 0.0,
    ) -> None:
        """Answer ``errno_name`` to every WRITE (write-back and write(2)) and,
        unless ``fsync=False``, to every FSYNC (msync(MS_SYNC) sends one even
        for clean pages). With ``fsync=False`` a retried msync shows what the
        kernel reports once the failed pages are clean: 0. With ``once=True``
        only the next such request fails; then the daemon heals itself. With
        ``delay``, those requests are answered that many seconds late."""
        ops = " write fsync" if fsync else " write"
        text = f"{errno_name}{ops}{' once' if once else ''}\n"
        self._set_control(text + (f"delay {delay}{ops}\n" if delay else ""))

    def fail_fsync(self, errno_name: str) -> None:
        """Answer ``errno_name`` to every FSYNC only: the data is written, the
        flush that follows fails (like a failing device cache flush)."""
        self._set_control(f"{errno_name} fsync\n")

    def slow(self, seconds: float, *, write: bool = True, fsync: bool = True) -> None:
        """Answer every WRITE and FSYNC (or only the ones asked for)
        ``seconds`` late, successfully: an msync that takes that long."""
        ops = " write" * write + " fsync" * fsync
        if not ops:
            raise ValueError("slow() needs write or fsync")
        self._set_control(f"delay {seconds}{ops}\n")

    def heal(self) -> None:
        """Let every request succeed, at once, again."""
        self._set_control("")

    def events(self) -> list[Event]:
        """Every WRITE, FSYNC and FLUSH the daemon answered, in order."""
        try:
            text = self.events_file.read_text(
                encoding="utf-8", errors="surrogateescape"
            )
        except FileNotFoundError:
            return []
        return [Event(*line.split("\t")) for line in text.splitlines()]

    def mounted(self) -> bool:
        return any(m.fstype.startswith("fuse") for m in _mounts(str(self.mountpoint)))

    def abort(self) -> bool:
        """Abort the FUSE connection: every waiting request fails at once
        (ECONNABORTED), uninterruptible waiters included. True if done."""
        if self.connection is None:
            return False
        return _abort_connection(self.connection)

    def run_isolated(
        self, module: str, function: str, *args: str, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run ``module.function(*args)`` (a module of tests/) in a fresh
        ``python -I``, bounded by ``timeout`` seconds; check it succeeded.

        A child stuck on the mount (waiting for write-back, in uninterruptible
        sleep) survives SIGKILL; then the FUSE connection is aborted, which
        frees it. Either way a hang fails with the child's output.
        """
        code = (
            "import faulthandler, sys; "
            f"faulthandler.dump_traceback_later({max(timeout - 5, 1)!r}); "
            f"sys.path.insert(0, {TESTS_DIR!r}); "
            f"import {module}; {module}.{function}(*sys.argv[1:])"
        )
        child = subprocess.Popen(
            [sys.executable, "-I", "-X", "faulthandler", "-c", code, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        how = ""
        try:
            out, err = child.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            how = f"hung for {timeout} s and was killed"
            child.kill()
            try:
                out, err = child.communicate(timeout=3)
            except subprocess.TimeoutExpired:
                aborted = self.abort()
                how += "; it survived SIGKILL (waiting on FUSE), " + (
                    "connection aborted"
                    if aborted
                    else "could not abort the connection"
                )
                out, err = child.communicate(timeout=30)
        if child.returncode < 0 and not how:
            how = f"was killed by signal {-child.returncode}"
        elif child.returncode > 0:
            how = f"exited with {child.returncode}"
        if how:
            raise AssertionError(
                f"{module}.{function}{args} {how}\n--- stdout\n{out}\n--- stderr\n{err}"
            )
        return subprocess.CompletedProcess(child.args, child.returncode, out, err)


def _fusectl_mount() -> bool:
    """Mount fusectl if it is not; True if this call mounted it."""
    if any(m.fstype == "fusectl" for m in _mounts(FUSECTL)):
        return False
    done = _run("mount", "-t", "fusectl", "none", FUSECTL)
    return done.returncode == 0


def _abort_connection(connection: int) -> bool:
    mounted_here = _fusectl_mount()
    try:
        with open(os.path.join(FUSECTL, str(connection), "abort"), "w") as f:
            f.write("1")
        return True
    except OSError:
        return False  # already gone, or no fusectl
    finally:
        if mounted_here:
            _run("umount", FUSECTL)


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        return f"(no daemon log: {exc})"
    return "\n".join(text.splitlines()[-lines:])


def _stop_daemon(daemon: subprocess.Popen[bytes], fs: ErrFS) -> str | None:
    """End the daemon whatever its state; what went wrong, or None."""
    with contextlib.suppress(ProcessLookupError):
        daemon.send_signal(signal.SIGCONT)  # a stopped daemon must run to exit
    with contextlib.suppress(subprocess.TimeoutExpired):
        daemon.wait(timeout=5)  # an unmount ends its loop by itself
        return None
    daemon.terminate()  # libfuse's handler: leave the loop, unmount
    with contextlib.suppress(subprocess.TimeoutExpired):
        daemon.wait(timeout=5)
        return None
    daemon.kill()  # closes /dev/fuse: the kernel aborts the connection
    with contextlib.suppress(subprocess.TimeoutExpired):
        daemon.wait(timeout=5)
        return "the daemon ignored SIGTERM and was killed"
    fs.abort()  # it hangs in the kernel: free whatever it waits for
    try:
        daemon.wait(timeout=30)
    except subprocess.TimeoutExpired:
        return f"the daemon (pid {daemon.pid}) survives SIGKILL"
    return "the daemon hung in the kernel; its connection was aborted"


def _unmount(mountpoint: str) -> str | None:
    """Unmount, lazily if it is busy; what went wrong, or None."""
    if not any(m.fstype.startswith("fuse") for m in _mounts(mountpoint)):
        return None
    done = _run("fusermount3", "-u", mountpoint)
    if done.returncode == 0:
        return None
    # Busy (a process still has a file open): detach it from the tree now;
    # the kernel drops it when its last user goes.
    problem = f"fusermount3 -u failed: {done.stderr.strip()}; detached lazily"
    for argv in (("fusermount3", "-u", "-z", mountpoint), ("umount", "-l", mountpoint)):
        _run(*argv)
        if not any(m.fstype.startswith("fuse") for m in _mounts(mountpoint)):
            return problem
    return f"{mountpoint} stays mounted: {done.stderr.strip()}"


@contextlib.contextmanager
def errfs(directory: Path, *, timeout: float = 10) -> Iterator[ErrFS]:
    """Mount an errfs laid out in ``directory`` (see ErrFS); always undo it.

    The daemon runs ``sys.executable`` in a process of its own, which also
    unmounts and exits if this process dies (strictly: the thread that
    entered this context, PR_SET_PDEATHSIG's parent, so enter and leave it
    in one thread). Waits up to ``timeout`` seconds
    for the mount; on the way out unmounts (lazily if busy), ends the daemon
    (SIGTERM, SIGKILL, then aborting its connection), and raises if anything
    was left behind.
    """
    fs = ErrFS(Path(os.path.realpath(directory)))
    fs.backing.mkdir(parents=True, exist_ok=True)
    fs.mountpoint.mkdir(exist_ok=True)
    fs.heal()
    fs.events_file.unlink(missing_ok=True)
    mountpoint = str(fs.mountpoint)
    with fs.log.open("wb") as log:
        daemon = subprocess.Popen(
            [
                sys.executable, "-I", os.path.abspath(__file__),
                str(fs.backing), mountpoint, str(fs.control),
                "--events", str(fs.events_file),
                "--parent-pid", str(os.getpid()),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + timeout
        while not (mounts := _mounts(mountpoint)):
            if daemon.poll() is not None:
                raise RuntimeError(
                    f"errfs daemon exited with {daemon.returncode} before "
                    f"mounting:\n{_log_tail(fs.log)}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"errfs did not mount within {timeout} s:\n{_log_tail(fs.log)}"
                )
            time.sleep(0.02)
        major, minor = mounts[-1].device
        # fusectl names a connection by the superblock's kernel dev_t, which
        # is the minor number for an anonymous device (major 0).
        fs = ErrFS(fs.directory, minor if major == 0 else None, daemon.pid)
        yield fs
    finally:
        problems = [
            problem
            for problem in (
                _unmount(mountpoint),
                _stop_daemon(daemon, fs),
                _unmount(mountpoint),  # a dead daemon may leave a stale mount
            )
            if problem is not None
        ]
        for problem in problems:  # shown with the test's output
            print(f"errfs {mountpoint}: {problem}", file=sys.stderr)
        if _mounts(mountpoint) or daemon.poll() is None:
            raise RuntimeError(
                f"errfs left a mount or its daemon behind: {'; '.join(problems)}"
            )


if __name__ == "__main__":
    sys.exit(main())
