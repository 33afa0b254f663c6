#!/usr/bin/env bash
# msyncext on aarch64, under QEMU's user-mode emulation (issue 21).
#
#   .ci/aarch64.sh            (root, Debian; opt-in: .ci/run does not call it)
#
# The wheels claim aarch64 and csrc/ makes raw system calls chosen per
# architecture; this runs them there. It
#   1. installs Debian's qemu-user-static (and debootstrap, zstd) if missing,
#      mounts binfmt_misc if it is not mounted and registers QEMU's aarch64
#      handler if it is not registered, then runs a 132-byte aarch64 program
#      to prove the handler works. It leaves both in place (as the package
#      does on a systemd host) and undoes nothing of the host's;
#   2. builds an arm64 Debian sid chroot (python3, venv, headers, gcc; the
#      mkfs tools and fuse3 for the mount tests) with debootstrap, once, and
#      caches it as a tarball;
#   3. copies a clean tree of HEAD in (git archive: commit what you test),
#      and inside the chroot: `pip install '.[test]'` from a copy of it with
#      MSYNCEXT_WERROR=1, checks that the compiled module is an aarch64 ELF
#      file imported from the venv and flushes a real map once, then runs the
#      whole suite (`python -Im pytest tests` from an empty directory), with
#      /proc, /sys and /dev bound in and a /dev/shm of its own;
#   4. prints one summary line and unmounts everything it mounted, on every
#      exit path.
#
# QEMU 7.2 (Debian 12) answers ENOSYS for what it does not know (cachestat,
# the PROCMAP_QUERY, btrfs subvolume and file-system shutdown ioctls): the
# tests that need them skip and say so (CONTRIBUTING.md lists them). It
# writes the guest's /proc/self/maps itself.
#
# Environment:
#   MSYNCEXT_CI_CACHE   cache directory (default ~/.cache/msyncext-ci): the
#                       chroot (sid-arm64-chroot.tar.zst) and pip's download
#                       cache (aarch64-pip/). Point it at an empty directory
#                       for a run from nothing.
#   MSYNCEXT_CI_OUT     where the logs and summary go
#                       (default <repo>/.ci-work/aarch64)
#   MSYNCEXT_CI_MIRROR  Debian mirror (default: the host's apt sources' first
#                       Debian archive)
#   MSYNCEXT_LEAK_ROUNDS  rounds of the leak tests (default here 1000; the
#                       host's default, 5000, adds about 45 minutes)
#   MSYNCEXT_TEST_MOUNTS  1 (the default here) runs the tests that mount file
#                       systems on loop devices and FUSE inside the chroot:
#                       they work under emulation, and the write-back record
#                       they test makes the raw newfstatat calls chosen for
#                       aarch64. 0 leaves them out (about 15 minutes less).
#   PYTEST_ARGS         what pytest runs instead of the whole suite, paths as
#                       the chroot sees them: "-k cachestat /ci/src/tests",
#                       "/ci/src/tests/test_api.py" (for work on this script)
#   KEEP_WORK=1         keep the scratch directory (never its mounts)
set -euo pipefail
shopt -s nullglob
[[ $(id -u) == 0 ]] || { echo "aarch64.sh: run it as root (binfmt_misc, chroot, mount)" >&2; exit 2; }

started=$SECONDS
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(git -C "$here" rev-parse --show-toplevel)
cache=${MSYNCEXT_CI_CACHE:-$HOME/.cache/msyncext-ci}
out=${MSYNCEXT_CI_OUT:-$repo/.ci-work/aarch64}
tree=$(git -C "$repo" rev-parse --short HEAD)  # what is tested
mkdir -p "$cache" "$out"
cache=$(realpath "$cache")
out=$(realpath "$out")
rm -f "$out/aarch64-summary.txt" "$out/pytest-aarch64.log" "$out/result"

work=$(mktemp -d "${TMPDIR:-/tmp}/msyncext-aarch64.XXXXXX")
root=$work/sid-arm64  # the chroot; what the run needs sits under $root/ci

log() { printf '\n=== aarch64.sh: %s (at %d s)\n' "$*" $((SECONDS - started)); }
die() { printf 'aarch64.sh: FAIL: %s\n' "$*" >&2; exit 1; }

