#!/bin/sh
# BitCPM4 ternary weights end to end: cpm-gen-model --ternary writes a random model whose
# decoder linears hold only 0 and ±a per row, in bf16 as BitCPM4 ships them. cpm-run with
# --keep-bf16 (the bf16 kernels on those very weights) is the reference; the default run
# must repack them (cpm-run says how many) and match it (golden-compare: rel <= 1e-5,
# every argmax and greedy token), with 1 and 2 threads, whole and chunked prefill, on
# every ISA. The same model without --ternary must repack nothing.
# Usage: ternary.sh CPM_RUN CPM_GEN_MODEL GOLDEN_COMPARE GEN_ARGS...
set -eu
run=$1 gen=$2 compare=$3
shift 3
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$gen" "$@" --dtype bf16 --seed 5 --ternary --out "$tmp/t" 2>/dev/null
"$gen" "$@" --dtype bf16 --seed 5 --out "$tmp/plain" 2>/dev/null
ids=1,5,300,2,99,17,42,7,1000,3,64,9
echo "$ids" | tr ',' ' ' > "$tmp/t/ids.txt"
"$run" --model "$tmp/t" --ids "$ids" --n 16 --ignore-eos --print-ids --keep-bf16 \
    --logits-out "$tmp/t/ref_logits.f32" > "$tmp/t/ref_greedy.txt" 2>"$tmp/ref.err"
if grep -q "ternary matrices" "$tmp/ref.err"; then
    echo "ternary.sh: --keep-bf16 still repacked" >&2
    exit 1
fi
check() { # THREADS BATCH [ISA]
    set -- --threads "$1" --batch "$2" ${3:+--isa "$3"}
    "$run" --model "$tmp/t" --ids "$ids" --n 16 --ignore-eos --print-ids \
        --logits-out "$tmp/got.f32" "$@" > "$tmp/got.txt" 2>"$tmp/got.err"
    if ! grep -q "ternary matrices run with 2-bit weights" "$tmp/got.err"; then
        echo "ternary.sh: nothing was repacked ($*)" >&2
        exit 1
    fi
    "$compare" "$tmp/t" "$tmp/got.f32" "$tmp/got.txt" 1e-5
}
check 1 512
check 2 5
check 2 5 avx2
check 1 3 scalar
"$run" --model "$tmp/plain" --ids "$ids" --n 2 --ignore-eos --print-ids >/dev/null 2>"$tmp/plain.err"
if grep -q "ternary matrices" "$tmp/plain.err"; then
    echo "ternary.sh: random (not ternary) bf16 weights were taken for ternary" >&2
    exit 1
fi
