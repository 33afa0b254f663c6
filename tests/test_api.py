"""The package's surface: its namespace, what importing it costs, help()."""

from __future__ import annotations

import inspect
import mmap
import pydoc
import re
import subprocess
import sys
from pathlib import Path

import msyncext
from msyncext import _msync


def test_namespace_holds_only_the_api() -> None:
    # No leftover imports or helpers: the names of __all__, dunders, and the
    # compiled module (a submodule is an attribute of its package).
    names = {n for n in dir(msyncext) if not re.fullmatch(r"__\w+__", n)}
    assert names == {*msyncext.__all__} - {"__version__"} | {"_msync"}


def test_import_loads_nothing_but_the_compiled_module() -> None:
    # Not typing (~7 ms), not numpy: a fresh interpreter, so that what the
    # test run imported does not hide it.
    code = (
        "import sys\n"
        "before = set(sys.modules)\n"
        "import msyncext\n"
        "print(*sorted(set(sys.modules) - before))\n"
    )
    done = subprocess.run(
        [sys.executable, "-I", "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert set(done.stdout.split()) <= {"msyncext", "msyncext._msync", "mmap"}


def _help(obj: object) -> str:
    return pydoc.render_doc(obj, renderer=pydoc.plaintext)


def test_help_shows_flush_ranges_defaults_by_name() -> None:
    text = _help(msyncext.flush_ranges)
    # Annotations are quoted up to 3.13 and bare from 3.14.
    assert re.search(r"\bflags(: '?SupportsIndex'?)? = MS_SYNC\b", text), text
    assert "_BufferLike" not in text


def test_help_shows_flush_defaults_by_name() -> None:
    assert "flags=MS_SYNC" in _help(msyncext.flush)
    # ... and tools that read the signature still can.
    assert str(inspect.signature(msyncext.flush)) == (
        "(buf, offset=0, size=None, *, flags=MS_SYNC, evict=False)"
    )
    assert (
        inspect.signature(msyncext.flush).parameters["flags"].default
        == msyncext.MS_SYNC
    )


def test_help_shows_flush_ranges_max_gap_by_name() -> None:
    text = _help(msyncext.flush_ranges)
    assert re.search(r"\bmax_gap(: '?SupportsIndex'?)? = DEFAULT_MAX_GAP\b", text), text
    assert str(msyncext.DEFAULT_MAX_GAP) not in text
    # The public constant itself is a plain int.
    assert type(msyncext.DEFAULT_MAX_GAP) is int
    assert repr(msyncext.DEFAULT_MAX_GAP) == "1048576"


def test_the_default_max_gap_is_default_max_gap() -> None:
    default = msyncext.flush_ranges.__kwdefaults__["max_gap"]
    assert default == msyncext.DEFAULT_MAX_GAP
    page, gap = msyncext.PAGESIZE, msyncext.DEFAULT_MAX_GAP
    with mmap.mmap(-1, 2 * gap + 4 * page) as m:
        # Runs DEFAULT_MAX_GAP bytes apart merge; a page further, they do not.
        assert msyncext.flush_ranges(m, [(0, 1), (page + gap, 1)]) == 1
        assert msyncext.flush_ranges(m, [(0, 1), (2 * page + gap, 1)]) == 2
        pairs = [(0, 1), (page + gap, 1), (3 * page + 2 * gap, 1)]
        by_name = _msync.batch_runs(m, pairs, msyncext.MS_SYNC, default)
        assert by_name == _msync.batch_runs(m, pairs, msyncext.MS_SYNC, gap)


# The exceptions the README's error table names (its "exception" column).
ERRORS = ("ValueError", "TypeError", "BufferError", "OSError", "WritebackError")


def test_flush_ranges_docstring_names_the_errors_it_raises() -> None:
    doc = msyncext.flush_ranges.__doc__ or ""
    for name in ERRORS:
        assert re.search(rf"\b{name}\b", doc), name
    readme = Path(__file__).resolve().parent.parent / "README.md"
    if readme.is_file():
        table = readme.read_text(encoding="utf-8").split("### Errors", 1)[1]
        table = table.split("\n#", 1)[0]
        named = set(re.findall(r"\| `(\w*Error)`", table))
        assert named == set(ERRORS), named


def test_writeback_error_docstring_says_what_the_readme_says() -> None:
    doc = " ".join((msyncext.WritebackError.__doc__ or "").split())
    assert "made before or after the failure" in doc
    assert "that existed in this process then" not in doc
    readme = Path(__file__).resolve().parent.parent / "README.md"
    if readme.is_file():
        text = " ".join(readme.read_text(encoding="utf-8").split())
        assert "made before or after" in text
