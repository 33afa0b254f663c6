"""The recipes in the situations they are written for, on real storage.

tests/test_docs.py runs each recipe as a program on a healthy disk. Here
their functions meet what they say they survive: a flush still in msync
when asyncio cancels its task (errfs answering late), a full file system
(a small tmpfs, where a store into a hole kills the process with SIGBUS),
and write-back failures (errfs failing WRITE requests, and ext4 on a loop
device whose backing store is full).

Every scenario runs in a child process, which loads the recipe from
docs/recipes/ by path: a SIGBUS, the failure two recipes are written to
avoid, then fails one test instead of the run. The children are the
``child_*`` functions here (they import this module by path); the parent
builds and removes the mounts and reads what reached the storage.
"""

from __future__ import annotations

import asyncio
import errno
import importlib.util
import mmap
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import blockdev
import pytest
from errfs import ErrFS, errfs, errfs_unavailable

PAGE = mmap.PAGESIZE
RECIPES = Path(__file__).resolve().parent.parent / "docs" / "recipes"

needs_recipes = pytest.mark.skipif(
    not RECIPES.is_dir(), reason=f"no {RECIPES} (tests run without the sources)"
)
needs_errfs = pytest.mark.skipif(
    errfs_unavailable() is not None, reason=errfs_unavailable() or ""
)
needs_loop = pytest.mark.skipif(
    blockdev.loop_unavailable() is not None,
    reason=f"mounts a file system: {blockdev.loop_unavailable()}",
)


