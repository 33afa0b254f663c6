#!/usr/bin/env bash
# One interpreter of the matrix: install msyncext into a fresh venv with no
# package index, then run the whole test suite against that installation.
# Runs on the host and, copied in, inside the sid chroot; .ci/matrix.sh calls
# it and reads the one-line result it writes.
#
#   suite.sh LABEL PYTHON WORK TESTS (--wheel WHEEL | --build SRC) [--free-threaded] [--debug]
#
#   LABEL     name in the summary (3.12, 3.14t, 3.14-dbg, ...)
#   PYTHON    the interpreter to make the venv from
#   WORK      an empty scratch directory of this interpreter's own
#   TESTS     a clean copy of the tree whose tests/ run (pytest -I from an
#             empty directory: the copy's msyncext/ is never importable)
#   --wheel   install this wheel (the abi3 one built once, on 3.11)
#   --build   build a wheel from the clean copy SRC with `pip wheel` first,
#             and check its tags and contents
#   --free-threaded   assert the GIL stays disabled after `import msyncext`
#                     under -W error
#   --debug   assert the interpreter is a Py_DEBUG build
#
# Downloads (test dependencies, the build backend) use this interpreter's
# pip and whatever pip configuration the caller's environment gives; the
# install itself sees no index and no configuration. The result line goes to
# WORK/result: "LABEL RC SECONDS passed=N failed=N skipped=N ..." .
set -euo pipefail
shopt -s nullglob

[[ $# -ge 6 ]] || { echo "usage: $0 LABEL PYTHON WORK TESTS (--wheel W | --build SRC) [--free-threaded] [--debug]" >&2; exit 2; }
label=$1 python=$2 work=$3 tests=$4
shift 4
wheel="" src="" free_threaded=0 debug=0
while [[ $# -gt 0 ]]; do
    case $1 in
        --wheel) wheel=$2; shift 2 ;;
        --build) src=$2; shift 2 ;;
        --free-threaded) free_threaded=1; shift ;;
        --debug) debug=1; shift ;;
        *) echo "suite.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done

started=$SECONDS
say() { printf '[%s %4d s] %s\n' "$label" $((SECONDS - started)) "$*"; }
result() {  # rc counts...
    echo "$label $1 $((SECONDS - started)) ${*:2} wheel=$(basename "${wheel:-none}")" >"$work/result"
}
fail() {
    say "FAIL: $*" >&2
    result 1 "error=setup"
    exit 1
}

mkdir -p "$work/deps" "$work/dist" "$work/run"
say "$("$python" -c 'import sys; print(sys.version.replace(chr(10), " "))')"

"$python" -m venv "$work/venv" || fail "python -m venv failed"
py=$work/venv/bin/python
pip=("$py" -m pip --disable-pip-version-check)

