"""msyncext.flush on every kind of buffer, with real files and mappings."""

from __future__ import annotations

import array
import ctypes
import errno
import mmap
import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from blockdev import cachestat
from conftest import (
    PAGE,
    MapFactory,
    MappedFile,
    mlocked,
    needs_cachestat,
    needs_numpy,
    np,
    numpy_or_skip,
    sparse_memmap,
)

import msyncext
from msyncext import _msync

SYNC, ASYNC, INVAL = msyncext.MS_SYNC, msyncext.MS_ASYNC, msyncext.MS_INVALIDATE


def address_of(buf: Any) -> int:
    """The address of a writable buffer's first byte (export released)."""
    holder = ctypes.c_char.from_buffer(buf)
    try:
        return ctypes.addressof(holder)
    finally:
        del holder


# --- constants -------------------------------------------------------------


def test_constants_are_this_platforms() -> None:
    assert msyncext.PAGESIZE == mmap.PAGESIZE
    assert msyncext.PAGESIZE & (msyncext.PAGESIZE - 1) == 0
    # <sys/mman.h> values (msync's flags are not in mmap before Python 3.15).
    known = {"linux": (4, 1, 2), "darwin": (0x10, 1, 2), "freebsd": (0, 1, 2)}
    platform = sys.platform.rstrip("0123456789")
    if platform in known:
        assert known[platform] == (SYNC, ASYNC, INVAL)
    assert len({SYNC, ASYNC, INVAL}) == 3
    assert isinstance(msyncext.__version__, str)
    assert msyncext.__version__


# The valid flags per platform, from each kernel's msync: POSIX's four
# combinations, except that FreeBSD's kern_msync refuses MS_ASYNC together
# with MS_INVALIDATE.
EXPECTED_VALID_FLAGS = {
    "linux": {SYNC, ASYNC, SYNC | INVAL, ASYNC | INVAL},
    "darwin": {SYNC, ASYNC, SYNC | INVAL, ASYNC | INVAL},
    "freebsd": {SYNC, ASYNC, SYNC | INVAL},
}


def test_valid_flags_are_this_platforms_table() -> None:
    platform = sys.platform.rstrip("0123456789")
    expected = EXPECTED_VALID_FLAGS.get(
        platform, {SYNC, ASYNC, SYNC | INVAL, ASYNC | INVAL}
    )
    assert expected == msyncext.VALID_FLAGS
    assert isinstance(msyncext.VALID_FLAGS, frozenset)
    # Every combination outside the table is refused before any syscall,
    # by both functions, with the same message.
    anonymous = mmap.mmap(-1, PAGE)
    for flags in range(-1, 64):
        if flags in msyncext.VALID_FLAGS:
            continue
        with pytest.raises(ValueError, match="is not one this platform accepts") as a:
            msyncext.flush(anonymous, flags=flags)
        with pytest.raises(ValueError, match="is not one this platform accepts") as b:
            msyncext.flush_ranges(anonymous, [(0, 1)], flags=flags)
        assert str(a.value) == str(b.value)


class _IndexReturnsStr:
    def __index__(self) -> Any:
        return "3"


@pytest.mark.parametrize("argument", ["offset", "size", "flags"])
def test_index_returning_a_non_int_names_the_argument(argument: str) -> None:
    with pytest.raises(TypeError, match=f"^{argument}: ") as info:
        msyncext.flush(mmap.mmap(-1, PAGE), **{argument: _IndexReturnsStr()})
    # The interpreter's own words follow ("__index__ returned non-int" up to
    # 3.14, "__index__() must return an int" from 3.15).
    assert "__index__" in str(info.value)


def test_public_names() -> None:
    for name in msyncext.__all__:
        assert hasattr(msyncext, name), name


# --- every buffer kind ------------------------------------------------------


@pytest.mark.parametrize(
    "access",
    [mmap.ACCESS_WRITE, mmap.ACCESS_DEFAULT, mmap.ACCESS_READ, mmap.ACCESS_COPY],
)
def test_every_access_mode(shm_map: MapFactory, access: int) -> None:
    mapped = shm_map(8 * PAGE, access=access)
    for flags in (SYNC, ASYNC, SYNC | INVAL, ASYNC | INVAL):
        msyncext.flush(mapped.map, flags=flags)
        msyncext.flush(mapped.map, 3, 5000, flags=flags)
        msyncext.flush(mapped.map, 8 * PAGE - 1, 1, flags=flags)


