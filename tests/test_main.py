"""``python -m msyncext [--time] [PATH]``: the diagnostic for bug reports."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import sysconfig
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import blockdev
import pytest

import msyncext
from msyncext import _msync


def _run(
    tmp_path: Path, *args: str, prefix: Sequence[str] = (), timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    # -I and an empty working directory: the installed package, not the
    # source folder (which has no compiled module).
    run_dir = tmp_path / "cwd"
    run_dir.mkdir(exist_ok=True)
    return subprocess.run(
        [*prefix, sys.executable, "-I", "-m", "msyncext", *args],
        cwd=run_dir,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _fields(stdout: str) -> dict[str, str]:
    rows = (
        re.match(r"^(\S[^:]*|  [^:]+):\s+(.*)$", line) for line in stdout.splitlines()
    )
    return {m[1].strip(): m[2] for m in rows if m}


def test_without_a_path(tmp_path: Path) -> None:
    done = _run(tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    got = _fields(done.stdout)
    assert got["msyncext"] == f"{msyncext.__version__} ({_msync.BUILD_MODE} build)"
    assert got["extension"] == _msync.__file__
    assert sys.version.split()[0] in got["python"]
    assert got["PAGESIZE"] == str(msyncext.PAGESIZE)
    # The child imported nothing that needs the GIL: off on free-threaded
    # builds unless PYTHON_GIL=1 turns it on.
    free_threaded = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))
    gil_now = not free_threaded or os.environ.get("PYTHON_GIL") == "1"
    build = "free-threaded build" if free_threaded else "GIL build"
    assert got["threading"] == f"{build}, GIL {'on' if gil_now else 'off'} now"
    assert os.uname().release in got["platform"]
    for value in msyncext.VALID_FLAGS:
        assert f"({value})" in got["VALID_FLAGS"]
    assert "MS_SYNC (" in got["VALID_FLAGS"]
    assert got["write-back failures"].startswith(_msync.writeback_tracking())
    assert got["MS_ASYNC write-out"].startswith(
        "started by a background thread"
    ) or got["MS_ASYNC write-out"].startswith("not started here (")


def test_says_where_ms_async_starts_no_write_out(tmp_path: Path) -> None:
    """Issue 20: where the write-out thread cannot have a descriptor table of
    its own (a seccomp profile refusing close_range), the diagnostic says
    that MS_ASYNC is the kernel's, and why."""
    import test_side_effects

    reason = test_side_effects.seccomp_unavailable()
    if reason is not None:
        pytest.skip(reason)
    code = (
        "import runpy, sys\n"
        f"sys.path.append({str(Path(__file__).parent)!r})\n"
        "import test_side_effects\n"
        "test_side_effects._refuse_close_range()\n"
        "sys.argv = ['msyncext']\n"
        "runpy.run_module('msyncext', run_name='__main__')\n"
    )
    done = subprocess.run(
        [sys.executable, "-I", "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    row = _fields(done.stdout)["MS_ASYNC write-out"]
    assert row.startswith("not started here (close_range(CLOSE_RANGE_UNSHARE)"), row
    assert "Operation not permitted" in row, row


def _digest(path: Path) -> tuple[str, int]:
    return hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns


def _check_file_system(row: str) -> None:
    if os.path.exists("/proc/self/mountinfo"):
        # In a chroot (the CI matrix's) the mount that holds the file may lie
        # outside the root, and mountinfo does not show it: said so, then.
        assert ", mounted at /" in row or row == (
            "unknown (no mount in /proc/self/mountinfo holds it)"
        ), row


def test_with_a_path_reads_only_and_times_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data.bin"
    data.write_bytes(os.urandom(3 * msyncext.PAGESIZE + 5))
    before = _digest(data)
    done = _run(tmp_path, str(data))
    assert done.returncode == 0, done.stderr
    got = _fields(done.stdout)
    assert got["file"] == f"{data} ({3 * msyncext.PAGESIZE + 5} bytes, 4 pages)"
    _check_file_system(got["file system"])
    assert got["flush timings"].startswith("not measured (--time measures them")
    for row in ("first flush", "one page", "whole map"):
        assert row not in got, done.stdout
    assert _digest(data) == before


def test_time_times_flushes_and_writes_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data.bin"
    data.write_bytes(os.urandom(3 * msyncext.PAGESIZE + 5))
    before = _digest(data)
    done = _run(tmp_path, "--time", str(data))
    assert done.returncode == 0, done.stderr
    got = _fields(done.stdout)
    assert got["file"] == f"{data} ({3 * msyncext.PAGESIZE + 5} bytes, 4 pages)"
    _check_file_system(got["file system"])
    for row in ("first flush", "one page", "whole map"):
        assert re.match(r"\d+\.\d µs", got[row]), (row, done.stdout)
    assert "flush timings" not in got
    assert "not writable" not in done.stdout
    assert _digest(data) == before


def test_time_needs_a_path(tmp_path: Path) -> None:
    done = _run(tmp_path, "--time")
    assert done.returncode == 2
    assert done.stdout == ""
    assert "--time needs a PATH" in done.stderr


def test_help_says_what_time_does_to_other_processes(tmp_path: Path) -> None:
    done = _run(tmp_path, "--help")
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())  # argparse wraps it
    assert "opens PATH read-write" in text
    assert "IN_CLOSE_WRITE" in text
    assert "writes back every page other processes left dirty" in text
    assert "Without --time the file is opened read-only" in text


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: None, "cannot open {}: No such file or directory"),
        (lambda p: p.write_bytes(b""), "{} is empty: there is nothing to map"),
        (lambda p: p.mkdir(), "{} is not a regular file (a directory)"),
    ],
    ids=["missing", "empty", "directory"],
)
def test_a_path_that_cannot_be_mapped(
    tmp_path: Path, make: object, message: str
) -> None:
    target = tmp_path / "target"
    assert callable(make)
    make(target)
    done = _run(tmp_path, str(target))
    assert done.returncode == 2
    # Nothing of the report before the error, and the error names the path.
    assert done.stdout == ""
    assert done.stderr.startswith("python -m msyncext: error: ")
    assert message.format(target) in done.stderr
    # Nothing was made.
    if message.startswith("cannot open {}: No such"):
        assert not target.exists()


