"""Races: flushes from many threads, close()/resize() against flushes, fork.

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

import mmap
import os
import random
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import blockdev
import pytest

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


def test_forked_child_flushes_an_inherited_shared_map(disk_dir: str) -> None:
    # A fresh single-threaded interpreter: fork is safe there, and pytest's
    # threads (faulthandler's watchdog) cannot trigger fork's warnings.
    blockdev.run_isolated("test_races", "_fork_child_flushes", disk_dir)
