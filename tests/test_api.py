"""The package's surface: its namespace, what importing it costs, help()."""

from __future__ import annotations

import inspect
import pydoc
import re
import subprocess
import sys

import msyncext


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
