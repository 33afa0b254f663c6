#!/usr/bin/env bash
# Fuzz the line reader and parsers of csrc/lines.c for a bounded time.
#
#   .ci/fuzz.sh [SOURCE_DIR]     (default: the repository holding this script)
#
# Builds tests/fuzz/fuzz_lines.c against csrc/lines.c alone with Debian's
# clang 14 (-fsanitize=fuzzer,address,undefined; libFuzzer comes with
# libclang-rt-14-dev), then runs it from the committed corpus
# (tests/fuzz/corpus/) for FUZZ_SECONDS or FUZZ_RUNS inputs, whichever
# comes first. Inputs libFuzzer finds are kept in a scratch directory, never
# added to the committed corpus. Any crash, sanitizer report, failed check
# of the target, timeout or out-of-memory fails the run, and so does a slow
# unit that is slow again when replayed (below); the input that
# caused it is copied to FUZZ_ARTIFACTS and printed in hex, and can be
# replayed with `fuzz_lines FILE` (KEEP=1 keeps the build).
#
# Environment: FUZZ_SECONDS (default 90), FUZZ_RUNS (default 3000000),
# FUZZ_ARTIFACTS (default /tmp/msyncext-fuzz-artifacts), FUZZ_SEED (default:
# libFuzzer's own, printed in its first lines), KEEP=1.
# Exit status: 0 nothing found, 1 the target failed, 2 the build failed.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
src=$(cd "${1:-$here}" && pwd)
seconds=${FUZZ_SECONDS:-90}
runs=${FUZZ_RUNS:-3000000}
artifacts=${FUZZ_ARTIFACTS:-/tmp/msyncext-fuzz-artifacts}

bash "$here/.ci/apt-install.sh" clang-14 libclang-rt-14-dev

work=$(mktemp -d "${TMPDIR:-/tmp}/msyncext-fuzz.XXXXXX")
cleanup() { if [[ "${KEEP:-0}" != 1 ]]; then rm -rf "$work"; else echo "kept $work"; fi; }
trap cleanup EXIT

echo "== building fuzz_lines (clang 14, libFuzzer, ASan, UBSan)"
clang-14 -g -O1 -fno-omit-frame-pointer \
    -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all \
    -Wall -Wextra -Werror -std=c11 -I"$src/csrc" \
    "$src/tests/fuzz/fuzz_lines.c" "$src/csrc/lines.c" -o "$work/fuzz_lines" || exit 2

mkdir "$work/found" "$work/crash"
args=(
    -max_total_time="$seconds" -runs="$runs"
    # Long enough for a line past the largest buffer the header can ask for.
    -max_len=40000 -timeout=10 -rss_limit_mb=2048
    -dict="$src/tests/fuzz/lines.dict" -artifact_prefix="$work/crash/"
    -print_final_stats=1
)
[[ -n "${FUZZ_SEED:-}" ]] && args+=(-seed="$FUZZ_SEED")

echo "== fuzz_lines for ${seconds} s or ${runs} runs, from tests/fuzz/corpus"
set +e
ASAN_OPTIONS="abort_on_error=0:detect_leaks=1" \
UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1" \
    "$work/fuzz_lines" "${args[@]}" "$work/found" "$src/tests/fuzz/corpus" \
    >"$work/log" 2>&1
status=$?
set -e
# Without libFuzzer's line per new coverage point and its suggested
# dictionary: what ran, its figures, and a failure's report.
awk '/^###### Recommended dictionary/ { skip = 1 }
     !skip && !/^#[0-9]+.*(NEW|REDUCE|pulse)/ { print }
     /^###### End of recommended dictionary/ { skip = 0 }' "$work/log" | tail -n 80

shopt -s nullglob
# A slow unit (libFuzzer writes one for an input that ran 10 s or more, its
# -report_slow_units, without reaching the timeout) is replayed three times:
# an input that is slow in itself is slow again and fails the run; one that
# replays in well under a second met a machine that stalled (a loaded CI
# host), which is reported and kept but fails nothing.
for f in "$work"/crash/slow-unit-*; do
    slow=0
    for _ in 1 2 3; do
        started=$(date +%s%N)
        "$work/fuzz_lines" -runs=1 "$f" >/dev/null 2>&1 || slow=1
        (( $(date +%s%N) - started < 1000000000 )) || slow=1
    done
    mkdir -p "$artifacts"
    cp "$f" "$artifacts/"
    if (( slow == 0 )); then
        echo "fuzz.sh: $(basename "$f") ran 10 s once but replays in under a second: the machine stalled, not the target (kept in $artifacts)"
        rm "$f"
    fi
done
found=("$work"/crash/*)
if [[ $status -ne 0 || ${#found[@]} -gt 0 ]]; then
    mkdir -p "$artifacts"
    for f in "${found[@]}"; do
        cp "$f" "$artifacts/"
        echo "---- $(basename "$f") (kept in $artifacts), first 256 bytes:"
        od -A d -t x1z -N 256 "$f"
    done
    echo "fuzz.sh: fuzz_lines failed (exit $status)" >&2
    exit 1
fi
echo "fuzz.sh: nothing found; $(ls "$work/found" | wc -l) new input(s) beyond the corpus"
