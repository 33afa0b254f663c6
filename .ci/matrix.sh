#!/usr/bin/env bash
# Every Python the wheels claim, tested (issue 8).
#
#   .ci/matrix.sh [WHEELHOUSE]
#
# WHEELHOUSE holds the repaired cp311-abi3 wheel that .ci/wheels.sh built and
# tested on the host's 3.11 (.ci/run passes it). Without it, wheels.sh runs
# first to make one. Then, from a clean copy of HEAD:
#
#   abi3 wheel, no index   3.12, 3.13 (pyenv, host); 3.14, 3.15 (Debian sid chroot)
#   built from source      3.14t, 3.15t (free-threaded, built here from
#                          ../shared/cpython), 3.14-dbg (sid's Py_DEBUG build)
#
# each with the whole test suite (.ci/suite.sh). Every interpreter runs even
# when an earlier one fails; any failure fails the script at the end.
#
# Environment:
#   MSYNCEXT_CI_CACHE   cache directory (default ~/.cache/msyncext-ci): the
#                       free-threaded builds (py314t/, py315t/) and the
#                       prepared chroot (sid-chroot.tar.zst). Point it at an
#                       empty directory to test a run from nothing.
#   MSYNCEXT_CI_OUT     where the summary goes (default <repo>/.ci-work/matrix)
#   MSYNCEXT_CI_MIRROR  Debian mirror for the chroot (default: the host's apt
#                       sources' first Debian archive)
#   MATRIX_FAIL_AT      make the named step fail on purpose (tests the cleanup)
#   MATRIX_ONLY         run only the steps whose names contain one of these
#                       words (split at spaces), e.g. "chroot 3.15t" (a
#                       partial run, for work on the matrix itself; the
#                       others show as not run)
#   KEEP_WORK=1         keep the scratch directory (never its mounts)
set -euo pipefail
shopt -s nullglob

started=$SECONDS
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(git -C "$here" rev-parse --show-toplevel)
cache=${MSYNCEXT_CI_CACHE:-$HOME/.cache/msyncext-ci}
out=${MSYNCEXT_CI_OUT:-$repo/.ci-work/matrix}
cpython_dir=$(realpath -m "$repo/../shared/cpython")
mkdir -p "$cache" "$out"
cache=$(realpath "$cache")

work=$(mktemp -d "${TMPDIR:-/tmp}/msyncext-matrix.XXXXXX")
sid=$work/sid  # the chroot; everything it needs sits under $sid/ci

log() { printf '\n=== matrix.sh: %s (at %d s)\n' "$*" $((SECONDS - started)); }
die() { printf 'matrix.sh: FAIL: %s\n' "$*" >&2; exit 1; }

