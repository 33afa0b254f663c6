#!/usr/bin/env bash
# Run the whole test suite once against a build of the extension with
# AddressSanitizer and UndefinedBehaviorSanitizer (gcc's).
#
#   .ci/sanitize.sh [SOURCE_DIR [PYTEST_ARGS...]]
#
# SOURCE_DIR defaults to the repository holding this script, PYTEST_ARGS to
# the whole suite (an argument tests/... names a file of SOURCE_DIR's).
#
# Builds SOURCE_DIR with MSYNCEXT_SANITIZE=1 (setup.py: -fsanitize=address,
# undefined -fno-sanitize-recover=all -O1 -g) into a fresh venv and runs
# `python -Im pytest tests` from an empty directory, with gcc's sanitizer
# runtimes preloaded: the interpreter is not built with ASan, and the
# runtime must come before every other library, so the module cannot load
# without LD_PRELOAD. The preload reaches every child the tests start
# (Python children that import msyncext, and mkfs, mount, fusermount3...).
#
# Any ASan or UBSan report aborts the process it happens in: in pytest's own
# process that ends the run, in a child it fails the test that started it.
# The script then fails, and prints the reports it finds (ASAN_OPTIONS
# log_path keeps each process's report in a file, as a child's stderr may
# be captured by its test). Leak detection is off: CPython leaves memory
# allocated at exit on purpose; .ci/valgrind.sh checks msyncext's leaks.
#
# Skipped here, and why (-k below): the RSS tests (test_rss_stays_flat,
# test_a_tight_loop_stays_bounded) measure resident memory, which ASan's
# quarantine of freed blocks and its shadow memory make grow by design.
# And test_point6_a_child_forked_during_a_retry_neither_hangs_nor_forgets,
# which forks 11 times while another thread flushes (and allocates)
# without pause: gcc 12's libasan takes no lock of its allocator around
# fork() (LLVM added that pthread_atfork handler in 18), so a child forked
# while the other thread is inside ASan's allocator can wait forever on
# its lock. Seen once in a CI run ("forked child 10 hung in its first
# msyncext call"); CPython skips its fork tests under ASan for the same
# reason. Every plain run of the suite (each interpreter of the matrix)
# keeps testing msyncext's own fork safety there.
#
# Environment: PYTHON (interpreter for the venv, default python3),
# MSYNCEXT_TEST_MOUNTS as for the suite (.ci/run sets it),
# MSYNCEXT_LEAK_ROUNDS (default 500, see below), KEEP=1 keeps the scratch
# directory. Exit status: 0 clean, 1 a sanitizer report or a test
# failure, 2 the build or the set-up failed.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
src=$(cd "${1:-$here}" && pwd)
shift || true
python=${PYTHON:-python3}

# gcc 12's runtimes: the extension is linked against these very files.
asan=$(readlink -f "$(gcc -print-file-name=libasan.so)")
ubsan=$(readlink -f "$(gcc -print-file-name=libubsan.so)")
for lib in "$asan" "$ubsan"; do
    [[ -f $lib ]] || { echo "sanitize.sh: no sanitizer runtime at $lib (gcc's libasan/libubsan)" >&2; exit 2; }
done

work=$(mktemp -d "${TMPDIR:-/tmp}/msyncext-sanitize.XXXXXX")
cleanup() { if [[ "${KEEP:-0}" != 1 ]]; then rm -rf "$work"; else echo "kept $work"; fi; }
trap cleanup EXIT

echo "== ASan+UBSan build of $src into $work/venv"
"$python" -m venv "$work/venv"
venv_py="$work/venv/bin/python"
# A copy, so that the build leaves nothing in SOURCE_DIR; no wheel cache,
# so the sanitizer flags are really used.
mkdir "$work/src"
(cd "$src" && tar --exclude=.git --exclude='.*venv' --exclude='*.egg-info' \
    --exclude=build --exclude=dist --exclude=__pycache__ --exclude='.*_cache' \
    --exclude=.hypothesis -cf - .) | tar -C "$work/src" -xf -
MSYNCEXT_SANITIZE=1 MSYNCEXT_WERROR=1 "$venv_py" -m pip install -q \
    --disable-pip-version-check --no-cache-dir "$work/src[test]" || exit 2

mkdir "$work/logs" "$work/run"
export LD_PRELOAD="$asan:$ubsan"
# abort_on_error: a report ends the process with SIGABRT, which every test
# that runs a child already takes for a crash. use_sigaltstack=0: the
# children run with -X faulthandler, which installs its own signal stack;
# ASan, at a thread's exit, unmaps whatever signal stack is current, and
# aborted ("unable to unmap") on faulthandler's heap block after
# test_faults.py's subinterpreter scenario.
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:use_sigaltstack=0:log_path=$work/logs/asan:print_summary=1"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:abort_on_error=1:log_path=$work/logs/ubsan"

# test_leaks.py's rounds (5000 by default), as .ci/valgrind.sh does: its
# EBUSY path reads /proc/self/smaps (writeback.c, span_locked), which takes
# ~2.5 ms a call in a process with ASan's ~200 shadow mappings instead of
# ~0.1 ms; 5000 rounds made that one test take over 10 minutes.
export MSYNCEXT_LEAK_ROUNDS=${MSYNCEXT_LEAK_ROUNDS:-500}

mode=$(cd "$work/run" && "$venv_py" -I -c 'import msyncext._msync as m; print(m.BUILD_MODE)') || exit 2
if [[ $mode != sanitize ]]; then
    echo "sanitize.sh: the installed module is a '$mode' build, not 'sanitize'" >&2
    exit 2
fi
so=$(cd "$work/run" && "$venv_py" -I -c 'import msyncext._msync as m; print(m.__file__)')
echo "   built $so ($mode), preloading $LD_PRELOAD"

if [[ $# -gt 0 ]]; then
    # tests/... names a test of the copy that was built.
    tests=()
    for arg in "$@"; do
        [[ $arg == tests/* ]] && arg="$work/src/$arg"
        tests+=("$arg")
    done
else
    tests=("$work/src/tests" -k "not test_rss_stays_flat and not test_a_tight_loop_stays_bounded and not test_point6_a_child_forked_during_a_retry")
fi

echo "== pytest ${tests[*]} (ASan+UBSan)"
started=$SECONDS
set +e
(cd "$work/run" && "$venv_py" -Im pytest -p no:cacheprovider "${tests[@]}")
pytest_status=$?
set -e
echo "   pytest exited $pytest_status after $((SECONDS - started)) s"

shopt -s nullglob
reports=("$work"/logs/*)
if [[ ${#reports[@]} -gt 0 ]]; then
    for report in "${reports[@]}"; do
        echo "---- sanitizer report: $(basename "$report")"
        head -n 60 "$report"
    done
    echo "sanitize.sh: ${#reports[@]} sanitizer report(s)" >&2
    exit 1
fi
if [[ $pytest_status -ne 0 ]]; then
    echo "sanitize.sh: the tests failed under ASan+UBSan (status $pytest_status)" >&2
    exit 1
fi
echo "sanitize.sh: no sanitizer report, tests passed"
