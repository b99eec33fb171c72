#!/bin/sh
# The same random weights written as one model.safetensors and as shards with
# model.safetensors.index.json must give byte-identical logits through cpm-run.
# Usage: sharded.sh CPM_RUN CPM_GEN_MODEL
set -eu
run=$1 gen=$2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
common="--variant minicpm4-tiny --layers 2 --hidden 128 --inter 256 --heads 4 --kv-heads 2 --dtype f32 --seed 5"
"$gen" $common --out "$tmp/one" 2>/dev/null
"$gen" $common --shard-mb 4 --out "$tmp/many" 2>/dev/null
[ -f "$tmp/many/model.safetensors.index.json" ] || { echo "FAIL: no index written"; exit 1; }
n=$(ls "$tmp/many"/model-*-of-*.safetensors | wc -l)
[ "$n" -ge 3 ] || { echo "FAIL: only $n shards"; exit 1; }
for d in one many; do
    "$run" --model "$tmp/$d" --ids 1,5,73441,300,2,99 --n 8 --ignore-eos --print-ids \
        --logits-out "$tmp/$d.f32" > "$tmp/$d.ids"
done
cmp "$tmp/one.f32" "$tmp/many.f32"
cmp "$tmp/one.ids" "$tmp/many.ids"
echo "ok: $n shards give the same logits and tokens as one file"