if [[ -n $src ]]; then
    # pip builds in the tree it is given: a copy of our own keeps the clean
    # copy clean for the next interpreter.
    cp -r "$src" "$work/src"
    src=$work/src
    say "pip wheel from a clean copy"
    "${pip[@]}" wheel -q --no-deps --wheel-dir "$work/dist" "$src" || fail "pip wheel failed"
    wheels=("$work/dist"/msyncext-*.whl)
    [[ ${#wheels[@]} == 1 ]] || fail "expected one wheel in $work/dist, got ${#wheels[@]}"
    wheel=${wheels[0]}
    # The checks .ci/wheels.sh makes of the abi3 wheel, where they are cheap:
    # this interpreter's own tag, exactly the files the package is made of.
    "$py" -I - "$wheel" "$src" <<'EOF' || fail "the built wheel's tags or contents are wrong"
import sys, sysconfig, zipfile
from pathlib import Path

wheel, src = Path(sys.argv[1]), Path(sys.argv[2])
name, version, *tags = wheel.stem.split("-")
py = f"cp{sys.version_info.major}{sys.version_info.minor}"
abi = py + ("t" if sysconfig.get_config_var("Py_GIL_DISABLED") else "")
if sysconfig.get_config_var("Py_GIL_DISABLED"):
    want_module = "msyncext/_msync" + sysconfig.get_config_var("EXT_SUFFIX")
    want_tags = [py, abi]
else:  # a GIL build (the debug one) makes the limited-API wheel
    want_module = "msyncext/_msync.abi3.so"
    want_tags = ["cp311", "abi3"]
problems = []
if tags[:2] != want_tags or not tags[2].startswith("linux_"):
    problems.append(f"tags {'-'.join(tags)}, expected {'-'.join(want_tags)}-linux_*")
dist_info = f"{name}-{version}.dist-info/"
want = {
    p.relative_to(src).as_posix()
    for pattern in ("*.py", "*.pyi", "py.typed")
    for p in (src / "msyncext").glob(pattern)
} | {want_module} | {dist_info + f for f in ("METADATA", "WHEEL", "RECORD", "licenses/LICENSE")}
optional = {dist_info + "top_level.txt"}
with zipfile.ZipFile(wheel) as zf:
    got = {n for n in zf.namelist() if not n.endswith("/")}
    wheel_file = zf.read(dist_info + "WHEEL").decode()
if want - got:
    problems.append(f"missing {sorted(want - got)}")
if got - want - optional:
    problems.append(f"extra files {sorted(got - want - optional)}")
if "Root-Is-Purelib: false" not in wheel_file:
    problems.append("WHEEL does not say Root-Is-Purelib: false")
print(f"{wheel.name}: {len(got)} files", *sorted(got), sep="\n    ")
if problems:
    sys.exit("\n".join(problems))
EOF
fi
[[ -f $wheel ]] || fail "no wheel $wheel"
say "wheel $(basename "$wheel")"

say "download the test dependencies as wheels"
"${pip[@]}" download -q --only-binary=:all: --dest "$work/deps" "$wheel[test]" ||
    fail "pip download of the test dependencies failed"
cp "$wheel" "$work/deps/"

say "install with no index"
no_pip_env=()
while IFS= read -r var; do no_pip_env+=(-u "$var"); done < <(compgen -e | grep '^PIP_' || true)
env "${no_pip_env[@]}" PIP_CONFIG_FILE=/dev/null "${pip[@]}" install -q --no-index \
    --find-links "$work/deps" "$work/deps/$(basename "$wheel")[test]" || fail "offline install failed"

cd "$work/run"
"$py" -I - "$free_threaded" "$debug" <<'EOF' || fail "import checks failed"
import sys, sysconfig, warnings

free_threaded, debug = (a == "1" for a in sys.argv[1:3])
if debug and not hasattr(sys, "gettotalrefcount"):
    sys.exit("not a Py_DEBUG interpreter")
if free_threaded:
    if not sysconfig.get_config_var("Py_GIL_DISABLED"):
        sys.exit("not a free-threaded interpreter")
    # Importing an extension that does not declare Py_mod_gil re-enables the
    # GIL with a RuntimeWarning: as an error here, it fails the import.
    warnings.simplefilter("error")
import msyncext, msyncext._msync as m

site = sysconfig.get_path("platlib")
for mod in (msyncext, m):
    if not mod.__file__.startswith(site):
        sys.exit(f"{mod.__name__} imported from {mod.__file__}, not from {site}")
gil = sys._is_gil_enabled() if hasattr(sys, "_is_gil_enabled") else True
print("imported", m.__file__, "| GIL enabled:", gil)
if free_threaded and gil:
    sys.exit("the GIL is enabled after importing msyncext")
EOF

say "pytest"
rc=0
"$py" -Im pytest -p no:cacheprovider "$tests/tests" 2>&1 | tee "$work/pytest.log" || rc=${PIPESTATUS[0]}
# pytest's last line: "==== 3 failed, 120 passed, 2 skipped in 40.1s ====".
summary=$(grep -E '^=+ .* in [0-9.]+s' "$work/pytest.log" | tail -n 1 || true)
counts=()
for kind in passed failed skipped error xfailed xpassed; do
    n=$(grep -oE "[0-9]+ ${kind}s?\b" <<<"$summary" | head -n 1 | cut -d' ' -f1 || true)
    counts+=("$kind=${n:-0}")
done
# Exit 5 (nothing collected) is a failure like any other non-zero exit.
result "$rc" "${counts[@]}"
say "pytest exited $rc: ${counts[*]}"
exit "$rc"
