#!/usr/bin/env bash
# Run msyncext's C paths under valgrind memcheck; fail on any error in its code.
#
#   .ci/valgrind.sh [SOURCE_DIR]        (default: the repository holding this script)
#
# Builds a debug build (MSYNCEXT_DEBUG=1: -O0 -g3) of SOURCE_DIR into a fresh
# venv, runs the C-path tests (tests/test_leaks.py, a few hundred calls per
# path; VALGRIND_TESTS adds or replaces test files) under
#   PYTHONMALLOC=malloc valgrind --tool=memcheck --leak-check=full
# and parses valgrind's XML: an error (invalid read or write, use of an
# uninitialised value, a definite leak, ...) fails the run when any frame of
# its stacks is in a file of csrc/ or in the _msync extension. CPython's own
# noise is listed but does not fail the run. Exit status: 0 clean, 1 errors in
# msyncext, 2 the tests themselves failed or valgrind could not run.
#
# Environment: PYTHON (interpreter for the venv, default python3),
# VALGRIND_TESTS (pytest arguments, overriding the default selection),
# MSYNCEXT_LEAK_ROUNDS (calls per path, default 200), KEEP=1 keeps the
# scratch directory.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
src=$(cd "${1:-$here}" && pwd)
python=${PYTHON:-python3}

command -v valgrind >/dev/null || { echo "valgrind.sh: valgrind is not installed" >&2; exit 2; }

work=$(mktemp -d "${TMPDIR:-/tmp}/msyncext-valgrind.XXXXXX")
cleanup() { if [[ "${KEEP:-0}" != 1 ]]; then rm -rf "$work"; else echo "kept $work"; fi; }
trap cleanup EXIT

echo "== debug build of $src into $work/venv"
"$python" -m venv "$work/venv"
venv_py="$work/venv/bin/python"
"$venv_py" -m pip install -q --disable-pip-version-check pytest hypothesis numpy
# A copy, so that the build leaves nothing in SOURCE_DIR; no wheel cache,
# so the debug flags are really used.
mkdir "$work/src"
(cd "$src" && tar --exclude=.git --exclude='.*venv' --exclude='*.egg-info' \
    --exclude=build --exclude=dist --exclude=__pycache__ --exclude='.*_cache' \
    --exclude=.hypothesis -cf - .) | tar -C "$work/src" -xf -
MSYNCEXT_DEBUG=1 "$venv_py" -m pip install -q --disable-pip-version-check --no-cache-dir "$work/src"
so=$("$venv_py" -I -c 'import msyncext._msync as m; print(m.__file__)')
echo "   built $so"

if [[ -n "${VALGRIND_TESTS:-}" ]]; then
    read -r -a tests <<<"$VALGRIND_TESTS"
else
    # test_leaks.py drives every C path (success, each error, OSError) a few
    # hundred times; Hypothesis, subprocess and block-device tests add
    # nothing about memory and take minutes under valgrind.
    tests=(-p no:cacheprovider tests/test_leaks.py)
fi

# Not -I: it implies -E, which would ignore PYTHONMALLOC and leave pymalloc's
# arenas between valgrind and our blocks. -P -s keep the source folder and
# user site-packages off sys.path all the same.
echo "== valgrind memcheck: pytest ${tests[*]}"
set +e
(
    cd "$work/src"
    PYTHONMALLOC=malloc MSYNCEXT_VALGRIND=1 MSYNCEXT_LEAK_ROUNDS="${MSYNCEXT_LEAK_ROUNDS:-200}" \
        valgrind --tool=memcheck --leak-check=full --errors-for-leak-kinds=definite \
        --show-leak-kinds=definite --track-origins=yes --num-callers=40 \
        --xml=yes --xml-file="$work/memcheck.xml" \
        "$venv_py" -P -s -m pytest -q -x "${tests[@]}"
)
pytest_status=$?
set -e

"$venv_py" - "$work/memcheck.xml" "$src/csrc" <<'EOF'
import sys
from pathlib import Path
import xml.etree.ElementTree as ET

# Ours: a frame in the extension's object, or in a file of csrc/. Files by
# whole name: CPython has getargs.c, posixmodule.c, ...
OURS_OBJ = "_msync"
OURS_FILES = {p.name for p in Path(sys.argv[2]).iterdir()}
root = ET.parse(sys.argv[1]).getroot()
ours, theirs = [], 0
for error in root.iter("error"):
    frames = [
        (f.findtext("fn") or "?", f.findtext("file") or "", f.findtext("line") or "",
         f.findtext("obj") or "")
        for f in error.iter("frame")
    ]
    if any(Path(file).name in OURS_FILES or OURS_OBJ in file or OURS_OBJ in obj
           for _, file, _, obj in frames):
        ours.append((error, frames))
    else:
        theirs += 1
for error, frames in ours:
    what = error.findtext("kind")
    text = error.findtext("what") or error.findtext("xwhat/text") or ""
    print(f"msyncext: {what}: {text}")
    for fn, file, line, obj in frames[:15]:
        print(f"    {fn} ({file or obj}{':' + line if line else ''})")
print(f"valgrind: {len(ours)} error(s) in msyncext's code, "
      f"{theirs} elsewhere (CPython and libraries; not ours to fail on)")
sys.exit(1 if ours else 0)
EOF
xml_status=$?

if [[ $pytest_status -ne 0 ]]; then
    echo "valgrind.sh: the tests failed under valgrind (status $pytest_status)" >&2
    exit 2
fi
exit $xml_status
