#!/bin/sh
# Every libFuzzer target of the project for a bounded time each (default 20 s):
# the checkpoint parsers, the tokenizer, the router's HTTP, OpenAI JSON and
# tool-call parsers and the wire protocol (every Envelope a service reads). Needs clang; builds them once in $FUZZ_BUILD_DIR (default build-fuzz).
# New inputs go to a scratch corpus under $OUT_DIR (default ./fuzz-out), crashes
# too; the seed corpora in tests/fuzz/corpus are never modified.
#   tests/fuzz/run_all.sh [seconds-per-target]
set -eu
secs=${1:-20}
root=$(cd "$(dirname "$0")/../.." && pwd)
build=${FUZZ_BUILD_DIR:-$root/build-fuzz}
out=${OUT_DIR:-$PWD/fuzz-out}
if [ ! -f "$build/build.ninja" ]; then
    CC=clang meson setup "$build" "$root" -Dfuzzing=true -Dbuildtype=debugoptimized >/dev/null
fi
targets="tests/fuzz/fuzz_safetensors:safetensors tests/fuzz/fuzz_torch_pickle:torch_pickle
tests/tokenizer/fuzz_tokenizer:tokenizer tests/fuzz/fuzz_http:http tests/fuzz/fuzz_openai_json:openai_json
tests/fuzz/fuzz_toolcall:toolcall tests/fuzz/fuzz_wire:wire"
ninja -C "$build" $(for t in $targets; do printf '%s ' "${t%%:*}"; done) >/dev/null
status=0
for t in $targets; do
    exe=${t%%:*} corpus=${t##*:}
    mkdir -p "$out/corpus-$corpus"
    echo "== $(basename "$exe") for ${secs}s"
    "$build/$exe" -max_total_time="$secs" -timeout=20 -rss_limit_mb=4096 -print_final_stats=0 \
        -artifact_prefix="$out/$corpus-" "$out/corpus-$corpus" "$root/tests/fuzz/corpus/$corpus" \
        2>"$out/$corpus.log" || { status=1; tail -n 30 "$out/$corpus.log"; }
    grep -E "^Done|DONE" "$out/$corpus.log" | tail -n 1 || true
done
exit $status