def test_anonymous_map() -> None:
    with mmap.mmap(-1, 4 * PAGE) as m:
        m[:5] = b"hello"
        msyncext.flush(m)
        msyncext.flush(m, 1, 2)
        msyncext.flush(m, PAGE + 7, flags=ASYNC)


# --- copies: memory that can never be a mapping of a file ------------------


class _Bytes(bytes):
    pass


class _ByteArray(bytearray):
    pass


class _Array(array.array):  # type: ignore[type-arg]
    pass


# name -> (the copy from a map m, the objects whose exports must be gone after
# a refusal, in the order to check them). A slice of an mmap is bytes: the
# mistake this refusal is for.
COPIES: dict[str, Callable[[mmap.mmap], tuple[Any, list[Any]]]] = {
    "mmap slice": lambda m: (m[100:105], []),
    "bytes subclass": lambda m: (_Bytes(m[100:105]), []),
    "bytearray": lambda m: (b := bytearray(m[:64]), [b]),
    "bytearray subclass": lambda m: (b := _ByteArray(m[:64]), [b]),
    "array.array": lambda m: (a := array.array("B", m[:64]), [a]),
    "array.array subclass": lambda m: (a := _Array("B", m[:64]), [a]),
    "memoryview of bytes": lambda m: (v := memoryview(m[:64]), [v]),
    "memoryview of bytearray": lambda m: (
        v := memoryview(b := bytearray(m[:64]))[8:],
        [v, b],
    ),
    "memoryview of array.array": lambda m: (
        v := memoryview(a := array.array("I", m[:64])),
        [v, a],
    ),
    "numpy array over bytes": lambda m: (
        numpy_or_skip().frombuffer(m[:64], "uint8"),
        [],
    ),
    # The ctypes object itself holds an export of the bytearray.
    "ctypes over bytearray": lambda m: (
        (ctypes.c_char * 64).from_buffer(bytearray(m[:64])),
        [],
    ),
}

# Every entry point that pins a buffer.
PINNING: dict[str, Callable[[Any], object]] = {
    "flush": lambda buf: msyncext.flush(buf, 1, 2),
    "flush-whole": msyncext.flush,
    "flush_ranges": lambda buf: msyncext.flush_ranges(buf, [(1, 2)]),
    "flush_ranges-empty": lambda buf: msyncext.flush_ranges(buf, []),
    "clear_writeback_error": msyncext.clear_writeback_error,
    "page_offset": _msync.page_offset,
    "batch_runs": lambda buf: _msync.batch_runs(buf, [(1, 2)], SYNC, 0),
}


def _no_export_left(obj: Any) -> None:
    """Raise BufferError if an export of obj is still held."""
    if isinstance(obj, memoryview):
        obj.release()  # refused while its buffer is exported
    else:
        obj.append(0)  # bytearray and array.array refuse to resize then
        obj.pop()


@pytest.mark.parametrize("call", sorted(PINNING))
@pytest.mark.parametrize("copy", sorted(COPIES))
def test_copies_are_refused(shm_map: MapFactory, copy: str, call: str) -> None:
    # m[100:105] is a bytes copy: flushing it synced a heap page and returned
    # None, saying nothing of the file. Refused now, naming both fixes.
    mapped = shm_map(4 * PAGE)
    buf, exported = COPIES[copy](mapped.map)
    with pytest.raises(TypeError) as info:
        PINNING[call](buf)
    message = str(info.value)
    assert message.startswith("buf (")
    assert type(buf).__qualname__ in message
    assert "is memory of its own, never a mapping of a file" in message
    assert "flush(m, 100, 5)" in message
    assert "memoryview(m)[100:105]" in message
    for obj in exported:
        _no_export_left(obj)
    mapped.map.close()


def test_copy_message_names_what_it_is_over() -> None:
    with pytest.raises(TypeError) as info:
        msyncext.flush(memoryview(bytearray(8))[2:])
    assert str(info.value).startswith("buf (memoryview over bytearray) is memory")
    with pytest.raises(TypeError) as info:
        msyncext.flush(array.array("d", [1.0]))
    assert str(info.value).startswith("buf (array.array) is memory")
    with pytest.raises(TypeError) as info:
        msyncext.flush(_Bytes(b"x"))
    assert str(info.value).startswith(f"buf ({__name__}._Bytes) is memory")