def test_not_a_regular_file(tmp_path: Path) -> None:
    done = _run(tmp_path, os.devnull)
    assert done.returncode == 2
    assert f"{os.devnull} is not a regular file (a character device)" in done.stderr


@contextlib.contextmanager
def _immutable(path: Path) -> Iterator[None]:
    """``chattr +i``: not even root may open it for writing (or skip)."""
    if shutil.which("chattr") is None or os.geteuid() != 0:
        pytest.skip("needs root and chattr to make a file unwritable for root")
    done = subprocess.run(
        ["chattr", "+i", str(path)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        pytest.skip(f"chattr +i refused here: {done.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_a_file_it_may_not_write_is_still_timed_and_says_so(tmp_path: Path) -> None:
    data = tmp_path / "data.bin"
    data.write_bytes(b"x" * 100)
    with _immutable(data):
        done = _run(tmp_path, "--time", str(data))
    assert done.returncode == 0, done.stderr
    assert "not writable" in done.stdout
    assert "one page:" in done.stdout


# --- what other processes see: inotify ---------------------------------------

IN_OPEN, IN_CLOSE_WRITE, IN_CLOSE_NOWRITE = 0x20, 0x08, 0x10
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of name


@contextlib.contextmanager
def _watching(path: Path) -> Iterator[Callable[[], set[int]]]:
    """Watch ``path`` with inotify; yields a function that returns the event
    masks seen since its last call."""
    if not sys.platform.startswith("linux"):
        pytest.skip("inotify is Linux's")
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    if fd < 0:
        pytest.skip(f"inotify_init1: {os.strerror(ctypes.get_errno())}")
    try:
        mask = IN_OPEN | IN_CLOSE_WRITE | IN_CLOSE_NOWRITE
        wd = libc.inotify_add_watch(fd, os.fsencode(path), mask)
        assert wd >= 0, os.strerror(ctypes.get_errno())

        def events() -> set[int]:
            seen = set()
            while True:
                try:
                    data = os.read(fd, 65536)
                except BlockingIOError:
                    return seen
                at = 0
                while at < len(data):
                    _, event, _, length = _EVENT.unpack_from(data, at)
                    seen.add(event)
                    at += _EVENT.size + length

        yield events
    finally:
        os.close(fd)


def test_no_close_write_for_watchers_without_time(tmp_path: Path) -> None:
    # A build tool or sync client watching the file must not be told it was
    # written: without --time the file is opened read-only.
    data = tmp_path / "watched.bin"
    data.write_bytes(b"x" * 100)
    with _watching(data) as events:
        done = _run(tmp_path, str(data))
        assert done.returncode == 0, done.stderr
        seen = events()
        assert IN_OPEN in seen, seen  # the watch works
        assert IN_CLOSE_NOWRITE in seen, seen
        assert IN_CLOSE_WRITE not in seen, seen
        # --time opens it read-write, as --help says.
        done = _run(tmp_path, "--time", str(data))
        assert done.returncode == 0, done.stderr
        assert IN_CLOSE_WRITE in events()


# --- never hangs, never a traceback ------------------------------------------


def test_a_fifo_is_refused_without_opening_it(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for args in ((str(fifo),), ("--time", str(fifo))):
        done = _run(tmp_path, *args, timeout=60)
        assert done.returncode == 2, done
        assert done.stdout == ""
        assert f"{fifo} is not a regular file (a FIFO (named pipe))" in done.stderr


def test_a_fifo_it_may_read_but_not_write_does_not_hang(tmp_path: Path) -> None:
    # The case that hung: the write open refused, a read open of a FIFO
    # waits for a writer forever. Root is refused by the mode bits alone
    # without CAP_DAC_OVERRIDE: a FIFO of another user's, readable by all,
    # writable by none.
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        pytest.skip("needs root and setpriv to drop CAP_DAC_OVERRIDE")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o444)
    os.chmod(fifo, 0o444)  # whatever the umask
    os.chown(fifo, 65534, 65534)
    drop = [setpriv, "--bounding-set=-dac_override,-dac_read_search", "--"]
    probe = subprocess.run(
        [*drop, sys.executable, "-c", f"import os; os.open({str(fifo)!r}, os.O_RDWR)"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if "PermissionError" not in probe.stderr:
        pytest.skip(f"setpriv did not take the write access away: {probe}")
    done = _run(tmp_path, str(fifo), prefix=drop, timeout=60)
    assert done.returncode == 2, done
    assert f"{fifo} is not a regular file (a FIFO (named pipe))" in done.stderr


@pytest.mark.parametrize("unbuffered", [True, False], ids=["unbuffered", "buffered"])
def test_a_reader_that_goes_away_ends_it_quietly(
    tmp_path: Path, unbuffered: bool
) -> None:
    # `python -m msyncext | head -1` with head gone before the next line:
    # here the read end is closed before anything is written. It dies of
    # SIGPIPE, as cat does, without a BrokenPipeError traceback. -u is
    # PYTHONUNBUFFERED=1, which -I would ignore.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run(
            [sys.executable, "-I", *(["-u"] if unbuffered else []), "-m", "msyncext"],
            cwd=tmp_path,
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        os.close(write_end)
    assert done.stderr == ""
    assert done.returncode == -signal.SIGPIPE


# --- file systems: pseudo-files, memory only, escaped mount points ------------


def _mounted_type(point: str) -> str | None:
    """The type of the file system mounted at exactly ``point`` (a plain
    path), the topmost if several; None if nothing is."""
    try:
        with open("/proc/self/mountinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    found = None
    for line in lines:
        left, _, right = line.partition(" - ")
        if left.split()[4] == point:
            found = right.split()[0]
    return found


def _pseudo_file(fstype: str, point: str, candidates: Sequence[str]) -> str:
    if _mounted_type(point) != fstype:
        pytest.skip(f"no {fstype} mounted at {point} here")
    for path in candidates:
        if os.path.isfile(path):
            return path
    pytest.skip(f"none of {candidates} here")


@pytest.mark.parametrize(
    ("fstype", "point", "candidates"),
    [
        ("proc", "/proc", ["/proc/self/status", "/proc/version"]),
        (
            "sysfs",
            "/sys",
            [
                "/sys/kernel/mm/transparent_hugepage/enabled",
                "/sys/kernel/uevent_seqnum",
                "/sys/power/state",
            ],
        ),
    ],
)
def test_a_pseudo_file_is_named_so(
    tmp_path: Path, fstype: str, point: str, candidates: list[str]
) -> None:
    path = _pseudo_file(fstype, point, candidates)
    for args in ((path,), ("--time", path)):
        done = _run(tmp_path, *args)
        assert done.returncode == 2, done
        assert done.stdout == ""
        assert f"{path} is a pseudo-file of {fstype}" in done.stderr
        assert "msync has nothing to do for it" in done.stderr
        assert "empty" not in done.stderr
        assert "Traceback" not in done.stderr


def test_a_tmpfs_file_is_said_never_durable(tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if _mounted_type(str(shm)) != "tmpfs" or not os.access(shm, os.W_OK):
        pytest.skip("no writable tmpfs mounted at /dev/shm")
    data = shm / f"msyncext-main-{os.getpid()}.bin"
    data.write_bytes(b"x" * 100)
    try:
        quiet = _run(tmp_path, str(data))
        timed = _run(tmp_path, "--time", str(data))
    finally:
        data.unlink()
    for done in (quiet, timed):
        assert done.returncode == 0, done.stderr
        assert _fields(done.stdout)["file system"].startswith("tmpfs (")
        said = "tmpfs keeps its files in memory only: nothing on it is durable"
        assert said in done.stdout
    # The timings themselves carry it.
    after = timed.stdout.split("MS_SYNC flush of clean pages", 1)[1]
    assert "no flush here makes data durable" in after


@pytest.mark.skipif(
    blockdev.loop_unavailable() is not None,
    reason=blockdev.loop_unavailable() or "",
)
def test_a_mount_point_with_escapes_and_non_ascii(tmp_path: Path) -> None:
    # mountinfo prints a mount point's bytes as they are (UTF-8 here), except
    # space, tab, newline and backslash (as \ooo): a tmpfs mounted at such a
    # path is the file's file system, not the one that holds the directory.
    with blockdev.tmpfs("1m", prefix="msyncext-tmpfs-é ü\\\t-") as where:
        data = Path(where) / "data.bin"
        data.write_bytes(b"x" * 100)
        done = _run(tmp_path, str(data))
    assert done.returncode == 0, done.stderr
    got = _fields(done.stdout)
    assert got["file system"].startswith("tmpfs (msyncext-test)"), got
    assert got["file system"].endswith(f", mounted at {where}"), got
