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
SLOW = 0.5
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
    # WRITE, then FSYNC, each answered SLOW late: the task ended only after
    # the flush it was cancelled in had finished.
    assert waited >= 2 * SLOW, waited
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