# --- cleanup -----------------------------------------------------------------
# As in matrix.sh: whatever happens, nothing this script made stays mounted,
# attached or on disk (the cache and the logs excepted).
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
    # Processes still running in the chroot (an interrupted pytest, each one
    # a QEMU process on the host) hold mounts: ours, stopped by their pid.
    for pid in $(ls /proc | grep -E '^[0-9]+$'); do
        [[ $(readlink "/proc/$pid/root" 2>/dev/null) == "$root"* ]] && kill -KILL "$pid" 2>/dev/null
    done
    for pass in 1 2 3; do
        for m in $(mounts_under "$work"); do umount "$m" 2>/dev/null; done
        for l in $(loops_under "$work"); do losetup -d "$l" 2>/dev/null; done
    done
    for m in $(mounts_under "$work"); do
        echo "aarch64.sh: cleanup: lazy unmount of $m" >&2
        umount -l "$m"
    done
    for l in $(loops_under "$work"); do losetup -d "$l"; done
    leftovers=$(mounts_under "$work"; loops_under "$work")
    if [[ -z $leftovers ]]; then
        if [[ ${KEEP_WORK:-} == 1 ]]; then echo "aarch64.sh: kept $work"; else rm -rf "$work"; fi
    fi
    rm -f "$cache"/.sid-arm64-chroot.*.tmp
    leftovers=$(findmnt -rn -o TARGET | grep -F "$work"; losetup -a | grep -F "$work")
    if [[ -n $leftovers ]]; then
        printf 'aarch64.sh: CLEANUP FAILED, still there:\n%s\n' "$leftovers" >&2
        rc=3
    else
        echo "aarch64.sh: cleanup: no mount or loop device of $work is left (findmnt, losetup -a)"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'echo "aarch64.sh: interrupted" >&2; exit 130' INT
trap 'echo "aarch64.sh: terminated" >&2; exit 143' TERM

# --- 1. QEMU's aarch64 handler -----------------------------------------------
binfmt=/proc/sys/fs/binfmt_misc
handler_conf=/usr/lib/binfmt.d/qemu-aarch64.conf  # from qemu-user-static
setup_binfmt() {
    bash "$here/apt-install.sh" qemu-user-static debootstrap zstd
    [[ -f $handler_conf ]] || die "$handler_conf is missing (qemu-user-static)"
    if ! mountpoint -q "$binfmt"; then
        echo "mounting binfmt_misc on $binfmt (it stays mounted)"
        mount -t binfmt_misc binfmt_misc "$binfmt"
    fi
    [[ $(cat "$binfmt/status") == enabled ]] || die "binfmt_misc is disabled on this host ($binfmt/status)"
    if [[ ! -e $binfmt/qemu-aarch64 ]]; then
        echo "registering $handler_conf (it stays registered)"
        cat "$handler_conf" >"$binfmt/register"
    fi
    [[ $(head -n 1 "$binfmt/qemu-aarch64") == enabled ]] || die "the qemu-aarch64 handler is disabled"
    # The F flag: the kernel opened QEMU when the handler was registered, so
    # it runs inside a chroot that has no QEMU of its own.
    grep -q '^flags: .*F' "$binfmt/qemu-aarch64" ||
        die "the qemu-aarch64 handler lacks the F flag: $(grep '^flags' "$binfmt/qemu-aarch64")"
    sed 's/^/    /' "$binfmt/qemu-aarch64" | grep -E 'interpreter|flags'

    # The smallest aarch64 program: exit_group(42). If the kernel ran it
    # itself, or not at all, the status would not be 42.
    local probe=$work/exit42-aarch64 rc=0
    python3 - "$probe" <<'EOF'
import struct, sys

base = 0x400000
code = struct.pack("<3I", 0xD2800540, 0xD2800BC8, 0xD4000001)  # x0=42; x8=94; svc 0
size = 64 + 56 + len(code)
ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)  # ELF64, little-endian
header = ident + struct.pack(
    "<HHIQQQIHHHHHH", 2, 183, 1, base + 120, 64, 0, 0, 64, 56, 1, 0, 0, 0
)  # ET_EXEC, EM_AARCH64, entry after the headers, one program header
segment = struct.pack("<IIQQQQQQ", 1, 5, 0, base, base, size, size, 0x1000)
with open(sys.argv[1], "wb") as f:
    f.write(header + segment + code)
EOF
    chmod +x "$probe"
    "$probe" || rc=$?
    [[ $rc == 42 ]] || die "an aarch64 program did not run under QEMU (exit status $rc, expected 42)"
    echo "an aarch64 program ran through binfmt_misc: exit status 42, as it asked"
}

# --- 2. the arm64 chroot -----------------------------------------------------
packages=(
    python3 python3-venv python3-dev gcc libc6-dev
    e2fsprogs xfsprogs btrfs-progs util-linux mount fuse3  # the mount tests
)
chroot_tar=$cache/sid-arm64-chroot.tar.zst
chroot_key="v1 arm64 ${packages[*]}"  # change it and the cached chroot is remade

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

# The leak tests' EBUSY path reads /proc/self/smaps, ~20 ms a call under
# QEMU: at the host's 5,000 rounds test_oserror_path_stays_flat alone took
# 34 minutes. 1,000 rounds still show a leak of one object per call in the
# traced-memory tests (bound 4 KiB, 16 KB and more at 1,000 rounds).
leak_rounds=${MSYNCEXT_LEAK_ROUNDS:-1000}
test_mounts=${MSYNCEXT_TEST_MOUNTS:-1}

