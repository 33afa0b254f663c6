"""The write-back record, exact and safe: one test per point of issue 19.

Issue 19 tried the record (test_faults.py, test_record.py) as a user with
unusual but legitimate files would, and found it unsafe or inexact in six
ways: the parse of /proc/self/maps wrote past its buffer for a long line
(point 1); on btrfs, clearing a healthy file forgot a failed one that had
been deleted while mapped (2); a failed file with a path of PATH_MAX bytes
or more made every flush of every file fail (3); a deleted failed file kept
its disk space and its mount busy for the life of the process (4); the two
views of one overlayfs file were taken for two files (5); and a refusal did
not say which file, nor which failure (6). Each test here is written from
the issue's description of its point (and the target behaviour the lead
wrote down for it), names the point, and says in its docstring how its
scenario reproduces it.

The failing device is test_record's: ext4 without a journal on a loop
device over a full tmpfs, writable after the failure. The record is per
process, so every scenario runs in a fresh ``python -I`` child
(blockdev.run_isolated) and asserts there, while the parent builds and
removes devices and mounts whatever the child does. Tests that mount file
systems also need MSYNCEXT_TEST_MOUNTS=1 (and root).
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import blockdev
import powercut
import pytest
import test_faults as faults
import test_record as record

needs_loop = faults.needs_loop
needs_mounts = record.needs_mounts
linux_only = record.linux_only
# test_record's fixture, made visible here: ext4 without a journal over a
# full tmpfs (the name is what pytest looks up).
failing_ext4 = record.failing_ext4

PAGE = mmap.PAGESIZE
FILE_BYTES = faults.FILE_BYTES
NAME_MAX = 255  # bytes of one file name on ext4 (and most file systems)
PATH_MAX = 4096
_outcome = record._outcome
_refused = record._refused


def _run(function: str, *args: str, timeout: float = 120) -> str:
    done = blockdev.run_isolated("test_record_exact", function, *args, timeout=timeout)
    print(done.stdout)
    return done.stdout


# --------------------------------------------------------------------------
# Helpers for the children


def _deep_dir(top: str, length: int, *, newlines: bool = False) -> tuple[int, str]:
    """A new directory nested below ``top`` whose path, as /proc/self/maps
    prints it, is at least ``length`` bytes long: (a descriptor of it, its
    path).

    Each level is a name of NAME_MAX bytes, made and opened relative to the
    level above it (mkdirat, openat), so no single system call is given a
    path longer than one name: any depth is legal. With ``newlines`` every
    other name is NAME_MAX newlines, which /proc/self/maps prints as
    ``\\012`` each (four bytes). The caller closes the descriptor.
    """
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    path = top
    printed = len(os.fsencode(top))
    depth = 0
    try:
        while printed < length:
            if newlines and depth % 2:
                name = "\n" * NAME_MAX
            else:
                name = f"{depth:03d}".ljust(NAME_MAX, "d")
            os.mkdir(name, dir_fd=fd)
            inner = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = inner
            path = os.path.join(path, name)
            printed += 1 + len(name) + 3 * name.count("\n")
            depth += 1
    except BaseException:
        os.close(fd)
        raise
    return fd, path


# --------------------------------------------------------------------------
# Point 1: the parse of /proc/self/maps and lines longer than its buffer

LONG_PATH = 20_000  # bytes of each long line's path: more than a 16 KiB read
LONG_FILES = 4  # two long lines in a row are enough on Linux 6.x; four, surely
STRIDE = 16 * PAGE  # address space given to each long-path file's map
HEALTHY_PAGES = 16


@contextlib.contextmanager
def _above_long_paths(top: str, hfd: int) -> Iterator[memoryview]:
    """A shared map of ``hfd`` (HEALTHY_PAGES pages) placed right above the
    maps of LONG_FILES files whose paths are LONG_PATH bytes long, half of
    them with newlines in their names; as a writable memoryview.

    /proc/self/maps lists mappings by address, so a parse that looks for the
    healthy map reads every long line first. The kernel chooses a free range
    (an anonymous reservation, given back at once), and the maps are put
    into it in order with MAP_FIXED_NOREPLACE: nothing else can sit between
    them unless another thread maps something in that instant.
    """
    libc = record._libc()
    fds = []
    with contextlib.ExitStack() as stack:
        for k in range(LONG_FILES):
            sub = os.path.join(top, f"tree{k}")
            os.mkdir(sub)
            dfd, _ = _deep_dir(sub, LONG_PATH, newlines=k % 2 == 1)
            try:
                fd = os.open("f", os.O_RDWR | os.O_CREAT, 0o600, dir_fd=dfd)
            finally:
                os.close(dfd)
            stack.callback(os.close, fd)
            os.ftruncate(fd, 4 * PAGE)
            fds.append(fd)
        total = LONG_FILES * STRIDE + HEALTHY_PAGES * PAGE
        base = libc.mmap(None, total, 0, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
        assert base not in (None, record.MAP_FAILED), "no address space to reserve"
        libc.munmap(base, total)
        for k, fd in enumerate(fds):
            stack.enter_context(record._fixed_map(base + k * STRIDE, 4 * PAGE, fd))
        buf = stack.enter_context(
            record._fixed_map(base + LONG_FILES * STRIDE, HEALTHY_PAGES * PAGE, hfd)
        )
        below = []
        with open("/proc/self/maps") as f:
            for line in f:
                if int(line.split("-")[0], 16) < base + LONG_FILES * STRIDE:
                    below.append(line)
        long_lines = [len(line) for line in below if len(line) > 16384]
        escaped = sum("\\012" in line for line in below)
        print(
            f"/proc/self/maps: {len(below)} lines below the healthy map, of "
            f"which {len(long_lines)} over 16 KiB ({long_lines} bytes), "
            f"{escaped} with newlines in names (printed as \\012)",
            flush=True,  # the old parse aborts the child: say this first
        )
        assert len(long_lines) == LONG_FILES, long_lines
        yield buf


def _parse_past_long_lines(top: str, how: str, failing: str) -> None:
    import msyncext

    assert msyncext._msync.writeback_tracking() == "/proc/self/maps"
    hfd = record._new_file(os.path.join(top, "healthy.bin"), HEALTHY_PAGES * PAGE)
    with _above_long_paths(top, hfd) as buf:
        buf[PAGE] = 1
        if how == "MS_ASYNC":
            outcomes = {
                "MS_ASYNC": _outcome(
                    lambda: msyncext.flush(buf, flags=msyncext.MS_ASYNC)
                ),
                "then MS_SYNC": _outcome(lambda: msyncext.flush(buf)),
            }
            expected = dict.fromkeys(outcomes, "ok")
        elif how == "evict":
            outcomes = {"evict=True": _outcome(lambda: msyncext.flush(buf, evict=True))}
            expected = dict.fromkeys(outcomes, "ok")
        else:
            fd, m, _ = faults._dirty_file(failing)
            first = faults._first_failure(m)
            outcomes = {
                "the healthy map": _outcome(lambda: msyncext.flush(buf)),
                "the healthy map, MS_ASYNC": _outcome(
                    lambda: msyncext.flush(buf, flags=msyncext.MS_ASYNC)
                ),
                "the healthy map, evict=True": _outcome(
                    lambda: msyncext.flush(buf, evict=True)
                ),
                "the failed map": _outcome(lambda: msyncext.flush(m)),
            }
            expected = dict.fromkeys(outcomes, "ok")
            expected["the failed map"] = _refused(first)
            m.close()
            os.close(fd)
    assert outcomes == expected, f"flushes above long /proc/self/maps lines: {outcomes}"
    os.close(hfd)


@linux_only
@pytest.mark.parametrize(
    "how",
    [
        "MS_ASYNC",
        "evict",
        pytest.param("failure recorded", marks=[needs_loop, needs_mounts]),
    ],
)
def test_point1_the_parse_of_proc_self_maps_survives_lines_of_any_length(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
    how: str,
) -> None:
    """Issue 19, point 1: the parse of /proc/self/maps (kernels before 6.11;
    MSYNCEXT_NO_PROCMAP_QUERY=1 here) must not write past its buffer.

    Reproduction: four files, each at the end of a chain of directories
    whose path is 20,000 bytes long (two of them with names of newlines,
    which the kernel prints as ``\\012``), are mapped in a row right below a
    healthy map. The parse reads 16 KiB at a time and keeps the unfinished
    last line: with a long line there, the next read lands past the end of
    its buffer, and glibc aborts the child ("double free or corruption" or
    "free(): invalid next size"). The parse runs for an MS_ASYNC call and
    for evict=True (to find the file behind the range), and for every flush
    while a failure is recorded. The child must exit 0, the healthy map
    flush, and, with a failure recorded, the failed map be refused.
    """
    monkeypatch.setenv("MSYNCEXT_NO_PROCMAP_QUERY", "1")
    failing = ""
    if how == "failure recorded":
        fs: blockdev.LoopFS = request.getfixturevalue("failing_ext4")
        failing = f"{fs.mountpoint}/big"
    top = tmp_path / "long"
    top.mkdir()
    try:
        _run("_parse_past_long_lines", str(top), how, failing)
    finally:
        # shutil.rmtree walks with descriptors (openat): no path too long.
        shutil.rmtree(top)


# --------------------------------------------------------------------------
# Point 2: btrfs, a failed file deleted while mapped, and its namesake


def _deleted_and_its_namesake(root: str) -> None:
    import msyncext

    with record._subvolume_maps(root) as (ma, mb):
        # Deleted while mapped, before anything fails: from now on its
        # mapping has no path that names it.
        os.unlink(f"{root}/sub_a/f")
        line_a = record._maps_line(faults._address(ma))
        print(f"A: {line_a}\nB: {record._maps_line(faults._address(mb))}")
        assert line_a.endswith(" (deleted)"), line_a
        for offset in range(0, FILE_BYTES, PAGE):
            ma[offset : offset + faults.MARK] = os.urandom(faults.MARK)
        first = faults._first_failure(ma)
        # msyncext may not be able to tell B from A: refusing B is allowed.
        before = _outcome(lambda: msyncext.flush(mb))
        outcomes = {
            "clear_writeback_error(B)": repr(msyncext.clear_writeback_error(mb)),
            "flush(B) after that": _outcome(lambda: msyncext.flush(mb)),
            "flush(A) after that": _outcome(lambda: msyncext.flush(ma)),
            "clear_writeback_error(A)": repr(msyncext.clear_writeback_error(ma)),
        }
    expected = {
        "clear_writeback_error(B)": "None",
        "flush(B) after that": "ok",
        "flush(A) after that": _refused(first),
        "clear_writeback_error(A)": repr(first),
    }
    assert before in ("ok", _refused(first)), f"flush(B) before the clear: {before}"
    assert outcomes == expected, (
        f"after sub_a/f (deleted while mapped) failed with "
        f"{errno.errorcode[first]}, flush(B) said {before}: {outcomes}"
    )


@needs_loop
@needs_mounts
def test_point2_clearing_a_namesake_does_not_forget_a_deleted_failed_file() -> None:
    """Issue 19, point 2: on btrfs, clearing a healthy file must not forget
    a failed file that only shares its device and inode number.

    Reproduction: sub_a/f and sub_b/f, the first files of two subvolumes,
    are both inode 257 and show the same device in /proc/self/maps. sub_a/f
    (A) is deleted while mapped, so its mapping shows "(deleted)" and no
    path can tell it from sub_b/f (B); then A's write-back fails. The old
    record refused B, and clear_writeback_error(B) returned A's errno and
    forgot A, whose flush then reported success for the lost data. Now
    clear_writeback_error(B) returns None, B then flushes, A stays refused
    with its first errno and is cleared through its own map.
    """
    reason = powercut.fs_unavailable("btrfs")
    if reason is not None:
        pytest.skip(reason)
    with record._failing_btrfs() as root:
        _run("_deleted_and_its_namesake", root)


# --------------------------------------------------------------------------
# Point 3: a failed file whose path is PATH_MAX bytes or longer

LONG_NAME_PATH = PATH_MAX + 2 * NAME_MAX  # bytes; no newlines in it


def _failed_file_with_a_long_path(mountpoint: str, healthy_dir: str) -> None:
    import msyncext

    libc = record._libc()
    # Everything on the failing device is made and synced while it has room.
    os.mkdir(f"{mountpoint}/deep")
    dfd, deep = _deep_dir(f"{mountpoint}/deep", LONG_NAME_PATH)
    ofd = record._new_file(f"{mountpoint}/other", 16 * PAGE)
    other = mmap.mmap(ofd, 16 * PAGE)
    assert libc.syncfs(dfd) == 0
    # The long path is reached relative to the working directory.
    os.fchdir(dfd)
    fd, m, _ = faults._dirty_file("big")
    path = os.path.join(deep, "big")
    print(f"the failed file's path: {len(os.fsencode(path))} bytes")
    assert len(os.fsencode(path)) >= PATH_MAX
    hfd, healthy = faults._healthy_map(healthy_dir)

    first = faults._first_failure(m)
    address = faults._address(m)
    outcomes = {
        "flush(a file on another device)": _outcome(lambda: msyncext.flush(healthy)),
        "flush(another file on the failing device)": _outcome(
            lambda: msyncext.flush(other)
        ),
        "clear_writeback_error(a healthy map)": repr(
            msyncext.clear_writeback_error(healthy)
        ),
        "flush(the failed map)": _outcome(lambda: msyncext.flush(m)),
    }
    m.close()
    os.close(fd)
    # The application opens and maps the file again; something else holds
    # the addresses the failed map had, so the new map is elsewhere.
    with record._fixed_map(address, FILE_BYTES, shared=False):
        fd = os.open("big", os.O_RDWR)
        again = mmap.mmap(fd, 4 * PAGE)
        outcomes["clear_writeback_error(a new map of it)"] = repr(
            msyncext.clear_writeback_error(again)
        )
        outcomes["then flush(the new map)"] = _outcome(lambda: msyncext.flush(again))
        again.close()
        os.close(fd)
    expected = {
        "flush(a file on another device)": "ok",
        "flush(another file on the failing device)": "ok",
        "clear_writeback_error(a healthy map)": "None",
        "flush(the failed map)": _refused(first),
        "clear_writeback_error(a new map of it)": repr(first),
        "then flush(the new map)": "ok",
    }
    assert outcomes == expected, (
        f"after a file with a {len(os.fsencode(path))}-byte path failed: {outcomes}"
    )
    os.chdir("/")
    os.close(dfd)
    for closing in (other, healthy):
        closing.close()
    for descriptor in (ofd, hfd):
        os.close(descriptor)


@needs_loop
@needs_mounts
def test_point3_a_failed_file_with_a_long_path_refuses_only_itself(
    failing_ext4: blockdev.LoopFS, tmp_path: Path
) -> None:
    """Issue 19, point 3: a failed file whose path is PATH_MAX bytes or more
    is refused, and nothing else; a new map of it can clear it.

    Reproduction: the file sits below 18 directories of 255-byte names on
    the failing device (a path of more than 4,600 bytes; every system call
    is given a short relative path) and its write-back fails. PROCMAP_QUERY cannot
    return a name that long (ENAMETOOLONG), and the old record then kept
    an "unknown file": every flush of every file on every device raised
    WritebackError, and once the failed map was closed nothing could clear
    it. Now a file on another device and another file on the failing device
    flush, clearing a healthy map returns None, the failed map is refused,
    and after it is closed a new map of the same file (at other addresses)
    clears it, returning the errno, and then flushes.
    """
    _run("_failed_file_with_a_long_path", failing_ext4.mountpoint, str(tmp_path))


# --------------------------------------------------------------------------
# Point 4: a deleted failed file lets go of its space and its mount


def _deleted_failed_file_lets_go(bind: str, mountpoint: str) -> None:
    import msyncext

    path = os.path.join(bind, "lost")
    fd, m, _ = faults._dirty_file(path)
    faults._first_failure(m)
    # A second failed file, through the file system's own mount point,
    # stays mapped: the record is not empty for the rest of the scenario.
    kfd = record._new_file(os.path.join(mountpoint, "kept"), 64 * PAGE)
    kept = mmap.mmap(kfd, 64 * PAGE)
    for offset in range(0, 64 * PAGE, PAGE):
        kept[offset] = 1
    kept_first = faults._first_failure(kept)

    frsize = os.statvfs(mountpoint).f_frsize
    st = os.fstat(fd)
    blocks = st.st_blocks * 512 // frsize
    assert blocks > 0, "the failed file holds no blocks"
    # The application gives up on the file: closes all it has, deletes it.
    m.close()
    os.close(fd)
    before = os.statvfs(mountpoint).f_bfree
    os.unlink(path)
    freed = os.statvfs(mountpoint).f_bfree - before
    # A descriptor of it, by the name it had or by what it is.
    held = []
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor
            link = os.readlink(f"/proc/self/fd/{name}")
            target = os.stat(f"/proc/self/fd/{name}")
            if (
                link == path
                or link.startswith(f"{path} ")
                or (target.st_dev, target.st_ino) == (st.st_dev, st.st_ino)
            ):
                held.append(f"{name} -> {link}")
    still = _outcome(lambda: msyncext.flush(kept))
    umount = subprocess.run(
        ["umount", bind], capture_output=True, text=True, timeout=60, check=False
    )
    print(
        f"the deleted file held {blocks} blocks; the unlink freed {freed}; "
        f"descriptors left: {held}; umount: {umount.returncode} "
        f"{umount.stderr.strip()}"
    )
    problems = []
    if freed < blocks // 2:
        problems.append(f"the unlink freed {freed} of the file's {blocks} blocks")
    if held:
        problems.append(f"descriptors of the deleted file are open: {held}")
    if umount.returncode != 0:
        problems.append(f"umount failed: {umount.stderr.strip()}")
    if still != _refused(kept_first):
        problems.append(f"the other failed file is no longer refused: {still}")
    assert not problems, problems
    kept.close()
    os.close(kfd)


@needs_loop
@needs_mounts
def test_point4_a_deleted_failed_file_frees_its_space_and_its_mount(
    failing_ext4: blockdev.LoopFS, tmp_path: Path
) -> None:
    """Issue 19, point 4: once the application has closed a failed file's
    map and descriptor and deleted it, nothing of msyncext keeps it.

    Reproduction: the failed file is opened through a bind mount of the
    failing ext4 (a second mount of the same file system, so that unmounting
    it does not pull the fixture's mount away); after its failure another
    file fails too and stays mapped, so the record is not empty. The old
    record held the failed file open (O_PATH) until cleared, which nothing
    could do any more: its blocks stayed allocated and ``umount`` said
    "target is busy". Now, in the same live process, statvfs shows the
    file's blocks free right after the unlink, no descriptor in
    /proc/self/fd is the file (by its link's name, or by device and
    inode), the bind mount unmounts, and the other failed file is still
    refused.
    """
    bind = tmp_path / "bind"
    bind.mkdir()
    powercut.run("mount", "--bind", failing_ext4.mountpoint, str(bind))
    try:
        _run("_deleted_failed_file_lets_go", str(bind), failing_ext4.mountpoint)
    finally:
        powercut.unmount(str(bind))


# --------------------------------------------------------------------------
# Point 5: overlayfs, one file seen through two views


@contextlib.contextmanager
def _overlay(root: str) -> Iterator[tuple[str, str]]:
    """An overlay mount whose layers are all directories of ``root``;
    yields (the merged directory, the upper directory)."""
    layers = {name: os.path.join(root, name) for name in ("lower", "upper", "work")}
    merged = os.path.join(root, "merged")
    for directory in (*layers.values(), merged):
        os.mkdir(directory)
    options = ",".join(f"{name}dir={where}" for name, where in layers.items())
    powercut.run("mount", "-t", "overlay", "overlay", "-o", options, merged)
    try:
        yield merged, layers["upper"]
    finally:
        powercut.unmount(merged)


def _two_views(merged: str, upper: str, failing_view: str) -> None:
    import msyncext

    views = {"overlay": merged, "upper": upper}
    (other_view,) = set(views) - {failing_view}
    # F is made through the overlay: a file of the upper directory. The new
    # directories and F reach the device while it has room (else each fsync
    # of F would fail anew, writing its parent directories).
    with open(os.path.join(merged, "F"), "xb") as f:
        assert record._libc().syncfs(f.fileno()) == 0
    fd, m, _ = faults._dirty_file(os.path.join(views[failing_view], "F"))
    first = faults._first_failure(m)
    # The other view is opened after the failure: the kernel never tells
    # this open file of it, so only the record stands before a success.
    ofd = os.open(os.path.join(views[other_view], "F"), os.O_RDWR)
    om = mmap.mmap(ofd, 4 * PAGE)
    seen = {
        failing_view: record._maps_line(faults._address(m)),
        other_view: record._maps_line(faults._address(om)),
    }
    for view, line in seen.items():
        print(f"through the {view}: {line}")
    assert seen["overlay"].split()[4] == seen["upper"].split()[4], "not one inode"
    outcomes = {
        f"flush through the {other_view}": _outcome(lambda: msyncext.flush(om)),
        f"a range through the {other_view}": _outcome(
            lambda: msyncext.flush(om, PAGE + 1, 2)
        ),
        f"flush through the {failing_view}": _outcome(lambda: msyncext.flush(m)),
        f"clear_writeback_error through the {other_view}": repr(
            msyncext.clear_writeback_error(om)
        ),
        f"then flush through the {failing_view}": _outcome(lambda: msyncext.flush(m)),
        f"then flush through the {other_view}": _outcome(lambda: msyncext.flush(om)),
    }
    expected = dict.fromkeys(outcomes, _refused(first))
    expected[f"clear_writeback_error through the {other_view}"] = repr(first)
    expected[f"then flush through the {failing_view}"] = "ok"
    expected[f"then flush through the {other_view}"] = "ok"
    assert outcomes == expected, (
        f"after F failed through the {failing_view}: {outcomes}"
    )
    om.close()
    m.close()
    os.close(ofd)
    os.close(fd)


@needs_loop
@needs_mounts
@pytest.mark.parametrize("failing_view", ["overlay", "upper"])
def test_point5_both_views_of_an_overlayfs_file_are_one_file(
    failing_ext4: blockdev.LoopFS, failing_view: str
) -> None:
    """Issue 19, point 5: a file mapped through an overlay mount and through
    the overlay's upper directory is one file for the record.

    Reproduction: an overlay whose upper (and lower and work) directories
    are on the failing ext4; F's write-back fails through one view, then F
    is opened and mapped through the other. On Linux 6.18 /proc/self/maps
    shows one inode number for both, with the overlay's device through the
    overlay and the loop device through the upper directory (the child
    prints both lines). The old record took them for two files, and since
    the kernel tells an open file only of failures after it was opened, the
    flush through the other view said success. Now it is refused with the
    first errno, in both directions, and clearing through it lets both
    views flush.
    """
    if not powercut._kernel_has("overlay"):
        pytest.skip("this kernel has no overlay file system")
    with _overlay(failing_ext4.mountpoint) as (merged, upper):
        _run("_two_views", merged, upper, failing_view)


# --------------------------------------------------------------------------
# Point 6: a refusal names the file and the failure


def _refusals_name_the_file(mountpoint: str) -> None:
    import msyncext

    named = os.path.join(mountpoint, "named")
    fd, m, _ = faults._dirty_file(named)
    first = faults._first_failure(m)
    # A second file, deleted while mapped and then failed: no path names it.
    unnamed = os.path.join(mountpoint, "unnamed")
    ufd = record._new_file(unnamed, 64 * PAGE)
    um = mmap.mmap(ufd, 64 * PAGE)
    for offset in range(0, 64 * PAGE, PAGE):
        um[offset] = 1
    os.unlink(unnamed)
    ufirst = faults._first_failure(um)
    st = os.fstat(ufd)
    major, minor = os.major(st.st_dev), os.minor(st.st_dev)
    # The device as stat and mountinfo write it, or as /proc/self/maps does.
    device_inode = (
        f"device {major}:{minor}, inode {st.st_ino}",
        f"device {major:02x}:{minor:02x}, inode {st.st_ino}",
    )

    messages = {
        "flush": faults._raises_writeback(
            lambda: msyncext.flush(m, PAGE, 1), first, "flush"
        ),
        "flush_ranges": faults._raises_writeback(
            lambda: msyncext.flush_ranges(m, [(0, 1), (9 * PAGE, 3)]),
            first,
            "flush_ranges",
        ),
        "unnamed": faults._raises_writeback(
            lambda: msyncext.flush(um), ufirst, "the unnamed file"
        ),
    }
    for what, message in messages.items():
        print(f"{what}: {message}")
    problems = []
    for what in ("flush", "flush_ranges"):
        if named not in messages[what]:
            problems.append(f"the {what} refusal does not name {named}")
        if errno.errorcode[first] not in messages[what]:
            problems.append(f"the {what} refusal does not say {errno.errorcode[first]}")
    if not any(text in messages["unnamed"] for text in device_inode):
        problems.append(f"the refusal of the deleted file does not say {device_inode}")
    if errno.errorcode[ufirst] not in messages["unnamed"]:
        problems.append(
            f"the refusal of the deleted file does not say {errno.errorcode[ufirst]}"
        )
    assert not problems, (problems, messages)
    um.close()
    m.close()
    os.close(ufd)
    os.close(fd)


@needs_loop
@needs_mounts
def test_point6_a_refusal_names_the_file_and_its_failure(
    failing_ext4: blockdev.LoopFS,
) -> None:
    """Issue 19, point 6: the message of a refused flush names the file and
    the errno of the failure it refuses for.

    Reproduction: a file on the failing device fails, and so does a second
    one that was deleted while mapped (no path names it any more). The old
    refusal said only "buffer bytes [a, b)" and the error's text. Now
    str(exc) of a refused flush (and flush_ranges) holds the file's path
    and the errno's name (e.g. "ENOSPC"); for the deleted file, "device
    M:m, inode N" (decimal, or hexadecimal as /proc/self/maps writes it)
    and its errno's name.
    """
    _run("_refusals_name_the_file", failing_ext4.mountpoint)