# --- cleanup -----------------------------------------------------------------
# Whatever happens (a failed step, Ctrl-C, SIGTERM from CI), nothing this
# script made may stay mounted, attached or on disk.
mounts_under() {  # deepest first
    findmnt -rn -o TARGET | awk -v p="$1/" 'index($0 "/", p) == 1' | sort -r
}
loops_under() {
    losetup -a -n -O NAME,BACK-FILE 2>/dev/null |
        awk -v p="$1/" 'index($2, p) == 1 { print $1 }'
}
cleanup() {
    local rc=$? pass pid m l leftovers
    trap - EXIT INT TERM
    set +e
    # A step still running (we were interrupted): stop its process group.
    if [[ -n ${step_pgid:-} ]] && kill -0 -- "-$step_pgid" 2>/dev/null; then
        echo "matrix.sh: cleanup: stopping the running step (process group $step_pgid)" >&2
        kill -TERM -- "-$step_pgid" 2>/dev/null
        sleep 3
        kill -KILL -- "-$step_pgid" 2>/dev/null
    fi
    # Processes still running inside the chroot (an interrupted pytest) hold
    # mounts and loop devices: they are ours, stop them by their pid.
    for pid in $(ls /proc | grep -E '^[0-9]+$'); do
        [[ $(readlink "/proc/$pid/root" 2>/dev/null) == "$sid"* ]] && kill -KILL "$pid" 2>/dev/null
    done
    # Filesystems on loop devices come off first, then the loops whose backing
    # files they held, then the rest; a few rounds untangle any order.
    for pass in 1 2 3; do
        for m in $(mounts_under "$work"); do umount "$m" 2>/dev/null; done
        for l in $(loops_under "$work"); do losetup -d "$l" 2>/dev/null; done
    done
    for m in $(mounts_under "$work"); do
        echo "matrix.sh: cleanup: lazy unmount of $m" >&2
        umount -l "$m"
    done
    for l in $(loops_under "$work"); do losetup -d "$l"; done
    # Never rm -r through a mount: only once nothing is mounted under $work.
    leftovers=$(mounts_under "$work"; loops_under "$work")
    if [[ -z $leftovers ]]; then
        if [[ ${KEEP_WORK:-} == 1 ]]; then echo "matrix.sh: kept $work"; else rm -rf "$work"; fi
    fi
    # Partial chroot tarballs and build staging never survive a failed run.
    rm -f "$cache"/.sid-chroot.*.tmp
    leftovers=$(findmnt -rn -o TARGET | grep -F "$work" ; losetup -a | grep -F "$work")
    if [[ -n $leftovers ]]; then
        printf 'matrix.sh: CLEANUP FAILED, still there:\n%s\n' "$leftovers" >&2
        rc=3
    else
        echo "matrix.sh: cleanup: no mount or loop device of $work is left (findmnt, losetup -a)"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'echo "matrix.sh: interrupted" >&2; exit 130' INT
trap 'echo "matrix.sh: terminated" >&2; exit 143' TERM

# --- steps, timed ------------------------------------------------------------
step_names=() step_secs=() step_rcs=() step_pgid=""
wanted() {  # does MATRIX_ONLY name this step? (the sources and the wheel always run)
    local w
    [[ $1 == sources || $1 == "abi3 wheel" ]] && return 0
    for w in $MATRIX_ONLY; do [[ $1 == *"$w"* ]] && return 0; done
    return 1
}
step() {  # name, command...: runs it, records its time and status, never exits
    local name=$1 t0=$SECONDS rc=0
    shift
    if [[ -n ${MATRIX_ONLY:-} ]] && ! wanted "$name"; then
        echo "matrix.sh: skipping step '$name' (MATRIX_ONLY)"
        return 0
    fi
    log "$name"
    if [[ ${MATRIX_FAIL_AT:-} == "$name" ]]; then
        echo "matrix.sh: failing step '$name' on purpose (MATRIX_FAIL_AT)" >&2
        rc=1
    else
        # A subshell with its own set -e: called as `f || rc=$?`, a function
        # would run with errexit ignored and carry on past a failed command.
        # So steps share nothing through variables, only through files.
        # It runs as a job of its own (set -m: its own process group, SIGINT
        # not ignored) that we wait for: a signal to this script then runs
        # the trap at once, and the cleanup stops the whole group.
        set +e -m
        (set -e; "$@") &
        step_pgid=$!
        set +m
        wait "$step_pgid"
        rc=$?
        step_pgid=""
        set -e
    fi
    step_names+=("$name") step_secs+=($((SECONDS - t0))) step_rcs+=("$rc")
    [[ $rc == 0 ]] || echo "matrix.sh: step '$name' failed (exit $rc)" >&2
    return "$rc"
}

# --- the sources under test --------------------------------------------------
# A clean copy of HEAD: the source builds start from it, and the suite runs
# from its tests/ (tests/test_build.py builds the tree beside the tests), with
# -I and from an empty directory, so only the installed package is importable
# (a test checks where msyncext was imported from).
src=$work/src
prepare_sources() {
    mkdir -p "$src"
    git -C "$repo" archive --format=tar HEAD | tar -x -C "$src"
}

wheelhouse=${1:-$work/wheelhouse}
find_abi3_wheel() {
    if [[ -z ${1:-} ]]; then
        echo "no wheelhouse given: .ci/wheels.sh builds (and tests on 3.11) the abi3 wheel"
        WHEELHOUSE_OUT=$wheelhouse bash "$here/wheels.sh"
    fi
    local found=("$wheelhouse"/msyncext-*-cp311-abi3-manylinux*.whl)
    [[ ${#found[@]} == 1 ]] || { echo "expected one cp311-abi3 manylinux wheel in $wheelhouse" >&2; return 1; }
    echo "abi3 wheel: $(basename "${found[0]}")"
}

# --- free-threaded CPython, built once into the cache -------------------------
build_ft() {  # version tag
    bash "$here/build-python.sh" "$cpython_dir/cpython-$1.tar.xz" "$cache/$2" --disable-gil
}

# --- the Debian sid chroot ----------------------------------------------------
sid_packages=(
    python3.14 python3.14-venv python3.14-dev python3.14-dbg
    python3.15 python3.15-venv python3.15-dev
    build-essential
    e2fsprogs xfsprogs btrfs-progs util-linux mount  # the root-only tests
)
chroot_tar=$cache/sid-chroot.tar.zst
chroot_key="v1 ${sid_packages[*]}"  # change it and the cached chroot is remade

host_mirror() {  # the first Debian archive (not -security) of the host's apt sources
    if [[ -n ${MSYNCEXT_CI_MIRROR:-} ]]; then echo "$MSYNCEXT_CI_MIRROR"; return; fi
    local f
    # deb822 files (Debian 12's default) and one-line ones, whichever exist:
    # a missing file must not fail the pipeline (pipefail).
    for f in /etc/apt/sources.list.d/*.sources /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -f $f ]] || continue
        case $f in
            *.sources) awk '/^URIs:/ { for (i = 2; i <= NF; i++) print $i }' "$f" ;;
            *) awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { print $i; break } }' "$f" ;;
        esac
    done | grep -E '/debian/?$' | head -n 1 || true
}

in_chroot() {  # command... (a clean environment; plain PyPI through the host's CA)
    chroot "$sid" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        HOME=/root LANG=C.UTF-8 TMPDIR=/tmp DEBIAN_FRONTEND=noninteractive \
        PIP_CONFIG_FILE=/dev/null PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
        PIP_DISABLE_PIP_VERSION_CHECK=1 \
        ${MSYNCEXT_TEST_MOUNTS:+MSYNCEXT_TEST_MOUNTS="$MSYNCEXT_TEST_MOUNTS"} "$@"
}
mount_chroot() {
    mountpoint -q "$sid/proc" || mount -t proc proc "$sid/proc"
    # rslave: unmounting the chroot's copies must never propagate to the
    # host's /sys and /dev (systemd makes / shared).
    mountpoint -q "$sid/sys" || { mount --rbind /sys "$sid/sys" && mount --make-rslave "$sid/sys"; }
    mountpoint -q "$sid/dev" || { mount --rbind /dev "$sid/dev" && mount --make-rslave "$sid/dev"; }
    # Its own /dev/shm: what the tests leave there stays in the chroot.
    mkdir -p "$sid/dev/shm"
    mount -t tmpfs -o mode=1777,size=1g tmpfs "$sid/dev/shm"
    # The host's resolver and its CA bundle (PyPI is reached through a proxy
    # whose CA only that bundle holds).
    cp /etc/resolv.conf "$sid/etc/resolv.conf"
    mkdir -p "$sid/etc/ssl/certs"
    cp /etc/ssl/certs/ca-certificates.crt "$sid/etc/ssl/certs/ca-certificates.crt"
}
umount_chroot() {
    local m
    for m in $(mounts_under "$sid"); do umount "$m" || umount -l "$m"; done
}
prepare_chroot() {
    if [[ -f $chroot_tar && $(cat "$chroot_tar.key" 2>/dev/null) == "$chroot_key" ]]; then
        echo "unpacking the cached chroot $chroot_tar"
        mkdir -p "$sid"
        zstd -dc -T2 "$chroot_tar" | tar -x -C "$sid" --numeric-owner
        mount_chroot
        # The cached package lists may be stale: a quick check that all is there.
        in_chroot dpkg -s "${sid_packages[@]}" >/dev/null
        return
    fi
    local mirror
    mirror=$(host_mirror)
    [[ -n $mirror ]] || { echo "no Debian mirror found in the host's apt sources" >&2; return 1; }
    echo "debootstrap sid from $mirror"
    debootstrap --variant=minbase sid "$sid" "$mirror" >"$work/debootstrap.log" 2>&1 || {
        tail -n 30 "$work/debootstrap.log" >&2
        return 1
    }
    # sid's Release file is past its Valid-Until on this mirror.
    echo 'Acquire::Check-Valid-Until "false";' >"$sid/etc/apt/apt.conf.d/99msyncext-ci"
    mount_chroot
    in_chroot apt-get update -q
    in_chroot apt-get install -y -q --no-install-recommends "${sid_packages[@]}"
    in_chroot apt-get clean
    # Cache it (without the mounts: they are not part of the tree).
    umount_chroot
    local tmp
    tmp=$(mktemp "$cache/.sid-chroot.XXXXXX.tmp")
    tar -C "$sid" --one-file-system --numeric-owner -cf - . | zstd -q -T2 -3 -o "$tmp" -f
    mv "$tmp" "$chroot_tar"
    echo "$chroot_key" >"$chroot_tar.key"
    echo "cached $(du -h "$chroot_tar" | cut -f1) as $chroot_tar"
    mount_chroot
}

# --- one interpreter ---------------------------------------------------------
# Each run leaves its result line in <its dir>/result (see suite.sh).
labels=()
run_dir() { if [[ -d $work/run-$1 ]]; then echo "$work/run-$1"; else echo "$sid/ci/run-$1"; fi; }
run_host() {  # label python suite-args...
    local label=$1 python=$2
    shift 2
    # The tests' files (and loop devices' backing files) under $work too, so
    # that the cleanup finds whatever an interrupted test leaves.
    mkdir -p "$work/run-$label/tmp"
    TMPDIR=$work/run-$label/tmp bash "$here/suite.sh" "$label" "$python" "$work/run-$label" "$src" "$@"
}
run_sid() {  # label python suite-args... (paths as the chroot sees them)
    local label=$1 python=$2
    shift 2
    mkdir -p "$sid/ci/run-$label"
    in_chroot bash /ci/suite.sh "$label" "$python" "/ci/run-$label" /ci/src "$@"
}
stage_into_chroot() {
    mkdir -p "$sid/ci/wheelhouse"
    cp -r "$src" "$sid/ci/"
    cp "$here/suite.sh" "$sid/ci/"
    cp "$abi3_wheel" "$sid/ci/wheelhouse/"
}

# --- the matrix --------------------------------------------------------------
failed=0
step "sources" prepare_sources || die "could not copy the sources"
step "abi3 wheel" find_abi3_wheel "${1:-}" || die "no abi3 wheel to test"
abi3_wheel=$(ls "$wheelhouse"/msyncext-*-cp311-abi3-manylinux*.whl)
sid_wheel=/ci/wheelhouse/$(basename "$abi3_wheel")

# 3.14t first: the benchmarks wait for $cache/py314t.
step "build 3.14t" build_ft 3.14.7 py314t || failed=1
step "build 3.15t" build_ft 3.15.0rc1 py315t || failed=1
chroot_ok=1
step "sid chroot" prepare_chroot || { failed=1; chroot_ok=0; }
if [[ $chroot_ok == 1 ]]; then
    step "stage into chroot" stage_into_chroot || { failed=1; chroot_ok=0; }
fi

for v in 3.12.1 3.13.0; do
    labels+=("${v%.*}")
    py=/root/.pyenv/versions/$v/bin/python${v%.*}
    step "test ${v%.*} (abi3 wheel)" run_host "${v%.*}" "$py" --wheel "$abi3_wheel" || failed=1
done
for v in 3.14 3.15; do
    labels+=("$v")
    [[ $chroot_ok == 0 ]] ||
        step "test $v (abi3 wheel, sid)" run_sid "$v" "python$v" --wheel "$sid_wheel" || failed=1
done
for t in 3.14t 3.15t; do
    labels+=("$t")
    step "test $t (source build)" run_host "$t" "$cache/py${t//./}/bin/python$t" \
        --build "$src" --free-threaded || failed=1
done
labels+=(3.14-dbg)
[[ $chroot_ok == 0 ]] ||
    step "test 3.14-dbg (source build, sid)" run_sid 3.14-dbg python3.14-dbg --build /ci/src --debug ||
    failed=1

# --- summary -----------------------------------------------------------------
summary() {
    echo "msyncext CI matrix of $(git -C "$repo" rev-parse --short HEAD), $(date -u +%FT%TZ)"
    echo "3.11 (host): the abi3 wheel's build interpreter, tested by .ci/wheels.sh"
    printf '%-9s %-6s %6s %6s %7s %6s %6s  %s\n' python result passed failed skipped errors secs wheel
    local label dir line rc secs rest kv i
    for label in "${labels[@]}"; do
        dir=$(run_dir "$label")
        line=$(cat "$dir/result" 2>/dev/null || echo "$label not-run 0")
        read -r _ rc secs rest <<<"$line"
        declare -A c=([passed]=- [failed]=- [skipped]=- [error]=- [wheel]=-)
        for kv in $rest; do c[${kv%%=*}]=${kv#*=}; done
        printf '%-9s %-6s %6s %6s %7s %6s %6s  %s\n' "$label" \
            "$(case $rc in 0) echo ok ;; not-run) echo "-" ;; *) echo FAIL ;; esac)" \
            "${c[passed]}" "${c[failed]}" \
            "${c[skipped]}" "${c[error]}" "$secs" "${c[wheel]}"
        unset c
    done
    echo
    echo "step times:"
    for i in "${!step_names[@]}"; do
        printf '  %-36s %5d s%s\n' "${step_names[$i]}" "${step_secs[$i]}" \
            "$([[ ${step_rcs[$i]} == 0 ]] || echo "  FAILED (exit ${step_rcs[$i]})")"
    done
    printf '  %-36s %5d s\n' "whole matrix" $((SECONDS - started))
}
log "summary"
summary | tee "$out/matrix-summary.txt"
for label in "${labels[@]}"; do
    f=$(run_dir "$label")/pytest.log
    if [[ -f $f ]]; then cp "$f" "$out/pytest-$label.log"; fi
done
echo "summary and pytest logs: $out/"
[[ $failed == 0 ]] || die "at least one interpreter or step failed (see the summary above)"
echo "matrix.sh: all interpreters passed"
