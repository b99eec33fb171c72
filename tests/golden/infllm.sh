#!/bin/sh
# InfLLM v2 end to end: a tiny MiniCPM4 with a small sparse_config (so a
# 320-token prompt really selects blocks), cpm-run against the independent
# float64 reference infllm_ref.py (prompt logits, 8 greedy tokens through the
# decode path), whole and in prefill chunks that straddle dense_len, 1 and 2
# threads; then the same weights run densely must miss that reference, so the
# comparison can fail.
# Usage: infllm.sh CPM_RUN CPM_GEN_MODEL COMPARE PYTHON3 INFLLM_REF_PY
set -eu
run=$1 gen=$2 compare=$3 py=$4 ref=$5
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
"$py" -c 'import numpy' || { echo "infllm.sh: $py lacks numpy (Debian: python3-numpy)"; exit 1; }

# kernel 32 / stride 16 / block 32: each block max-pools 3 kernels; window 32
# and init 1 force 3 blocks, topk 5 leaves 2 chosen by score; dense_len 200 so
# rows 199.. are sparse and rows below are dense even where they could select.
"$gen" --variant minicpm4-tiny --out "$out/model" --dtype f32 --vocab 1024 --layers 3 --seed 3 \
    --sparse kernel=32,stride=16,block=32,window=32,topk=5,init=1,dense_len=200 2>/dev/null
"$py" "$ref" "$out/model" "$out/ref" --len 320 --greedy 8
ids=$(tr ' ' ',' < "$out/ref/ids.txt" | tr -d '\n')

check() { # MODEL THREADS BATCH
    "$run" --model "$1" --ids "$ids" --n 8 --ignore-eos --print-ids --threads "$2" --batch "$3" \
        --logits-out "$out/logits.f32" > "$out/greedy.txt"
    "$compare" "$out/ref" "$out/logits.f32" "$out/greedy.txt" 1e-4
}
check "$out/model" 1 512
check "$out/model" 2 64
check "$out/model" 1 7

mkdir "$out/dense"
ln -s "$out/model/model.safetensors" "$out/dense/model.safetensors"
"$py" -c 'import json, sys
c = json.load(open(sys.argv[1])); del c["sparse_config"]; json.dump(c, open(sys.argv[2], "w"))' \
    "$out/model/config.json" "$out/dense/config.json"
if check "$out/dense" 1 512; then
    echo "FAIL: dense attention matches the sparse reference: the check cannot tell them apart"
    exit 1
fi
echo "PASS: dense attention misses the sparse reference, as it must"
