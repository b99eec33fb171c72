#!/bin/sh
# Runs each checkpoint-parser fuzz target for a bounded time (default 30 s each),
# starting from the seed corpus in tests/fuzz/corpus. New inputs go to a scratch
# corpus, never into the tree; crashes are written to $OUT_DIR (default ./fuzz-out).
#   tests/fuzz/run.sh [seconds-per-target]
set -eu
secs=${1:-30}
root=$(cd "$(dirname "$0")/../.." && pwd)
build=${FUZZ_BUILD_DIR:-$root/build-fuzz}
out=${OUT_DIR:-$PWD/fuzz-out}
if [ ! -f "$build/build.ninja" ]; then
    CC=clang meson setup "$build" "$root" -Dfuzzing=true -Dbuildtype=debugoptimized
fi
ninja -C "$build" tests/fuzz/fuzz_safetensors tests/fuzz/fuzz_torch_pickle
mkdir -p "$out"
status=0
for t in safetensors torch_pickle; do
    scratch="$out/corpus-$t"
    mkdir -p "$scratch"
    echo "== fuzz_$t for ${secs}s"
    "$build/tests/fuzz/fuzz_$t" -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 \
        -artifact_prefix="$out/$t-" "$scratch" "$root/tests/fuzz/corpus/$t" || status=1
done
exit $status
