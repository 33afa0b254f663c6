"""Simulated power cuts on ext4, XFS and btrfs, the way xfstests makes them.

A *rig* is a fresh filesystem on a loop device whose backing file lives on
a private tmpfs. A test writes through it, calls ``rig.cut()`` right after
a flush returns, then reads the file back through the filesystem inside
``rig.recovered()``. Two ways to cut the power:

``shutdown``
    The filesystem shutdown ioctl (``EXT4_IOC_SHUTDOWN``, XFS's
    ``XFS_IOC_GOINGDOWN``; both are ``_IOR('X', 125, __u32)``, since Linux
    6.x also named ``FS_IOC_SHUTDOWN``) with the *no log flush* flag: the
    filesystem stops issuing I/O at once, discarding its uncommitted
    journal and every dirty page. Unmounting it and mounting the device
    again replays the journal as after a crash (xfstests' ``shutdown`` +
    ``_scratch_cycle_mount``).

``image``
    Copy the loop device's backing file at that moment, attach the copy to
    a second loop device and mount it, which replays its journal (ext4 and
    XFS) or log tree (btrfs). Nothing the kernel does after the copy can
    reach it, so this is the literal power cut; it works on any filesystem.

After reading, ``recovered()`` unmounts and runs the filesystem's own
checker read-only (``e2fsck -fn``, ``xfs_repair -n``, ``btrfs check``), so
a cut that left a damaged filesystem fails the test.

Everything is undone whatever happens: mounts (a shut-down filesystem
still unmounts), loop devices, images and directories.

Not a test module; the test modules ``import powercut``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

from blockdev import mounts_not_asked, refuse_unless_asked, retry

# _IOR('X', 125, __u32): EXT4_IOC_SHUTDOWN, XFS_IOC_GOINGDOWN, FS_IOC_SHUTDOWN.
FS_IOC_SHUTDOWN = 0x8004587D
# EXT4_GOING_FLAGS_NOLOGFLUSH == XFS_FSOP_GOING_FLAGS_NOLOGFLUSH ==
# FS_SHUTDOWN_FLAGS_NOLOGFLUSH: stop now, do not write the journal.
SHUTDOWN_NOLOGFLUSH = 2

TECHNIQUES = ("shutdown", "image")


@dataclass(frozen=True)
class FsType:
    """How to make and check one kind of filesystem."""

    name: str
    size_mib: int
    mkfs: tuple[str, ...]  # the image path goes last
    check: tuple[str, ...]  # read-only consistency check; the device goes last


_NO_LAZY_INIT = "lazy_itable_init=0,lazy_journal_init=0"

FILESYSTEMS = {
    # 4 KiB blocks, so a file page is a whole block; inode tables and journal
    # written by mkfs, so no kernel thread initialises them behind a test.
    "ext4": FsType(
        "ext4",
        32,
        ("mkfs.ext4", "-q", "-F", "-b", "4096", "-N", "256", "-E", _NO_LAZY_INIT),
        ("e2fsck", "-f", "-n"),
    ),
    # mkfs.xfs refuses filesystems under 300 MiB; the image is sparse.
    "xfs": FsType(
        "xfs", 300, ("mkfs.xfs", "-q", "-f", "-b", "size=4096"), ("xfs_repair", "-n")
    ),
    "btrfs": FsType(
        "btrfs", 128, ("mkfs.btrfs", "-q", "-f"), ("btrfs", "check", "--readonly")
    ),
}


def run(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} failed ({done.returncode}):\n"
            f"{done.stdout.strip()}\n{done.stderr.strip()}"
        )
    return done.stdout


def _kernel_has(fstype: str) -> bool:
    def listed() -> bool:
        with open("/proc/filesystems") as f:
            return any(line.split()[-1] == fstype for line in f if line.strip())

    if listed():
        return True
    if shutil.which("modprobe"):
        subprocess.run(["modprobe", "-q", fstype], timeout=60, check=False)
    return listed()


@functools.cache
def fs_unavailable(name: str) -> str | None:
    """Why a ``name`` filesystem cannot be built and checked here, or None."""
    not_asked = mounts_not_asked()
    if not_asked is not None:
        return not_asked
    if not sys.platform.startswith("linux"):
        return "loop devices and these filesystems are Linux-only"
    if os.geteuid() != 0:
        return "needs root to attach loop devices and mount filesystems"
    if not os.path.exists("/dev/loop-control"):
        return "no /dev/loop-control: the loop driver is not available"
    fs = FILESYSTEMS[name]
    for tool in ("losetup", "mount", "umount", fs.mkfs[0], fs.check[0]):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (needed for {name})"
    if not _kernel_has(name):
        return f"this kernel has no {name} driver"
    return None


# --------------------------------------------------------------------------
# Small pieces, each undone by an ExitStack callback


def is_mounted(mountpoint: str) -> bool:
    """Whether something is mounted at ``mountpoint``, from the mount table.

    Not os.path.ismount: it stats the directory, which fails with EIO on a
    shut-down XFS, and then says False.
    """
    wanted = os.path.realpath(mountpoint)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            # Field 5 is the mount point, with space, tab, newline and
            # backslash escaped in octal.
            where = line.split()[4]
            where = where.encode().decode("unicode_escape")
            if where == wanted:
                return True
    return False


def unmount(mountpoint: str) -> None:
    """Unmount if mounted (idempotent, so both a test and cleanup may call it)."""
    if not is_mounted(mountpoint):
        return
    try:
        retry(lambda: run("umount", mountpoint), f"unmount {mountpoint}")
    except RuntimeError:
        # Never leave a mount behind: detach it lazily, then still report.
        subprocess.run(["umount", "-l", mountpoint], timeout=60, check=False)
        raise


def _detach(device: str) -> None:
    # losetup -d only asks; the kernel lets go once the device is unused.
    subprocess.run(["losetup", "-d", device], timeout=60, check=False)


def _attach(stack: contextlib.ExitStack, image: str) -> str:
    device = run("losetup", "--find", "--show", image).strip()
    stack.callback(_detach, device)
    return device


def _mount(stack: contextlib.ExitStack, fs: FsType, device: str, where: str) -> None:
    os.makedirs(where, exist_ok=True)
    run("mount", "-t", fs.name, device, where)
    stack.callback(unmount, where)


def copy_sparse(source: str, target: str) -> None:
    """Copy ``source`` to a new ``target``, reading only its data extents."""
    with open(source, "rb") as src, open(target, "xb") as dst:
        size = os.fstat(src.fileno()).st_size
        dst.truncate(size)
        offset = 0
        while offset < size:
            try:
                offset = os.lseek(src.fileno(), offset, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only a hole is left
                    break
                raise
            end = os.lseek(src.fileno(), offset, os.SEEK_HOLE)
            while offset < end:
                copied = os.copy_file_range(
                    src.fileno(), dst.fileno(), end - offset, offset, offset
                )
                if copied == 0:
                    raise RuntimeError(f"{source} shrank while being copied")
                offset += copied


def shutdown(mountpoint: str, flags: int = SHUTDOWN_NOLOGFLUSH) -> None:
    """Shut the filesystem at ``mountpoint`` down (OSError if it cannot)."""
    fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, FS_IOC_SHUTDOWN, struct.pack("=I", flags))
    finally:
        os.close(fd)


# --------------------------------------------------------------------------
# Rigs


class Rig:
    """A mounted filesystem whose power a test can cut once."""

    def __init__(
        self, fs: FsType, technique: str, workdir: str, stack: contextlib.ExitStack
    ) -> None:
        if technique not in TECHNIQUES:
            raise ValueError(f"technique {technique!r} is not one of {TECHNIQUES}")
        self.fs = fs
        self.technique = technique
        self._workdir = workdir
        self._stack = stack
        self.image = os.path.join(workdir, "device.img")
        with open(self.image, "xb") as f:
            f.truncate(fs.size_mib << 20)
        run(*fs.mkfs, self.image)
        self.device = _attach(stack, self.image)
        self.mountpoint = os.path.join(workdir, "live")
        _mount(stack, fs, self.device, self.mountpoint)
        self._cut = False

    def cut(self) -> None:
        """The power fails now: nothing written after this point survives."""
        if self._cut:
            raise RuntimeError("the power of this rig was cut already")
        self._cut = True
        if self.technique == "shutdown":
            shutdown(self.mountpoint)
        else:
            copy_sparse(self.image, os.path.join(self._workdir, "after-cut.img"))

    @contextlib.contextmanager
    def recovered(self) -> Iterator[str]:
        """Mount what the device held at the cut; yield its mount point.

        Open files and maps on the live filesystem must be closed first.
        On leaving, the recovered filesystem is unmounted and checked.
        """
        if not self._cut:
            raise RuntimeError("recovered() before cut()")
        # The live filesystem goes first, whatever the technique: a shut-down
        # one must be unmounted before its device is mounted again, and a
        # btrfs copy carries the original's fsid, which the kernel accepts
        # for a second device only while the first is not mounted (6.7+
        # also allows it with a temporary fsid; do not rely on that).
        unmount(self.mountpoint)
        with contextlib.ExitStack() as stack:
            if self.technique == "shutdown":
                device = self.device
            else:
                device = _attach(stack, os.path.join(self._workdir, "after-cut.img"))
            where = os.path.join(self._workdir, "recovered")
            _mount(stack, self.fs, device, where)
            yield where
            unmount(where)
            run(*self.fs.check, device)


@contextlib.contextmanager
def rig(fs_name: str, technique: str, backing_dir: str | None = None) -> Iterator[Rig]:
    """A fresh ``fs_name`` filesystem to cut by ``technique``; always undone."""
    refuse_unless_asked()
    with contextlib.ExitStack() as stack:
        workdir = tempfile.mkdtemp(prefix=f"msyncext-{fs_name}-", dir=backing_dir)
        # Last out: by then every mount and loop device above is gone
        # (losetup -d is asynchronous, but the images are plain files).
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        yield Rig(FILESYSTEMS[fs_name], technique, workdir, stack)


@functools.cache
def shutdown_unsupported(fs_name: str, backing_dir: str | None = None) -> str | None:
    """Why the no-log-flush shutdown ioctl fails on ``fs_name``, or None.

    Found by trying it on a scratch filesystem: ext4 and XFS have had it for
    years; btrfs gained a generic FS_IOC_SHUTDOWN only recently (and behind
    CONFIG_BTRFS_EXPERIMENTAL), so a kernel may well answer ENOTTY.
    """
    with rig(fs_name, "shutdown", backing_dir) as probe:
        try:
            shutdown(probe.mountpoint)
        except OSError as exc:
            return (
                f"{fs_name} refuses the shutdown ioctl on Linux "
                f"{os.uname().release}: {exc}"
            )
    return None