in_chroot() {  # command... (a clean environment; plain PyPI through the host's CA)
    chroot "$root" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        HOME=/root LANG=C.UTF-8 TMPDIR=/tmp DEBIAN_FRONTEND=noninteractive \
        PIP_CONFIG_FILE=/dev/null PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
        PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_CACHE_DIR=/ci/pip-cache \
        MSYNCEXT_LEAK_ROUNDS="$leak_rounds" \
        MSYNCEXT_TEST_MOUNTS="$test_mounts" "$@"
}
mount_chroot() {
    mountpoint -q "$root/proc" || mount -t proc proc "$root/proc"
    # rslave: unmounting the chroot's copies never propagates to the host's.
    mountpoint -q "$root/sys" || { mount --rbind /sys "$root/sys" && mount --make-rslave "$root/sys"; }
    mountpoint -q "$root/dev" || { mount --rbind /dev "$root/dev" && mount --make-rslave "$root/dev"; }
    mkdir -p "$root/dev/shm"
    mount -t tmpfs -o mode=1777,size=1g tmpfs "$root/dev/shm"
    cp /etc/resolv.conf "$root/etc/resolv.conf"
    # PyPI is reached through a proxy whose CA only the host's bundle holds.
    mkdir -p "$root/etc/ssl/certs"
    cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
}
umount_chroot() {
    local m
    for m in $(mounts_under "$root"); do umount "$m" || umount -l "$m"; done
}
prepare_chroot() {
    if [[ -f $chroot_tar && $(cat "$chroot_tar.key" 2>/dev/null) == "$chroot_key" ]]; then
        echo "unpacking the cached chroot $chroot_tar"
        mkdir -p "$root"
        zstd -dc -T2 "$chroot_tar" | tar -x -C "$root" --numeric-owner
        mount_chroot
        in_chroot dpkg -s "${packages[@]}" >/dev/null
        return
    fi
    local mirror include tmp
    mirror=$(host_mirror)
    [[ -n $mirror ]] || die "no Debian mirror found in the host's apt sources"
    include=$(IFS=,; echo "${packages[*]}")
    echo "debootstrap --arch=arm64 sid from $mirror (every package's scripts run emulated)"
    debootstrap --arch=arm64 --variant=minbase --include="$include" sid "$root" "$mirror" \
        >"$work/debootstrap.log" 2>&1 || {
        tail -n 30 "$work/debootstrap.log" >&2
        die "debootstrap failed (log above)"
    }
    # sid's Release file is past its Valid-Until on this mirror (for an
    # apt-get in the chroot later).
    echo 'Acquire::Check-Valid-Until "false";' >"$root/etc/apt/apt.conf.d/99msyncext-ci"
    rm -f "$root"/var/cache/apt/archives/*.deb
    tmp=$(mktemp "$cache/.sid-arm64-chroot.XXXXXX.tmp")
    tar -C "$root" --one-file-system --numeric-owner -cf - . | zstd -q -T2 -3 -o "$tmp" -f
    mv "$tmp" "$chroot_tar"
    echo "$chroot_key" >"$chroot_tar.key"
    echo "cached $(du -h "$chroot_tar" | cut -f1) as $chroot_tar"
    mount_chroot
}

# --- 3. the run inside -------------------------------------------------------
stage() {
    mkdir -p "$root/ci/src" "$root/ci/run" "$root/ci/pip-cache"
    git -C "$repo" archive --format=tar "$tree" | tar -x -C "$root/ci/src"
    echo "tree: $tree ($(git -C "$repo" log -1 --format=%s "$tree"))"
    # pip's downloads (numpy's arm64 wheel, the build backend) persist in the
    # cache; a bind mount, so the cleanup's unmount covers it.
    mkdir -p "$cache/aarch64-pip"
    mount --bind "$cache/aarch64-pip" "$root/ci/pip-cache"
    cat >"$root/ci/inside.sh" <<'EOF'
set -euo pipefail
started=$SECONDS
say() { printf '[aarch64 %5d s] %s\n' $((SECONDS - started)) "$*"; }
echo "failed=- passed=- skipped=- error=- setup=failed" >/ci/result
[[ $(uname -m) == aarch64 ]] || { say "uname -m says $(uname -m)"; exit 1; }
say "$(python3 -c 'import platform, sys; print(platform.machine(), "Python", sys.version.split()[0])')"
python3 -m venv /ci/venv
# pip builds in the tree it is given: a copy keeps the tested tree clean.
cp -r /ci/src /ci/build
say "MSYNCEXT_WERROR=1 pip install '.[test]' (compiles under emulation)"
(cd /ci/build && MSYNCEXT_WERROR=1 /ci/venv/bin/pip install -q '.[test]')
cd /ci/run
say "the installed module: an aarch64 ELF file, imported from the venv, flushes"
/ci/venv/bin/python -I - <<'PY'
import mmap, os, struct, sysconfig, tempfile

import msyncext
import msyncext._msync as ext

site = sysconfig.get_path("platlib")
assert ext.__file__.startswith(site), f"{ext.__file__} is not under {site}"
with open(ext.__file__, "rb") as f:
    head = f.read(20)
machine = struct.unpack_from("<H", head, 18)[0]
assert head[:4] == b"\x7fELF" and head[4] == 2, f"not a 64-bit ELF file: {head!r}"
assert machine == 183, f"e_machine {machine}, not EM_AARCH64 (183)"
with tempfile.TemporaryFile(dir="/tmp") as f:
    f.truncate(msyncext.PAGESIZE * 4)
    with mmap.mmap(f.fileno(), 0) as m:
        m[100:105] = b"arm64"
        msyncext.flush(m, 100, 5)
        f.seek(100)
        assert f.read(5) == b"arm64"
print(f"{ext.__file__}: ELF64, e_machine 183 (EM_AARCH64); flush(m, 100, 5) returned")
print(f"PAGESIZE {msyncext.PAGESIZE}, os.uname().machine {os.uname().machine}")
PY
say "pytest (the whole suite, from an empty directory)"
rc=0 pytest_started=$SECONDS
# shellcheck disable=SC2086  # PYTEST_ARGS is a list of words
/ci/venv/bin/python -Im pytest -p no:cacheprovider --durations=15 \
    ${PYTEST_ARGS:-/ci/src/tests} 2>&1 | tee /ci/pytest.log || rc=${PIPESTATUS[0]}
line=$(grep -E '^=+ .* in [0-9.]+s' /ci/pytest.log | tail -n 1 || true)
counts=()
for kind in passed failed skipped error; do
    n=$(grep -oE "[0-9]+ ${kind}s?\b" <<<"$line" | head -n 1 | cut -d' ' -f1 || true)
    counts+=("$kind=${n:-0}")
done
echo "${counts[*]} rc=$rc pytest_secs=$((SECONDS - pytest_started))" >/ci/result
say "pytest exited $rc: ${counts[*]}"
exit "$rc"
EOF
}
run_inside() {
    in_chroot ${PYTEST_ARGS:+PYTEST_ARGS="$PYTEST_ARGS"} bash /ci/inside.sh
}

# --- the run -----------------------------------------------------------------
chroot_state=cached
[[ -f $chroot_tar && $(cat "$chroot_tar.key" 2>/dev/null) == "$chroot_key" ]] || chroot_state=built
log "QEMU's aarch64 handler (binfmt_misc)"
setup_binfmt
log "arm64 Debian sid chroot ($chroot_state)"
prepare_chroot
log "stage the tree"
stage
log "install, check and test inside the chroot"
inside_started=$SECONDS
rc=0
run_inside 2>&1 | tee "$out/run-aarch64.log" || rc=${PIPESTATUS[0]}
inside_secs=$((SECONDS - inside_started))
cp "$root/ci/pytest.log" "$out/pytest-aarch64.log" 2>/dev/null || true
cp "$root/ci/result" "$out/result" 2>/dev/null || true

# --- 4. one line ---------------------------------------------------------------
declare -A c=([passed]=- [failed]=- [skipped]=- [error]=- [pytest_secs]=-)
for kv in $(cat "$root/ci/result" 2>/dev/null); do c[${kv%%=*}]=${kv#*=}; done
python=$(in_chroot python3 -c 'import sys; print(sys.version.split()[0])' 2>/dev/null || echo "?")
qemu=$(qemu-aarch64-static --version | head -n 1 | grep -oE '[0-9]+\.[0-9]+(\.[0-9]+)?' | head -n 1)
summary="aarch64 (QEMU $qemu user mode, Python $python, $tree): \
$([[ $rc == 0 ]] && echo ok || echo FAIL) - passed ${c[passed]}, failed ${c[failed]}, \
skipped ${c[skipped]}, errors ${c[error]}; pytest ${c[pytest_secs]} s, \
install and pytest ${inside_secs} s, \
whole run $((SECONDS - started)) s (chroot $chroot_state)\
$([[ $test_mounts == 1 ]] && echo ", mount tests on" || echo ", mount tests off"), \
leak rounds $leak_rounds"
log "summary"
echo "$summary" | tee "$out/aarch64-summary.txt"
echo "logs: $out/"
[[ $rc == 0 ]] || die "the aarch64 run failed (exit $rc; see $out/run-aarch64.log)"
