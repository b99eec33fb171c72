#!/bin/sh
# Runs the tokenizer fuzz target (tests/fuzz/fuzz_tokenizer.c) under libFuzzer with
# ASan/UBSan for a bounded time (default 60 s), from the seed corpus in
# tests/fuzz/corpus/tokenizer. New inputs go to a scratch corpus, never into the
# tree; crashes are written to $OUT_DIR (default ./fuzz-out).
#   tests/tokenizer/run_fuzz.sh [seconds]
set -eu
secs=${1:-60}
root=$(cd "$(dirname "$0")/../.." && pwd)
build=${FUZZ_BUILD_DIR:-$root/build-fuzz}
out=${OUT_DIR:-$PWD/fuzz-out}
if [ ! -f "$build/build.ninja" ]; then
    CC=clang meson setup "$build" "$root" -Dfuzzing=true -Dbuildtype=debugoptimized
fi
ninja -C "$build" tests/tokenizer/fuzz_tokenizer
mkdir -p "$out/corpus-tokenizer"
echo "== fuzz_tokenizer for ${secs}s"
exec "$build/tests/tokenizer/fuzz_tokenizer" -max_total_time="$secs" -timeout=20 -rss_limit_mb=4096 \
    -max_len=65536 -artifact_prefix="$out/tokenizer-" "$out/corpus-tokenizer" "$root/tests/fuzz/corpus/tokenizer"
