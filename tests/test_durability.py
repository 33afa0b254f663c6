"""Durability at the block level: which bytes reach the device, and when.

An ext4 filesystem (4 KiB blocks, so a file page is a whole block) on a
loop device over a backing file: after a flush, the test reads the backing
file at the blocks FIEMAP gives for each file page and checks which pages
hold their new content. Every test first shows the new bytes are *not* on
the device, so "arrived" means "arrived because of the flush".

The kernel's flusher threads write dirty pages on their own only after
dirty_expire_centisecs (30 s by default); each test dirties its pages and
looks at the device within milliseconds, and checks with cachestat(2)
that the pages it did not flush are still dirty, so a surprise write-back
would show up as a clear failure, not as a wrong conclusion.
"""

from __future__ import annotations

import ctypes
import os
import time
from collections.abc import Iterator

import blockdev
import pytest
from conftest import needs_numpy, np

import msyncext
from msyncext import MS_ASYNC, MS_INVALIDATE, MS_SYNC, PAGESIZE

pytestmark = pytest.mark.skipif(
    blockdev.loop_unavailable() is not None,
    reason=f"block-level durability tests: {blockdev.loop_unavailable()}",
)

NPAGES = 8


@pytest.fixture(scope="module")
def fs() -> Iterator[blockdev.LoopFS]:
    if PAGESIZE != 4096:
        pytest.skip(f"pages of {PAGESIZE} bytes do not map onto 4 KiB blocks")
    with blockdev.loop_ext4(32) as mounted:
        reason = blockdev.cachestat_unavailable(mounted.mountpoint)
        if reason is not None:
            pytest.skip(reason)
        yield mounted


class Scene:
    """A page-granular shared map of an NPAGES-page file on the loop fs."""

    def __init__(self, fs: blockdev.LoopFS, name: str) -> None:
        self.fs = fs
        self.path = os.path.join(fs.mountpoint, name)
        self.fd, self.map = blockdev.page_granular_map(self.path, NPAGES)
        self.blocks = blockdev.physical_offsets(self.fd, NPAGES)
        self.old = [bytes(PAGESIZE)] * NPAGES
        self.new = [os.urandom(PAGESIZE) for _ in range(NPAGES)]

    def dirty_all(self) -> None:
        """Give every page new random content; none of it may be on the device."""
        for page, content in enumerate(self.new):
            self.map[page * PAGESIZE : (page + 1) * PAGESIZE] = content
        assert blockdev.cachestat(self.fd).dirty == NPAGES
        assert self.arrived() == set(), "new bytes on the device before any flush"

    def arrived(self) -> set[int]:
        """Pages whose new content is on the device; the rest must be old."""
        pages = set()
        for page, offset in enumerate(self.blocks):
            block = self.fs.read_device(offset, PAGESIZE)
            if block == self.new[page]:
                pages.add(page)
            else:
                assert block == self.old[page], f"page {page}: torn block"
        return pages

    def still_dirty(self) -> set[int]:
        return {
            page
            for page in range(NPAGES)
            if blockdev.cachestat(self.fd, page * PAGESIZE, PAGESIZE).dirty
        }

    def expect(self, pages: set[int]) -> None:
        """Exactly ``pages`` reached the device; every other page is still dirty."""
        others = set(range(NPAGES)) - pages
        assert self.still_dirty() == others, "unflushed pages were written back"
        assert self.arrived() == pages

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)
        os.unlink(self.path)


@pytest.fixture
def scene(fs: blockdev.LoopFS, request: pytest.FixtureRequest) -> Iterator[Scene]:
    made = Scene(fs, request.node.name.replace("/", "_")[:100])
    try:
        made.dirty_all()
        yield made
    finally:
        made.close()


def test_method_sees_a_plain_fsync(scene: Scene) -> None:
    # The observation itself: nothing before (checked by the fixture), all after.
    os.fsync(scene.fd)
    scene.expect(set(range(NPAGES)))


@pytest.mark.parametrize(
    ("offset", "size", "pages"),
    [
        pytest.param(3 * PAGESIZE + 123, 10, {3}, id="unaligned-inside-one-page"),
        pytest.param(2 * PAGESIZE - 5, 10, {1, 2}, id="straddles-a-boundary"),
        pytest.param(
            PAGESIZE + 1, 2 * PAGESIZE, {1, 2, 3}, id="unaligned-two-pages-long"
        ),
        pytest.param(4 * PAGESIZE, PAGESIZE, {4}, id="one-aligned-page"),
        pytest.param(NPAGES * PAGESIZE - 1, 1, {NPAGES - 1}, id="last-byte"),
        pytest.param(0, 1, {0}, id="first-byte"),
    ],
)
def test_flush_writes_exactly_the_pages_of_the_range(
    scene: Scene, offset: int, size: int, pages: set[int]
) -> None:
    msyncext.flush(scene.map, offset, size)
    scene.expect(pages)


def test_flush_to_the_end(scene: Scene) -> None:
    msyncext.flush(scene.map, 5 * PAGESIZE + 17)
    scene.expect({5, 6, 7})


def test_whole_map_flush(scene: Scene) -> None:
    msyncext.flush(scene.map)
    scene.expect(set(range(NPAGES)))


def test_size_zero_writes_nothing(scene: Scene) -> None:
    msyncext.flush(scene.map, 3 * PAGESIZE + 5, 0)
    scene.expect(set())


def test_invalidate_still_writes(scene: Scene) -> None:
    msyncext.flush(scene.map, 2 * PAGESIZE, 1, flags=MS_SYNC | MS_INVALIDATE)
    scene.expect({2})