@needs_numpy
def test_copy_message_names_a_numpy_array_over_bytes() -> None:
    with pytest.raises(TypeError) as info:
        msyncext.flush(np.frombuffer(b"12345678", np.uint8))
    assert str(info.value).startswith("buf (numpy.ndarray over bytes) is memory")


def test_maps_and_views_of_maps_are_not_copies(shm_map: MapFactory) -> None:
    # The refusal goes by the memory's owner, not the kind of view.
    mapped = shm_map(4 * PAGE)
    views: list[Any] = [
        mapped.map,
        memoryview(mapped.map)[100:105],
        memoryview(memoryview(mapped.map)[PAGE:])[3:],
        (ctypes.c_char * 5).from_buffer(mapped.map, 100),
    ]
    if np is not None:
        views.append(np.frombuffer(mapped.map, np.uint8)[100:105])
    while views:
        buf = views.pop()
        msyncext.flush(buf)
        msyncext.flush_ranges(buf, [(0, 1)])
        assert msyncext.clear_writeback_error(buf) is None
        del buf
    mapped.map.close()


@needs_cachestat
def test_map_with_file_offset(disk_map: MapFactory) -> None:
    mapped = disk_map(8 * PAGE, offset=mmap.ALLOCATIONGRANULARITY)
    file_page = mmap.ALLOCATIONGRANULARITY // PAGE
    mapped.dirty_pages(2, 5)
    msyncext.flush(mapped.map, 2 * PAGE + 10, 1)
    assert not mapped.page_dirty(file_page + 2)
    assert mapped.page_dirty(file_page + 5)


@needs_cachestat
def test_memoryview_slice_starting_inside_a_page(disk_map: MapFactory) -> None:
    mapped = disk_map(16 * PAGE)
    view = memoryview(mapped.map)[PAGE + 7 : 10 * PAGE]
    try:
        mapped.dirty_pages(1, 2, 9)
        # view[PAGE - 7] is the first byte of file page 2.
        msyncext.flush(view, PAGE - 7, 1)
        assert mapped.page_dirty(1)
        assert not mapped.page_dirty(2)
        assert mapped.page_dirty(9)
        msyncext.flush(view, 0, 1)
        assert not mapped.page_dirty(1)
        msyncext.flush(view)  # to its end: file page 9 is its last
        assert not mapped.page_dirty(9)
    finally:
        view.release()


