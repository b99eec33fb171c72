#!/bin/sh
# F16 weights with the opt-in bf16 activations: cpm-gen-model writes a random F16
# model; cpm-run on it with exact activations is the reference (the exact path is
# held to the golden F32 bars elsewhere), and --activations bf16 (x rounded to bf16
# and, where VDPBF16PS runs, the weights too) must meet the act-bf16 bar:
# golden-compare rel <= 8e-2 and >= 85 % of prompt positions with the reference's
# argmax, with 1 and 2 threads, whole and chunked prefill, and on AVX2 (x rounded,
# weights exact).
# Usage: act_bf16_f16.sh CPM_RUN CPM_GEN_MODEL GOLDEN_COMPARE GEN_ARGS...
set -eu
run=$1 gen=$2 compare=$3
shift 3
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$gen" "$@" --dtype f16 --seed 11 --out "$tmp/m" 2>/dev/null
grep -q '"torch_dtype": "float16"' "$tmp/m/config.json"
ids=1,5,300,2,99,17,42,7,1000,3,64,9
echo "$ids" | tr ',' ' ' > "$tmp/m/ids.txt"
"$run" --model "$tmp/m" --ids "$ids" --n 16 --ignore-eos --print-ids \
    --logits-out "$tmp/m/ref_logits.f32" > "$tmp/m/ref_greedy.txt" 2>/dev/null
check() { # THREADS BATCH [ISA]
    set -- --threads "$1" --batch "$2" --activations bf16 ${3:+--isa "$3"}
    "$run" --model "$tmp/m" --ids "$ids" --n 16 --ignore-eos --print-ids \
        --logits-out "$tmp/got.f32" "$@" > "$tmp/got.txt" 2>/dev/null
    "$compare" "$tmp/m" "$tmp/got.f32" "$tmp/got.txt" 8e-2 0.85
}
check 1 512
check 2 5
check 2 5 avx2