def test_memoryview_slice(scene: Scene) -> None:
    # The slice starts 100 bytes into page 4: offsets are relative to it.
    with memoryview(scene.map)[4 * PAGESIZE + 100 : 6 * PAGESIZE + 50] as view:
        msyncext.flush(view, PAGESIZE - 100, 1)  # first byte of page 5
        scene.expect({5})
        msyncext.flush(view)  # pages 4, 5 and the first 50 bytes of 6
    scene.expect({4, 5, 6})


def test_memoryview_slice_straddling(scene: Scene) -> None:
    with memoryview(scene.map)[PAGESIZE + 4000 :] as view:
        msyncext.flush(view, 90, 10)  # bytes 4090..4099 of page 1 -> page 1 and 2
    scene.expect({1, 2})


@needs_numpy
def test_numpy_memmap_with_an_unaligned_offset(scene: Scene) -> None:
    # numpy maps from the page below `offset` and starts the array 7 bytes in:
    # array byte 0 is file byte 2 * PAGESIZE + 7.
    arr = np.memmap(
        scene.path, dtype=np.uint8, mode="r+", offset=2 * PAGESIZE + 7,
        shape=(4 * PAGESIZE,),
    )  # fmt: skip
    try:
        msyncext.flush(arr, PAGESIZE - 8, 2)  # file bytes 3*P-1, 3*P
        scene.expect({2, 3})
        msyncext.flush(arr, 3 * PAGESIZE)  # file bytes 5*P+7 .. 6*P+7
        scene.expect({2, 3, 5, 6})
    finally:
        mapping = getattr(arr, "_mmap", None)
        del arr
        if mapping is not None:
            mapping.close()


def test_flush_ranges_writes_the_pages_of_every_pair(scene: Scene) -> None:
    calls = msyncext.flush_ranges(
        scene.map,
        [(5 * PAGESIZE + 4000, 200), (PAGESIZE + 5, 3), (PAGESIZE + 100, 10)],
        max_gap=0,
    )
    assert calls == 2
    scene.expect({1, 5, 6})


def test_flush_ranges_gap_merging_writes_the_gap(scene: Scene) -> None:
    # Documented trade-off: runs at most max_gap apart become one msync,
    # which also writes the dirty pages between them.
    calls = msyncext.flush_ranges(scene.map, [(PAGESIZE, 1), (4 * PAGESIZE, 1)])
    assert calls == 1
    scene.expect({1, 2, 3, 4})


def test_flush_ranges_on_a_slice(scene: Scene) -> None:
    with memoryview(scene.map)[3 * PAGESIZE - 1 :] as view:
        calls = msyncext.flush_ranges(view, [(0, 1), (1 + 3 * PAGESIZE, 5)], max_gap=0)
    assert calls == 2
    scene.expect({2, 6})


def test_flush_ranges_empty_writes_nothing(scene: Scene) -> None:
    assert msyncext.flush_ranges(scene.map, [(PAGESIZE, 0)]) == 0
    assert msyncext.flush_ranges(scene.map, []) == 0
    scene.expect(set())


ALL = frozenset(range(NPAGES))


@pytest.mark.parametrize(
    ("call", "pages"),
    [
        pytest.param(lambda m: msyncext.flush(m, flags=MS_ASYNC), ALL, id="flush"),
        pytest.param(
            lambda m: msyncext.flush(m, flags=MS_ASYNC | MS_INVALIDATE),
            ALL,
            id="flush-invalidate",
        ),
        pytest.param(
            lambda m: msyncext.flush_ranges(m, [(0, len(m))], flags=MS_ASYNC),
            ALL,
            id="flush_ranges",
        ),
        pytest.param(
            lambda m: msyncext.flush(m, PAGESIZE + 5, 2 * PAGESIZE, flags=MS_ASYNC),
            frozenset({1, 2, 3}),
            id="part",
        ),
    ],
)
def test_ms_async_starts_the_write_out_now(
    scene: Scene, call: object, pages: frozenset[int]
) -> None:
    """msyncext's MS_ASYNC starts writing the pages at once and returns: they
    reach the device without any further call, well before the flusher
    threads would (after dirty_expire_centisecs, 30 s), and only the pages
    asked for. Linux's own MS_ASYNC does nothing (the control below)."""
    assert callable(call)
    call(scene.map)
    # Wait until the kernel holds none of those pages dirty or in flight;
    # only then is the device read (a block read while the loop device
    # writes it can be half old, half new).
    deadline = time.monotonic() + 10
    while any(_unwritten(scene.fd, page) for page in pages):
        assert time.monotonic() < deadline, "the write-out did not finish"
        time.sleep(0.01)
    scene.expect(set(pages))


def _unwritten(fd: int, page: int) -> bool:
    counts = blockdev.cachestat(fd, page * PAGESIZE, PAGESIZE)
    return counts.dirty + counts.writeback > 0


def test_libc_ms_async_writes_nothing_on_linux(scene: Scene) -> None:
    """The control: msync(MS_ASYNC) itself, through ctypes, leaves every page
    dirty on Linux (2.6.19+), however long one waits for a flusher thread
    shorter than dirty_expire_centisecs."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.msync.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    anchor = ctypes.c_char.from_buffer(scene.map)
    address = ctypes.addressof(anchor)
    del anchor
    assert libc.msync(address, len(scene.map), MS_ASYNC) == 0
    time.sleep(0.5)
    scene.expect(set())
