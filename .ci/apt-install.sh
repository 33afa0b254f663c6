#!/usr/bin/env bash
# Install the named Debian packages that are missing, with one apt-get
# update, noninteractively; do nothing when all are there.
#   .ci/apt-install.sh PACKAGE...
set -euo pipefail
missing=()
for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [[ ${#missing[@]} == 0 ]]; then
    echo "apt-install.sh: all $# packages are installed"
    exit 0
fi
echo "apt-install.sh: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q </dev/null
apt-get install -y -q --no-install-recommends "${missing[@]}" </dev/null