@needs_cachestat
@needs_numpy
def test_numpy_memmap_with_unaligned_offset(tmp_path: Path) -> None:
    path = tmp_path / "array.bin"
    array = sparse_memmap(path, 8 * PAGE, dtype=np.uint8, offset=100)
    fd = os.open(path, os.O_RDONLY)
    try:

        def dirty(page: int) -> bool:
            state = cachestat(fd, page * PAGE, PAGE)
            return state.dirty + state.writeback > 0

        array[PAGE - 100] = 1  # file page 1
        array[5 * PAGE] = 1  # file page 5
        assert dirty(1)
        assert dirty(5)
        msyncext.flush(array, PAGE - 100, 1)
        assert not dirty(1)
        assert dirty(5)
        msyncext.flush(array)
        assert not dirty(5)
        # A typed view: offsets count bytes, not elements.
        words = array.view(np.uint32)
        words[PAGE // 4] = 7  # byte PAGE of the array, in file page 1
        msyncext.flush(words, PAGE, 4)
        assert not dirty(1)
    finally:
        os.close(fd)
        del array


def test_non_contiguous_buffer_is_refused(shm_map: MapFactory) -> None:
    mapped = shm_map(4 * PAGE)
    view = memoryview(mapped.map)[::2]
    try:
        with pytest.raises(BufferError, match=r"^buf \(memoryview\) is not contiguous"):
            msyncext.flush(view)
    finally:
        view.release()
    mapped.map.close()  # no export left behind


# --- exactly the covering pages ---------------------------------------------


@needs_cachestat
def test_unaligned_range_cleans_its_page_and_no_other(disk_map: MapFactory) -> None:
    mapped = disk_map(64 * PAGE)
    mapped.dirty_pages(3, 40)
    assert mapped.page_dirty(3)
    assert mapped.page_dirty(40)
    msyncext.flush(mapped.map, 3 * PAGE + 123, 45)
    assert not mapped.page_dirty(3)
    assert mapped.page_dirty(40)


@needs_cachestat
def test_range_straddling_a_page_boundary_cleans_both(disk_map: MapFactory) -> None:
    mapped = disk_map(16 * PAGE)
    mapped.dirty_pages(4, 5, 6, 7)
    msyncext.flush(mapped.map, 6 * PAGE - 5, 10)  # bytes in pages 5 and 6
    assert mapped.page_dirty(4)
    assert not mapped.page_dirty(5)
    assert not mapped.page_dirty(6)
    assert mapped.page_dirty(7)


@needs_cachestat
def test_range_ending_on_a_page_boundary_stops_there(disk_map: MapFactory) -> None:
    mapped = disk_map(16 * PAGE)
    mapped.dirty_pages(2, 3)
    msyncext.flush(mapped.map, 2 * PAGE + 1, PAGE - 1)  # last byte is page 2's
    assert not mapped.page_dirty(2)
    assert mapped.page_dirty(3)


@needs_cachestat
def test_size_none_means_to_the_end(disk_map: MapFactory) -> None:
    mapped = disk_map(16 * PAGE)
    mapped.dirty_pages(0, 8, 15)
    msyncext.flush(mapped.map, 8 * PAGE + 1)
    assert mapped.page_dirty(0)
    assert not mapped.page_dirty(8)
    assert not mapped.page_dirty(15)
    msyncext.flush(mapped.map)
    assert not mapped.page_dirty(0)


@needs_cachestat
def test_ms_async_and_invalidate_are_accepted(disk_map: MapFactory) -> None:
    mapped = disk_map(8 * PAGE)
    mapped.dirty_pages(1)
    msyncext.flush(mapped.map, PAGE, 1, flags=ASYNC | INVAL)
    msyncext.flush(mapped.map, PAGE, 1, flags=SYNC | INVAL)
    assert not mapped.page_dirty(1)


# --- argument forms ---------------------------------------------------------


@needs_cachestat
@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        ((PAGE + 1, 2), {}),
        ((PAGE + 1,), {"size": 2}),
        ((), {"offset": PAGE + 1, "size": 2}),
        ((PAGE + 1, 2), {"flags": SYNC}),
        ((), {"size": 2, "offset": PAGE + 1, "flags": SYNC | INVAL}),
        pytest.param(
            *(
                ((np.int64(PAGE + 1), np.uint16(2)), {"flags": np.int32(SYNC)})
                if np is not None
                else ((), {})
            ),
            marks=needs_numpy,
            id="numpy-integers",
        ),
    ],
)
def test_positional_and_keyword_calls(
    disk_map: MapFactory, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    mapped = disk_map(4 * PAGE)
    mapped.dirty_pages(1, 2)
    msyncext.flush(mapped.map, *args, **kwargs)
    assert not mapped.page_dirty(1)
    assert mapped.page_dirty(2)


def test_buf_by_keyword(shm_map: MapFactory) -> None:
    mapped = shm_map(2 * PAGE)
    msyncext.flush(buf=mapped.map, offset=1, size=1)


def test_size_zero_makes_no_syscall(shm_map: MapFactory) -> None:
    # MS_INVALIDATE over a locked page fails with EBUSY when msync runs, so a
    # silent success with size=0 shows that no syscall was made.
    mapped = shm_map(4 * PAGE)
    with mlocked(mapped.map, 0, PAGE):
        msyncext.flush(mapped.map, 10, 0, flags=SYNC | INVAL)
        msyncext.flush(mapped.map, 4 * PAGE, None, flags=SYNC | INVAL)
        with pytest.raises(OSError, match="busy") as info:
            msyncext.flush(mapped.map, 10, 1, flags=SYNC | INVAL)
        assert info.value.errno == errno.EBUSY


def test_failed_msync_raises_oserror_naming_the_range(shm_map: MapFactory) -> None:
    mapped = shm_map(4 * PAGE)
    with mlocked(mapped.map, PAGE, PAGE):
        # The range is stated as flush_ranges states it: the bytes of the
        # buffer msync was given, whole pages (clipped to the buffer).
        where = f"buffer bytes [{PAGE}, {2 * PAGE})"
        with pytest.raises(OSError, match=re.escape(where)) as info:
            msyncext.flush(mapped.map, PAGE + 4, 100, flags=SYNC | INVAL)
        error = info.value
        assert type(error) is OSError  # a bad call, not a write-back failure
        assert error.errno == errno.EBUSY
        assert error.strerror == os.strerror(errno.EBUSY)
        assert error.filename == where
        assert (
            str(error) == f"[Errno {errno.EBUSY}] {os.strerror(errno.EBUSY)}: {where!r}"
        )
        # Pages outside the locked one are not affected.
        msyncext.flush(mapped.map, 0, PAGE, flags=SYNC | INVAL)
        msyncext.flush(mapped.map, 2 * PAGE, flags=SYNC | INVAL)
    mapped.map.close()  # the failed call left no export behind


# --- rejected input ---------------------------------------------------------

BAD_CALLS: list[tuple[str, tuple[Any, ...], dict[str, Any], type[Exception], str]] = [
    ("negative offset", (-1,), {}, ValueError, "offset -1 is negative"),
    ("negative size", (0, -5), {}, ValueError, "size -5 is negative"),
    ("offset past end", (8 * PAGE + 1,), {}, ValueError, f"offset {8 * PAGE + 1}"),
    ("size past end", (10, 8 * PAGE), {}, ValueError, f"size {8 * PAGE} runs past"),
    ("size past end by one", (0, 8 * PAGE + 1), {}, ValueError, "runs past the end"),
    ("float offset", (1.0,), {}, TypeError, "offset must be an integer, not 1.0"),
    ("str size", (0, "10"), {}, TypeError, "size must be an integer, not '10'"),
    ("bool offset", (True,), {}, TypeError, "offset must be an integer, not True"),
    ("huge offset", (2**64,), {}, ValueError, f"offset {2**64} is past the end"),
    ("huge negative offset", (-(2**70),), {}, ValueError, f"{-(2**70)} is negative"),
    ("huge negative size", (0, -(2**70)), {}, ValueError, f"{-(2**70)} is negative"),
    ("huge size", (0, 2**63), {}, ValueError, f"size {2**63} is past the end"),
    (
        "None flags",
        (),
        {"flags": None},
        TypeError,
        "flags must be an integer, not None",
    ),
    ("float flags", (), {"flags": float(SYNC)}, TypeError, "flags must be an integer"),
    ("str flags", (), {"flags": "MS_SYNC"}, TypeError, "'MS_SYNC'"),
    ("bool flags", (), {"flags": True}, TypeError, "not True"),
    (
        "sync and async",
        (),
        {"flags": SYNC | ASYNC},
        ValueError,
        f"flags {SYNC | ASYNC} is not one this platform accepts: MS_SYNC ({SYNC})",
    ),
    ("invalidate alone", (), {"flags": INVAL}, ValueError, f"flags {INVAL} is not"),
    ("unknown bit", (), {"flags": SYNC | 0x100}, ValueError, f"flags {SYNC | 0x100}"),
    ("negative flags", (), {"flags": -1}, ValueError, "flags -1 is not"),
    ("huge flags", (), {"flags": 2**80}, ValueError, f"flags {2**80}"),
    (
        "unknown keyword",
        (),
        {"offst": 1},
        TypeError,
        "unexpected keyword argument 'offst'",
    ),
    (
        "offset twice",
        (1,),
        {"offset": 1},
        TypeError,
        "multiple values for argument 'offset'",
    ),
    ("too many positional", (0, 1, SYNC), {}, TypeError, "from 1 to 3 positional"),
]
if SYNC | ASYNC != SYNC and SYNC != 0 and ASYNC != 0:
    BAD_CALLS.append(
        ("neither sync nor async", (), {"flags": 0}, ValueError, "flags 0 is not")
    )


@needs_cachestat
@pytest.mark.parametrize(
    ("args", "kwargs", "exc_type", "message"),
    [case[1:] for case in BAD_CALLS],
    ids=[case[0] for case in BAD_CALLS],
)
def test_bad_arguments_are_refused_before_any_syscall(
    disk_map: MapFactory,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    exc_type: type[Exception],
    message: str,
) -> None:
    mapped = disk_map(8 * PAGE)
    mapped.dirty_pages(0, 7)
    with pytest.raises(exc_type) as info:
        msyncext.flush(mapped.map, *args, **kwargs)
    assert message in str(info.value)
    assert mapped.page_dirty(0)
    assert mapped.page_dirty(7)
    mapped.map.resize(9 * PAGE)  # no export was left behind
    mapped.map.close()


@pytest.mark.parametrize("obj", [None, 42, 1.5, "text", object(), [1, 2]])
def test_object_without_a_buffer_is_a_type_error(obj: object) -> None:
    with pytest.raises(
        TypeError, match=r"^buf must be an object with the buffer"
    ) as info:
        msyncext.flush(obj)
    assert type(obj).__name__ in str(info.value)
    with pytest.raises(TypeError, match=r"^buf must be an object with the buffer"):
        msyncext.flush_ranges(obj, [])


def test_missing_buffer_argument() -> None:
    with pytest.raises(TypeError, match="missing required argument 'buf'"):
        msyncext.flush()  # type: ignore[call-arg]


def test_closed_mmap_is_a_value_error(shm_map: MapFactory) -> None:
    mapped = shm_map(2 * PAGE)
    mapped.map.close()
    with pytest.raises(ValueError, match="closed"):
        msyncext.flush(mapped.map)
    with pytest.raises(ValueError, match="closed"):
        msyncext.flush(mapped.map, 0, 0)


def test_empty_buffer(shm_map: MapFactory) -> None:
    mapped = shm_map(PAGE)
    empty = memoryview(mapped.map)[PAGE:]
    msyncext.flush(empty)
    msyncext.flush(empty, 0, 0)
    with pytest.raises(ValueError, match="offset 1 is past the end of a 0-byte"):
        msyncext.flush(empty, 1)


# --- the export is held during the call, and only then -----------------------


def _flush_while_closing(
    mapped: MappedFile, action: str
) -> tuple[int, BaseException | None]:
    """Flush a large dirty map in one thread while this one tries ``action``.

    Returns how many attempts were refused with BufferError while the flush
    ran, and what the flushing thread raised, if anything.
    """
    mapped.map[:] = os.urandom(len(mapped.map))
    started = threading.Event()
    outcome: list[BaseException | None] = [None]

    def flusher() -> None:
        started.set()
        try:
            msyncext.flush(mapped.map)
        except BaseException as exc:  # reported to the main thread
            outcome[0] = exc

    thread = threading.Thread(target=flusher)
    thread.start()
    started.wait()
    refused = 0
    while thread.is_alive():
        try:
            if action == "close":
                mapped.map.close()
            else:
                mapped.map.resize(len(mapped.map) + PAGE)
        except BufferError:
            refused += 1
            continue
        except ValueError:
            break  # closed or resized before the flush began
        break
    thread.join()
    return refused, outcome[0]


@pytest.mark.parametrize("action", ["close", "resize"])
def test_close_and_resize_are_refused_during_a_flush(
    disk_map: MapFactory, action: str
) -> None:
    overlapped = False
    for _ in range(5):
        mapped = disk_map(32 * 1024 * 1024 // PAGE * PAGE)
        refused, error = _flush_while_closing(mapped, action)
        if refused:
            overlapped = True
            assert error is None, error  # the flush itself succeeded
        elif error is not None:
            # The other thread won the race before flush took its export.
            assert isinstance(error, ValueError), error
        if overlapped:
            break
    assert overlapped, "no close/resize attempt ever overlapped a 32 MiB flush"
    # After the flush no export is left: both operations work at once.
    if not mapped.map.closed:
        mapped.map.resize(len(mapped.map) + PAGE)
        mapped.map.close()


def test_export_released_after_success_and_error(shm_map: MapFactory) -> None:
    mapped = shm_map(4 * PAGE)
    msyncext.flush(mapped.map, 1, 2)
    mapped.map.resize(5 * PAGE)
    with pytest.raises(ValueError, match="runs past"):
        msyncext.flush(mapped.map, 1, 10 * PAGE)
    mapped.map.resize(6 * PAGE)
    mapped.map.close()


# --- the compiled module ----------------------------------------------------


def test_tests_import_the_installed_package() -> None:
    source_tree = Path(__file__).resolve().parent.parent / "msyncext"
    package_dir = Path(msyncext.__file__).resolve().parent
    assert package_dir != source_tree, (
        f"tests imported the source folder {source_tree}, not the installation; "
        "install the package and run `python -Im pytest tests`"
    )
    compiled = Path(msyncext._msync.__file__).resolve()
    assert compiled.parent == package_dir
    assert compiled.suffix == ".so"


# Runs in a fresh process: create subinterpreters with this Python's API,
# import msyncext in each, flush, and say which API and config were used.
_SUBINTERPRETER_SCRIPT = """
import sys
import msyncext

code = (
    "import mmap, msyncext\\n"
    "m = mmap.mmap(-1, 8192)\\n"
    "msyncext.flush(m, 1, 2)\\n"
    "assert msyncext.flush_ranges(m, [(0, 1), (5000, 1)]) == 1\\n"
    "assert msyncext.PAGESIZE == mmap.PAGESIZE\\n"
    "m.close()\\n"
)
try:
    from concurrent import interpreters  # 3.14+
except ImportError:
    interpreters = None
if interpreters is not None:
    for _ in range(2):
        interp = interpreters.create()  # isolated: its own GIL
        try:
            interp.exec(code)
        finally:
            interp.close()
    print("concurrent.interpreters isolated")
else:
    try:
        import _interpreters as low  # 3.13
    except ImportError:
        import _xxsubinterpreters as low  # 3.11, 3.12
    for _ in range(2):
        if sys.version_info >= (3, 13):
            interp = low.create("isolated")
            config = low.get_config(interp)
            assert config.gil == "own" and config.check_multi_interp_extensions
            kind = "isolated"
        elif sys.version_info >= (3, 12):
            interp = low.create(isolated=True)
            kind = "isolated"
        else:
            interp = low.create()  # 3.11 has no per-interpreter GIL
            kind = "legacy"
        try:
            if hasattr(low, "exec"):
                failure = low.exec(interp, code)
                assert failure is None, failure
            else:
                low.run_string(interp, code)
        finally:
            low.destroy(interp)
    print(low.__name__, kind)
exec(code)
"""


def test_module_imports_in_a_fresh_process_and_subinterpreters(tmp_path: Path) -> None:
    # Never skipped: every supported CPython has some subinterpreter API, and
    # 3.12+ makes isolated ones (own GIL), which refuse modules that do not
    # declare Py_mod_multiple_interpreters.
    script = tmp_path / "sub.py"
    script.write_text(_SUBINTERPRETER_SCRIPT)
    result = subprocess.run(
        [sys.executable, "-I", "-W", "error", str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    expected = "legacy" if sys.version_info < (3, 12) else "isolated"
    assert result.stdout.split()[-1] == expected, result.stdout


# --- a NumPy array whose mmap changed under it ---------------------------------


@needs_numpy
def test_array_over_a_closed_or_resized_mmap_is_refused(tmp_path: Path) -> None:
    # numpy keeps the mmap as the array's base but holds no export of it, so
    # the mmap can be closed or resized (moved) under the array. msyncext
    # exports the mmap for the call and refuses memory the mmap no longer
    # holds, instead of msyncing whatever is mapped there now.
    with (tmp_path / "grown.bin").open("w+b") as f:
        f.truncate(16 * PAGE)
        with mmap.mmap(f.fileno(), 16 * PAGE) as m:
            array = np.ndarray((4 * PAGE,), np.uint8, buffer=m, offset=8 * PAGE)
            msyncext.flush(array)
            m.resize(1024 * PAGE)  # maps usually move when they grow this much
            moved = address_of(m) != address_of(array) - 8 * PAGE
            if moved:
                with pytest.raises(ValueError, match="outside the memory of the mmap"):
                    msyncext.flush(array)
                with pytest.raises(ValueError, match="outside the memory of the mmap"):
                    msyncext.flush_ranges(array, [(0, 1)])
            # Shrunk under an array (in place, always): its end lies past
            # the mmap's, and msync there would reach unmapped memory.
            tail = np.ndarray((4 * PAGE,), np.uint8, buffer=m, offset=8 * PAGE)
            m.resize(9 * PAGE)
            with pytest.raises(ValueError, match="outside the memory of the mmap"):
                msyncext.flush(tail)
            with pytest.raises(ValueError, match="outside the memory of the mmap"):
                msyncext.flush_ranges(tail, [(0, 1)])
            del array, tail
    path = tmp_path / "closed.bin"
    array2 = sparse_memmap(path, 4 * PAGE, dtype=np.uint8, offset=0)
    array2._mmap.close()  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="closed"):
        msyncext.flush(array2)
    with pytest.raises(ValueError, match="closed"):
        msyncext.flush_ranges(array2, [(0, 1)])
    if not moved:
        pytest.skip("the kernel grew the map in place; the moved case did not arise")
