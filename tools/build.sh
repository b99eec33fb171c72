#!/bin/sh
# Configures build/ (once) and builds it; used by tools/up and tools/test.
#   tools/build.sh            the build that serves (tests only if cmocka is present)
#   tools/build.sh --tests    also the test suites: a build/ configured without them
#                             (tools/up on a machine without cmocka) is reconfigured
# A failing step prints its own output and says which step it was: nothing half-works
# in silence.
set -eu
cd "$(dirname "$0")/.."
log=$(mktemp)
trap 'rm -f "$log"' EXIT
step() { # step WHAT CMD...: runs CMD quietly; on failure shows its output and WHAT
    what=$1
    shift
    if ! "$@" >"$log" 2>&1; then
        tail -n 60 "$log" >&2
        echo "build: $what failed: $*" >&2
        exit 1
    fi
}
tests=auto
[ "${1:-}" = --tests ] && tests=enabled
if [ ! -f build/build.ninja ]; then
    wipe=""
    [ -d build ] && wipe="--wipe" # a configure that failed half-way
    step "configuring" meson setup $wipe build -Dtests=$tests
elif [ "$tests" = enabled ]; then
    step "configuring the tests" meson configure build -Dtests=enabled
fi
step "building" ninja -C build
