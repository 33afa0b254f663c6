#!/usr/bin/env bash
# Build a free-threaded CPython from a release tarball, once, into a cache.
#
#   .ci/build-python.sh TARBALL PREFIX [CONFIGURE_ARGS...]
#
# e.g. .ci/build-python.sh ../shared/cpython/cpython-3.14.7.tar.xz \
#          ~/.cache/msyncext-ci/py314t --disable-gil
#
# configure gets --prefix=PREFIX, but `make install` goes to a staging root
# beside PREFIX (DESTDIR) and the finished tree is renamed to PREFIX in one
# step: whoever watches PREFIX (the benchmarks use py314t) never sees half an
# installation. PREFIX/.msyncext-build records the tarball's sha256 and the
# configure arguments; a PREFIX whose record matches is reused as it is.
# An existing PREFIX is never deleted: if its record differs, the script
# stops and says so (remove it yourself, or use another MSYNCEXT_CI_CACHE).
set -euo pipefail

[[ $# -ge 2 ]] || { echo "usage: $0 TARBALL PREFIX [CONFIGURE_ARGS...]" >&2; exit 2; }
tarball=$(realpath "$1")
prefix=$2
shift 2
configure_args=("$@")
jobs=${MAKE_JOBS:-2}  # the machine has 2 cores and is shared

mkdir -p "$(dirname "$prefix")"
prefix=$(realpath -m "$prefix")
want="$(sha256sum "$tarball" | cut -d' ' -f1) ${configure_args[*]}"

# One build per PREFIX at a time: a second caller waits, then finds it built.
exec 9>"$prefix.lock"
flock 9

if [[ -e $prefix ]]; then
    if [[ $(cat "$prefix/.msyncext-build" 2>/dev/null) == "$want" ]]; then
        echo "build-python.sh: $prefix is already built from $(basename "$tarball")"
        exit 0
    fi
    echo "build-python.sh: $prefix exists but was not built from $(basename "$tarball")" \
        "with '${configure_args[*]}'; not touching it" >&2
    exit 1
fi

# Scratch and staging sit beside PREFIX, so the final mv is a rename on one
# filesystem; a failed or interrupted build leaves nothing behind.
scratch=$(mktemp -d "$(dirname "$prefix")/.build-$(basename "$prefix").XXXXXX")
trap 'rm -rf "$scratch"' EXIT
log=$scratch/build.log
started=$SECONDS

run_logged() {  # what, command...
    local what=$1; shift
    if ! "$@" >>"$log" 2>&1; then
        echo "build-python.sh: $what failed; the end of $log:" >&2
        tail -n 60 "$log" >&2
        exit 1
    fi
    echo "build-python.sh: $what done (at $((SECONDS - started)) s)"
}

echo "build-python.sh: building $(basename "$tarball") ${configure_args[*]} for $prefix"
tar -xf "$tarball" -C "$scratch"
srcdirs=("$scratch"/cpython-*/)
[[ ${#srcdirs[@]} == 1 ]] || { echo "build-python.sh: no single cpython-*/ in $tarball" >&2; exit 1; }
cd "${srcdirs[0]}"
run_logged configure ./configure --prefix="$prefix" "${configure_args[@]}"
run_logged "make -j$jobs" make -j"$jobs"
run_logged "make install" make install DESTDIR="$scratch/stage"

staged=$scratch/stage$prefix
py=""
for f in "$staged"/bin/python3.*; do
    if [[ $f != *-config && -x $f && ! -L $f ]]; then py=$f; fi
done
[[ -n $py ]] || { echo "build-python.sh: no interpreter in $staged/bin" >&2; exit 1; }
# Every module the test suite and pip need must have been built.
LD_LIBRARY_PATH=$staged/lib "$py" -c 'import ssl, zlib, ctypes, bz2, lzma, sqlite3, mmap, venv, ensurepip'
echo "$want" >"$staged/.msyncext-build"
mv -T "$staged" "$prefix"
echo "build-python.sh: $prefix ready in $((SECONDS - started)) s"