def recipe(name: str) -> ModuleType:
    """docs/recipes/NAME.py, imported (its main() does not run)."""
    spec = importlib.util.spec_from_file_location(
        f"recipe_{name}", RECIPES / f"{name}.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def exception_chain(exc: BaseException | None) -> list[BaseException]:
    """``exc`` and every exception it was raised from or during."""
    seen: list[BaseException] = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


@pytest.fixture
def fs(tmp_path: Path) -> Iterator[ErrFS]:
    with errfs(tmp_path / "errfs") as mounted:
        yield mounted


def _run_on(fs: ErrFS, function: str, *args: str, timeout: float = 60) -> None:
    fs.run_isolated("test_recipes", function, str(fs.directory), *args, timeout=timeout)


# --------------------------------------------------------------------------
# asyncio: a flush cancelled while it runs

# errfs answers the flush's requests this late; the deadline is far shorter,
# so it always expires while the worker thread is in msync.
SLOW = 1.0
DEADLINE = 0.05


def _asyncio_file(fs: ErrFS) -> Path:
    path = fs.mountpoint / "state.bin"
    with path.open("wb") as f:
        f.truncate(4 * PAGE)
        os.fsync(f.fileno())
    return path


def child_asyncio_deadline(directory: str) -> None:
    """wait_for's timeout expires during the flush: TimeoutError, once the
    flush is over; the map closes; the data is on the storage."""
    flush = recipe("asyncio_flush")
    fs = ErrFS(Path(directory))
    path = _asyncio_file(fs)
    maps: list[mmap.mmap] = []

    async def request() -> None:
        with path.open("r+b") as f, mmap.mmap(f.fileno(), 0) as m:
            maps.append(m)
            m[100] = 0  # faulted in while the daemon answers at once
            fs.slow(SLOW)
            await asyncio.wait_for(flush.write_and_flush(m, 100, b"hello"), DEADLINE)

    started = time.monotonic()
    with pytest.raises(TimeoutError) as info:
        asyncio.run(request())
    waited = time.monotonic() - started
    fs.heal()
    chain = exception_chain(info.value)
    assert not [e for e in chain if isinstance(e, BufferError)], chain
    assert maps[0].closed
    # msync(MS_SYNC) always ends with an FSYNC, answered SLOW late (and the
    # page's WRITE before it, unless the kernel wrote the page back first):
    # the task ended only after the flush it was cancelled in had finished.
    assert waited >= SLOW, waited
    assert (fs.backing / "state.bin").read_bytes()[100:105] == b"hello"


def child_asyncio_cancelled_twice(directory: str) -> None:
    """task.cancel() twice while the flush runs: the task ends cancelled,
    after the flush; the map closes."""
    flush = recipe("asyncio_flush")
    fs = ErrFS(Path(directory))
    path = _asyncio_file(fs)

    async def scenario() -> None:
        with path.open("r+b") as f, mmap.mmap(f.fileno(), 0) as m:
            m[0] = 0
            fs.slow(SLOW)
            task = asyncio.create_task(flush.write_and_flush(m, 0, b"twice"))
            await asyncio.sleep(DEADLINE)
            task.cancel()
            await asyncio.sleep(DEADLINE)
            assert not task.done(), "the task ended while its flush still ran"
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert task.cancelled()
        # Leaving the with block closed the map: no BufferError.

    asyncio.run(scenario())
    fs.heal()
    assert (fs.backing / "state.bin").read_bytes()[:5] == b"twice"


def child_asyncio_failure_outranks_deadline(directory: str) -> None:
    """The flush fails after the deadline expired: WritebackError, not
    TimeoutError, and the map still closes."""
    import msyncext

    flush = recipe("asyncio_flush")
    fs = ErrFS(Path(directory))
    path = _asyncio_file(fs)
    maps: list[mmap.mmap] = []

    async def request() -> None:
        with path.open("r+b") as f, mmap.mmap(f.fileno(), 0) as m:
            maps.append(m)
            m[100] = 0
            fs.fail_writes("EIO", fsync=False, delay=SLOW)
            await asyncio.wait_for(flush.write_and_flush(m, 100, b"hello"), DEADLINE)

    with pytest.raises(msyncext.WritebackError) as info:
        asyncio.run(request())
    fs.heal()
    assert info.value.errno == errno.EIO, info.value
    assert maps[0].closed


@needs_recipes
@needs_errfs
@pytest.mark.parametrize(
    "child",
    [
        "child_asyncio_deadline",
        "child_asyncio_cancelled_twice",
        "child_asyncio_failure_outranks_deadline",
    ],
)
def test_asyncio_recipe_survives_cancelling_a_flush_in_flight(
    fs: ErrFS, child: str
) -> None:
    _run_on(fs, child)


# --------------------------------------------------------------------------
# The group-commit log: a full file system, and write-back failures

RECORD = 3000  # bytes: a group of four spans pages past the header's


def _records(group: int, count: int = 4) -> list[bytes]:
    return [bytes([65 + group]) * RECORD + b"%d" % i for i in range(count)]


def _commit(log: object, records: list[bytes]) -> int:
    for record in records:
        log.append(record)  # type: ignore[attr-defined]
    return log.commit()  # type: ignore[attr-defined, no-any-return]


def _fill(directory: str) -> None:
    """Take every free block of the file system ``directory`` is on."""
    with open(os.path.join(directory, "filler"), "wb", buffering=0) as f:
        chunk = bytes(1 << 16)
        with pytest.raises(OSError, match="No space left on device"):  # noqa: PT012
            while True:
                f.write(chunk)


def child_log_full_fs(directory: str) -> None:
    """On a small tmpfs: a log larger than the free space is refused with
    ENOSPC and leaves nothing; a log made while there was space takes
    appends after the file system filled up."""
    log_recipe = recipe("log_group_commit")
    too_big = Path(directory) / "too-big.log"
    with pytest.raises(OSError, match="No space left on device") as info:
        log_recipe.Log.create(too_big, 8 << 20)
    assert info.value.errno == errno.ENOSPC, info.value
    assert not too_big.exists()

    path = Path(directory) / "events.log"
    log = log_recipe.Log.create(path, 1 << 20)
    _fill(directory)
    acknowledged = []
    # Up to the end of the reserved megabyte: every store lands in a hole
    # of a sparse file, so without the reservation this dies of SIGBUS.
    for group in range((1 << 20) // (4 * (RECORD + 8)) - 1):
        records = _records(group % 26)
        assert _commit(log, records) == 4
        acknowledged += records
    log.close()
    assert log_recipe.read_committed(path) == acknowledged


@needs_recipes
@needs_loop
def test_log_recipe_reserves_its_blocks_on_a_full_file_system() -> None:
    with blockdev.tmpfs("4m") as small:
        blockdev.run_isolated("test_recipes", "child_log_full_fs", small)


def child_log_transient_failure(directory: str) -> None:
    """One WRITE fails: commit() rewrites the group, clears the failure and
    flushes again; the storage holds every acknowledged record. A plain
    retry (no rewrite) is shown to lose the group."""
    import msyncext

    log_recipe = recipe("log_group_commit")
    fs = ErrFS(Path(directory))

    class RetryOnly(log_recipe.Log):  # type: ignore[name-defined, misc]
        """What the recipe warns against: clear and flush again."""

        def commit(self) -> int:
            try:
                self._sync()
            except msyncext.WritebackError:
                msyncext.clear_writeback_error(self.map)
                self._sync()
            count = len(self.pending)
            self.pending.clear()
            return count

    outcome = {}
    for name, kind in (("recipe.log", log_recipe.Log), ("retry.log", RetryOnly)):
        log = kind.create(fs.mountpoint / name, 1 << 20)
        first = _records(0)
        assert _commit(log, first) == 4
        fs.fail_writes("EIO", fsync=False, once=True)
        second = _records(1)
        assert _commit(log, second) == 4  # both acknowledge the group
        failed = [e for e in fs.events() if e.path == f"/{name}" and e.answer != "ok"]
        assert [(e.op, e.answer) for e in failed] == [("write", "EIO")], failed
        log.close()
        outcome[name] = log_recipe.read_committed(fs.backing / name) == first + second
    assert outcome == {"recipe.log": True, "retry.log": False}


def child_log_persistent_failure(directory: str) -> None:
    """Every WRITE fails: commit() rewrites and retries once, then raises
    WritebackError; nothing of the group is acknowledged, and the storage's
    header counts only the groups that were."""
    import msyncext

    log_recipe = recipe("log_group_commit")
    fs = ErrFS(Path(directory))
    path = fs.mountpoint / "events.log"
    log = log_recipe.Log.create(path, 1 << 20)
    first = _records(0)
    assert _commit(log, first) == 4
    fs.fail_writes("EIO")
    with pytest.raises(msyncext.WritebackError) as info:
        _commit(log, _records(1))
    assert info.value.errno == errno.EIO, info.value
    failed = [e for e in fs.events() if e.op == "write" and e.answer == "EIO"]
    assert len(failed) >= 2, "the recipe did not write the group a second time"
    log.close()
    assert log_recipe.read_committed(fs.backing / "events.log") == first


def child_log_reopened(directory: str) -> None:
    """A new process, the storage repaired: Log.open() finds the
    acknowledged records and appends after them."""
    log_recipe = recipe("log_group_commit")
    fs = ErrFS(Path(directory))
    path = fs.mountpoint / "events.log"
    log = log_recipe.Log.open(path)
    assert log_recipe.read_committed(path) == _records(0)
    assert _commit(log, _records(2)) == 4
    log.close()
    backing = fs.backing / "events.log"
    assert log_recipe.read_committed(backing) == _records(0) + _records(2)


@needs_recipes
@needs_errfs
def test_log_recipe_rewrites_what_a_failed_write_back_lost(fs: ErrFS) -> None:
    _run_on(fs, "child_log_transient_failure")


@needs_recipes
@needs_errfs
def test_log_recipe_stops_on_a_second_failure_and_reopens(fs: ErrFS) -> None:
    _run_on(fs, "child_log_persistent_failure")
    fs.heal()
    _run_on(fs, "child_log_reopened")


def child_log_failing_device(mountpoint: str) -> None:
    """ext4 on a loop device whose backing store is full: the reservation
    succeeds (the file system has room), write-back fails at the device;
    commit() raises WritebackError after its one retry, the process lives."""
    import msyncext

    log_recipe = recipe("log_group_commit")
    capacity = 24 << 20
    log = log_recipe.Log.create(Path(mountpoint) / "events.log", capacity)
    payload = os.urandom(64 << 10)
    count = 0
    while log.end + len(payload) + 8 <= capacity:
        log.append(payload)
        count += 1
    with pytest.raises(msyncext.WritebackError) as info:
        log.commit()
    assert info.value.errno in (errno.ENOSPC, errno.EIO, errno.EROFS), info.value
    assert len(log.pending) == count, "records were acknowledged"
    log.close()


@needs_recipes
@needs_loop
def test_log_recipe_raises_writeback_error_from_a_failing_device() -> None:
    # 64 MiB of ext4 over a 12 MiB tmpfs, as tests/test_faults.py builds it.
    with (
        blockdev.tmpfs("12m") as small,
        blockdev.loop_ext4(
            64, backing_dir=small, mount_options="errors=continue"
        ) as fs,
    ):
        blockdev.run_isolated("test_recipes", "child_log_failing_device", fs.mountpoint)


# --------------------------------------------------------------------------
# A new file: whole under its final name, or not at all


@needs_recipes
def test_new_file_recipe_writes_empty_data(tmp_path: Path) -> None:
    new_file = recipe("new_file_durable")
    path = tmp_path / "empty.bin"
    new_file.write_durably(path, b"")
    assert path.read_bytes() == b""
    new_file.write_durably(path, b"full")
    new_file.write_durably(path, b"")  # replaces a file that had data
    assert path.read_bytes() == b""
    assert os.listdir(tmp_path) == ["empty.bin"]


def child_new_file_full_fs(directory: str) -> None:
    """On a small tmpfs: data larger than the free space fails with ENOSPC,
    leaving no file (and an existing one as it was); a retry once there is
    room writes it whole."""
    new_file = recipe("new_file_durable")
    root = Path(directory)
    data = os.urandom(3 << 20)
    path = root / "snapshot.bin"
    _fill(directory)
    for _ in range(2):  # the retry of a failure fails the same way
        with pytest.raises(OSError, match="No space left on device") as info:
            new_file.write_durably(path, data)
        assert info.value.errno == errno.ENOSPC, info.value
        assert os.listdir(root) == ["filler"]
    (root / "filler").unlink()
    new_file.write_durably(path, data)
    assert path.read_bytes() == data

    # Replacing it: a failure leaves the old file whole.
    _fill(directory)
    with pytest.raises(OSError, match="No space left on device"):
        new_file.write_durably(path, data[::-1])
    assert path.read_bytes() == data
    assert sorted(os.listdir(root)) == ["filler", "snapshot.bin"]


@needs_recipes
@needs_loop
def test_new_file_recipe_leaves_nothing_behind_on_a_full_file_system() -> None:
    with blockdev.tmpfs("4m") as small:
        blockdev.run_isolated("test_recipes", "child_new_file_full_fs", small)


def _held_open(name: str) -> list[str]:
    """This process's descriptors of files whose name contains ``name``."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:  # the descriptor listdir itself used
            continue
        if name in target:
            found.append(target)
    return found


def child_new_file_storage_fails(directory: str, how: str) -> None:
    """The storage fails FSYNC (msync: WritebackError) or WRITE (on FUSE,
    glibc's posix_fallocate writes a byte per block: OSError EIO): no file
    under the final name, no temporary file, nothing held open; once healed
    a retry writes it."""
    import msyncext

    new_file = recipe("new_file_durable")
    fs = ErrFS(Path(directory))
    path = fs.mountpoint / "snapshot.bin"
    data = os.urandom(5 * PAGE + 7)
    if how == "fsync":
        fs.fail_fsync("EIO")
    else:
        fs.fail_writes("EIO")
    for _ in range(2):
        with pytest.raises(OSError, match="Input/output error") as info:
            new_file.write_durably(path, data)
        assert info.value.errno == errno.EIO, info.value
        assert (type(info.value) is msyncext.WritebackError) == (how == "fsync")
        assert os.listdir(fs.backing) == [], "a file was left behind"
        assert not (held := _held_open(".snapshot.bin.")), held
    fs.heal()
    new_file.write_durably(path, data)
    assert (fs.backing / "snapshot.bin").read_bytes() == data
    assert os.listdir(fs.backing) == ["snapshot.bin"]


@needs_recipes
@needs_errfs
@pytest.mark.parametrize("how", ["fsync", "write"])
def test_new_file_recipe_leaves_nothing_behind_when_storage_fails(
    fs: ErrFS, how: str
) -> None:
    _run_on(fs, "child_new_file_storage_fails", how)
