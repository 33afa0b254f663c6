"""Races: flushes from many threads, close()/resize() against flushes, fork.

close() and resize() are raced against flushes of an mmap.mmap and of a
numpy.memmap (and a slice and a memoryview of one), whose own export of the
mmap numpy drops at once: there msyncext pins the mmap itself.

Each scenario runs in a fresh interpreter (blockdev.run_isolated): a crash
or a flush of unmapped memory kills one child and fails one test, with the
child's output, instead of killing the run. The scenarios are plain
functions of this module so that they are linted and type-checked.

On a free-threaded build (with the GIL off) the threads really run at once,
so the scenarios run several times as many rounds there: that is where a
missing pin or an unsafe shared structure would show.

"Never a flush of unmapped memory": while a flush holds the buffer export,
close() and resize() fail with BufferError. Had one slipped through, the
msync would have run on an unmapped range and raised OSError(ENOMEM), or
on a moved mapping; the scenarios treat any OSError as a failure.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import random
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import blockdev
import pytest

if TYPE_CHECKING:
    import numpy as np

PAGE = mmap.PAGESIZE
NPAGES = 64
THREADS = 6
SECONDS = 0.4  # per scenario round; bounded, enough for thousands of calls


def _free_threaded() -> bool:
    """Whether threads run in parallel here: a free-threaded build, GIL off."""
    is_gil_enabled: Callable[[], bool] | None = getattr(sys, "_is_gil_enabled", None)
    return is_gil_enabled is not None and not is_gil_enabled()


# Rounds per scenario are multiplied by this where threads run in parallel;
# each round stays bounded by SECONDS.
ROUNDS_FACTOR = 3 if _free_threaded() else 1

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the scenarios use Linux facts"
)


def _new_map(directory: str, name: str, npages: int = NPAGES) -> tuple[int, mmap.mmap]:
    fd = os.open(os.path.join(directory, name), os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, npages * PAGE)
    return fd, mmap.mmap(fd, npages * PAGE)


def _run_threads(workers: Sequence[Callable[[], object]]) -> None:
    """Start the workers together, join them, re-raise the first failure."""
    errors: list[BaseException] = []
    start = threading.Barrier(len(workers))

    def wrap(work: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            try:
                start.wait()
                work()
            except BaseException as exc:
                errors.append(exc)

        return run

    threads = [threading.Thread(target=wrap(w)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
        assert not t.is_alive(), "a worker hung"
    if errors:
        raise errors[0]


def _deadline() -> Callable[[], bool]:
    import time

    end = time.monotonic() + SECONDS
    return lambda: time.monotonic() < end


# -- scenarios (run in the child) ------------------------------------------


def _many_threads(directory: str) -> None:
    import msyncext

    shared_fd, shared = _new_map(directory, "shared")
    own = [_new_map(directory, f"own{i}") for i in range(THREADS)]
    calls = [0] * THREADS

    def worker(index: int, round_no: int) -> Callable[[], None]:
        rng = random.Random(round_no * THREADS + index)
        mine = own[index][1]
        # Each thread writes only its own stripe of the shared map and checks
        # it; flushes cover other threads' stripes (overlapping) too.
        stripe = range(index, NPAGES, THREADS)

        def work() -> None:
            running = _deadline()
            while running():
                page = rng.choice(stripe)
                shared[page * PAGE : page * PAGE + 8] = index.to_bytes(8, "little")
                mine[page * PAGE] = index
                offset = rng.randrange(NPAGES * PAGE)
                size = rng.randrange(NPAGES * PAGE - offset + 1)
                choice = rng.randrange(5)
                if choice == 0:
                    msyncext.flush(shared, offset, size)
                elif choice == 1:
                    msyncext.flush(shared, page * PAGE + 3, 1)  # its own page
                elif choice == 2:
                    msyncext.flush_ranges(
                        shared, [(offset, size), (page * PAGE, 1)], max_gap=0
                    )
                elif choice == 3:
                    msyncext.flush(mine, offset, size)
                else:
                    with memoryview(shared)[offset:] as view:
                        msyncext.flush(view, 0, min(size, len(view)))
                calls[index] += 1

        return work

    for round_no in range(ROUNDS_FACTOR):
        _run_threads([worker(i, round_no) for i in range(THREADS)])
    msyncext.flush(shared)
    for page in range(NPAGES):
        owner = page % THREADS
        value = int.from_bytes(shared[page * PAGE : page * PAGE + 8], "little")
        assert value in (0, owner), (page, value)
    assert blockdev.cachestat(shared_fd).dirty == 0
    for fd, m in own:
        msyncext.flush(m)
        assert blockdev.cachestat(fd).dirty == 0
        m.close()
        os.close(fd)
    shared.close()
    os.close(shared_fd)
    assert min(calls) > 0, calls
    print("rounds", ROUNDS_FACTOR, "calls", sum(calls))


def _close_or_resize_against_flushes(directory: str, action: str) -> None:
    import msyncext

    refused = done = rounds = 0
    # At least 4 rounds (more where threads run in parallel); more, bounded,
    # until a refusal has been seen.
    min_rounds = 4 * ROUNDS_FACTOR
    while rounds < min_rounds or (refused == 0 and rounds < min_rounds + 36):
        round_no = rounds
        rounds += 1
        fd, m = _new_map(directory, f"victim{round_no}")
        gone = threading.Event()
        flushing = threading.Event()

        def flusher(
            seed: int,
            m: mmap.mmap = m,
            gone: threading.Event = gone,
            flushing: threading.Event = flushing,
        ) -> None:
            rng = random.Random(seed)
            while not gone.is_set():
                try:
                    n = len(m)  # ValueError once closed
                    offset = rng.randrange(n)
                    m_bytes = rng.randrange(1, 3 * PAGE)
                    m[offset : offset + 1] = b"x"  # dirty, so msync has work
                    if seed % 2:
                        msyncext.flush(m, offset, min(m_bytes, n - offset))
                    else:
                        msyncext.flush_ranges(m, [(offset, min(m_bytes, n - offset))])
                    flushing.set()
                except (ValueError, IndexError):
                    # Closed (ValueError) or resized between len() and the
                    # call (ValueError: range past the end; IndexError from
                    # the slice assignment). Never OSError, never a crash.
                    pass

        def closer(
            seed: int = round_no,
            m: mmap.mmap = m,
            gone: threading.Event = gone,
            flushing: threading.Event = flushing,
        ) -> None:
            nonlocal refused, done
            rng_size = random.Random(seed)
            flushing.wait(10)
            running = _deadline()
            try:
                while running():
                    try:
                        if action == "close":
                            m.close()
                            return
                        m.resize(rng_size.randrange(1, NPAGES + 1) * PAGE)
                        done += 1
                    except BufferError:
                        refused += 1
            finally:
                gone.set()

        _run_threads([lambda s=s: flusher(s) for s in range(3)] + [closer])
        if action == "close":
            # If the flushers always held an export, close() now: it must
            # work once they have stopped (no export leaked).
            if not m.closed:
                m.close()
            try:
                msyncext.flush(m)
            except ValueError:
                pass
            else:
                raise AssertionError("flush of a closed map succeeded")
        else:
            m.close()
        os.close(fd)
    print("rounds", rounds, "refused", refused, "done", done)
    # The race was real: the export held by some flush turned mmap away.
    assert refused > 0


def _fork_child_flushes(directory: str) -> None:
    import msyncext

    fd, m = _new_map(directory, "forked", 4)
    m[0:5] = b"paren"  # dirty page 0 in the parent, never flushed
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            m[PAGE : PAGE + 5] = b"child"
            msyncext.flush(m, PAGE + 2, 1)
            msyncext.flush_ranges(m, [(2 * PAGE, 1)])
            status = 0
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert m[PAGE : PAGE + 5] == b"child"  # the map is shared with the child
    with open(os.path.join(directory, "forked"), "rb") as f:
        assert f.read()[PAGE : PAGE + 5] == b"child"
    # The child's flush cleaned its page of the shared page cache, only it.
    assert blockdev.cachestat(fd, PAGE, PAGE).dirty == 0
    assert blockdev.cachestat(fd, 0, PAGE).dirty == 1
    msyncext.flush(m)
    assert blockdev.cachestat(fd).dirty == 0
    m.close()
    os.close(fd)


# -- numpy.memmap: the mmap under the array stays pinned during a flush --------
#
# numpy.memmap releases its own export of the mmap.mmap right after making the
# array, so an export of the array (or of a slice or memoryview of it) does
# not stop arr._mmap.close() or resize(): msyncext must export the mmap at the
# end of the owner chain itself for as long as the flush runs.
#
# "An attempt overlapped a flush" is decided from the kernel's view, not from
# timing: /proc/self/task/TID/syscall names the syscall the flushing thread is
# blocked in, with its arguments. An attempt counts as overlapping when that
# thread was inside msync on this file's mapping both just before and just
# after the attempt, and no new flush call began in between (the flusher
# counts the calls it begins): then one single flush call ran throughout the
# attempt, and that call held its exports throughout, so the attempt must
# have been refused.

MEMMAP_BYTES = 16 << 20
DIRTY_BYTES = 2 << 20  # written before each flush, so the flush is long
MEMMAP_TARGETS = ("memmap", "slice", "memoryview")
# Also: "ctypes", a (c_char * n).from_buffer(arr) view (issue 14, point 10;
# test_record.py runs it).
_MSYNC_SYSCALL = {"x86_64": 26, "aarch64": 227}


class _SyscallProbe:
    """Whether a thread of this process is blocked in msync on an address range."""

    def __init__(self, native_id: int, lo: int, hi: int) -> None:
        self.fd = os.open(f"/proc/self/task/{native_id}/syscall", os.O_RDONLY)
        self.msync = str(_MSYNC_SYSCALL[os.uname().machine])
        self.lo, self.hi = lo, hi

    def in_msync(self) -> bool:
        try:
            fields = os.pread(self.fd, 256, 0).split()
        except OSError:  # the thread has exited
            return False
        # "running", or "-1 sp pc" outside a syscall, or "nr arg0 arg1 ...".
        return (
            len(fields) > 2
            and fields[0].decode() == self.msync
            and self.lo <= int(fields[1], 16) < self.hi
        )

    def close(self) -> None:
        os.close(self.fd)


def _memmap_against_flushes(
    directory: str, action: str, how: str, targets: str = ",".join(MEMMAP_TARGETS)
) -> None:
    import numpy as np

    import msyncext

    blob = os.urandom(DIRTY_BYTES)
    # flush_ranges: 32 runs of 64 KiB spread over the file (max_gap=0 keeps
    # them apart), so one call makes 32 msync calls, each with work to do.
    stride = MEMMAP_BYTES // 32
    runs = [(i * stride, 64 * 1024) for i in range(32)]
    kinds = targets.split(",")
    stats = {t: {"overlapping": 0, "refused": 0, "done": 0} for t in kinds}
    violations: list[str] = []
    failures: list[str] = []
    flushes = 0
    min_rounds = len(kinds) * ROUNDS_FACTOR

    def unproven() -> list[str]:
        return [t for t in kinds if stats[t]["refused"] == 0]

    rounds = 0
    while rounds < min_rounds or (unproven() and rounds < min_rounds + 12):
        kind = kinds[rounds % len(kinds)]
        path = os.path.join(directory, f"memmap{rounds}")
        rounds += 1
        with open(path, "wb") as f:
            f.truncate(MEMMAP_BYTES)
        arr: np.memmap[Any, np.dtype[np.uint8]] = np.memmap(
            path, dtype=np.uint8, mode="r+", shape=(MEMMAP_BYTES,)
        )
        mapped: mmap.mmap = arr._mmap  # type: ignore[attr-defined]
        fd = os.open(path, os.O_RDWR)
        target: object
        if kind == "memmap":
            target = arr
        elif kind == "slice":
            target = arr[PAGE + 100 : MEMMAP_BYTES - 3]  # not page-aligned
        elif kind == "memoryview":
            target = arr.data  # a memoryview whose .obj is the array
        elif kind == "ctypes":
            # Exports the array, not the mmap (numpy dropped its export).
            target = (ctypes.c_char * MEMMAP_BYTES).from_buffer(arr)
        else:
            raise ValueError(f"unknown target {kind!r}")
        address = arr.__array_interface__["data"][0]
        begun = [0]  # flush calls the flusher has begun
        flusher_id: list[int] = []
        flushing = threading.Event()
        stop = threading.Event()

        def flusher(
            target: object = target,
            fd: int = fd,
            mapped: mmap.mmap = mapped,
            begun: list[int] = begun,
            flusher_id: list[int] = flusher_id,
            flushing: threading.Event = flushing,
            stop: threading.Event = stop,
            seed: int = rounds,
            kind: str = kind,
        ) -> None:
            nonlocal flushes
            rng = random.Random(seed)
            flusher_id.append(threading.get_native_id())
            while not stop.is_set():
                # Dirty through the file, never through the map: once the
                # mmap is closed, the array's memory is gone.
                if how == "flush":
                    os.pwrite(fd, blob, rng.randrange(MEMMAP_BYTES - DIRTY_BYTES))
                else:
                    for offset, size in runs:
                        os.pwrite(fd, blob[:size], offset)
                begun[0] += 1
                flushing.set()
                try:
                    if how == "flush":
                        msyncext.flush(target)  # type: ignore[arg-type]
                    else:
                        msyncext.flush_ranges(target, runs, max_gap=0)  # type: ignore[arg-type]
                except ValueError:
                    if not mapped.closed:
                        raise
                    return  # closed before this flush began: refused cleanly
                except OSError as exc:
                    failures.append(f"{kind}: {how} raised {exc!r}")
                    return
                flushes += 1

        def closer(
            kind: str = kind,
            mapped: mmap.mmap = mapped,
            begun: list[int] = begun,
            flusher_id: list[int] = flusher_id,
            flushing: threading.Event = flushing,
            stop: threading.Event = stop,
            lo: int = address - address % PAGE,
            hi: int = address + MEMMAP_BYTES,
        ) -> None:
            count = stats[kind]
            try:
                flushing.wait(10)
                try:
                    probe = _SyscallProbe(flusher_id[0], lo, hi)
                except OSError:  # the flusher has already failed and exited
                    return
                running = _deadline()
                try:
                    while running() and not mapped.closed:
                        calls_before = begun[0]
                        if not probe.in_msync():
                            continue  # aim the attempts at flushes under way
                        try:
                            if action == "close":
                                mapped.close()
                            else:
                                # Same size: a real resize may move the memory
                                # under the array, which numpy itself cannot
                                # survive; the refusal does not look at it.
                                mapped.resize(MEMMAP_BYTES)
                            refused = False
                        except BufferError:
                            refused = True
                        overlapped = probe.in_msync() and begun[0] == calls_before
                        if refused:
                            count["refused"] += 1
                        else:
                            count["done"] += 1
                        if overlapped:
                            count["overlapping"] += 1
                            if not refused:
                                violations.append(
                                    f"{kind}: {action}() succeeded while one "
                                    f"{how} call was in msync throughout"
                                )
                finally:
                    probe.close()
            finally:
                stop.set()

        _run_threads([flusher, closer])
        # No export leaked: with the flusher stopped, close() works, and a
        # flush of the array over the closed mmap is refused, not attempted.
        if not mapped.closed:
            mapped.close()
        try:
            msyncext.flush(target)  # type: ignore[arg-type]
        except ValueError:
            pass
        except OSError as exc:
            failures.append(f"{kind}: flush over the closed mmap raised {exc!r}")
        else:
            failures.append(f"{kind}: flush over the closed mmap succeeded")
        if isinstance(target, memoryview):
            target.release()
        del arr, target, mapped
        os.close(fd)
        os.unlink(path)
    print(f"{action} vs {how}: rounds {rounds}, flushes {flushes}, {stats}")
    assert not violations, (
        f"{len(violations)} attempts overlapping a flush were not refused, "
        f"first: {violations[0]}; {len(failures)} other failures, first "
        f"three: {failures[:3]}"
    )
    assert not failures, f"{len(failures)} failures, first three: {failures[:3]}"
    # The race was real for every kind of target: some attempt met a flush.
    assert not unproven(), f"no refusal seen for {unproven()}: {stats}"


# -- tests --------------------------------------------------------------------


@pytest.fixture
def disk_dir(tmp_path: Path) -> str:
    reason = blockdev.cachestat_unavailable(str(tmp_path))
    if reason is not None:
        pytest.skip(reason)
    return str(tmp_path)


def test_many_threads_flush_one_map_and_their_own(disk_dir: str) -> None:
    blockdev.run_isolated("test_races", "_many_threads", disk_dir)


def test_close_racing_flushes(disk_dir: str) -> None:
    blockdev.run_isolated(
        "test_races", "_close_or_resize_against_flushes", disk_dir, "close"
    )


def test_resize_racing_flushes(disk_dir: str) -> None:
    blockdev.run_isolated(
        "test_races", "_close_or_resize_against_flushes", disk_dir, "resize"
    )


@pytest.mark.parametrize("how", ["flush", "flush_ranges"])
@pytest.mark.parametrize("action", ["close", "resize"])
def test_memmap_pinned_against_close_and_resize(
    disk_dir: str, action: str, how: str
) -> None:
    # numpy.memmap, a slice of one and a memoryview of one: a flush of any
    # of them keeps the mmap underneath from closing or resizing.
    pytest.importorskip("numpy")
    if not os.path.exists(f"/proc/self/task/{threading.get_native_id()}/syscall"):
        pytest.skip("no /proc/PID/task/TID/syscall to see a flush in msync")
    if os.uname().machine not in _MSYNC_SYSCALL:
        pytest.skip(f"msync's syscall number not known on {os.uname().machine}")
    blockdev.run_isolated(
        "test_races", "_memmap_against_flushes", disk_dir, action, how
    )


def test_forked_child_flushes_an_inherited_shared_map(disk_dir: str) -> None:
    # A fresh single-threaded interpreter: fork is safe there, and pytest's
    # threads (faulthandler's watchdog) cannot trigger fork's warnings.
    blockdev.run_isolated("test_races", "_fork_child_flushes", disk_dir)
