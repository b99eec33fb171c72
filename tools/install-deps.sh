#!/bin/sh
# Installs the Debian 12 packages cpm-cluster builds, runs and tests with, when
# any is missing. Used by tools/up and tools/test; safe to run repeatedly.
#   tools/install-deps.sh          build + run packages
#   tools/install-deps.sh --test   also the test-only packages
set -eu
pkgs="meson ninja-build pkg-config gcc libc6-dev libzmq3-dev libprotobuf-c-dev protobuf-c-compiler
libuv1-dev libopenmpi-dev openmpi-bin libjansson-dev libyaml-dev libhttp-parser-dev curl"
if [ "${1:-}" = "--test" ]; then
    pkgs="$pkgs libcmocka-dev clang libclang-rt-14-dev python3 python3-sentencepiece python3-numpy python3-zmq
python3-protobuf python3-yaml protobuf-compiler iproute2 curl chromium"
fi
missing=""
for p in $pkgs; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
# Node.js may come from another source than Debian (e.g. NodeSource): only
# install Debian's when no npm is on the PATH at all.
if [ "${1:-}" = "--test" ] && ! command -v npm >/dev/null 2>&1; then
    missing="$missing nodejs npm"
fi
[ -z "$missing" ] && exit 0
echo "install-deps: installing:$missing" >&2
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
# shellcheck disable=SC2086
$sudo apt-get install -y -qq --no-install-recommends $missing >/dev/null
