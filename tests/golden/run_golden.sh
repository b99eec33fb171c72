#!/bin/sh
# Runs cpm-run on one golden folder (prefill logits + 32 greedy tokens) and
# compares with the reference.
# Usage: run_golden.sh CPM_RUN COMPARE DIR TOL [THREADS] [BATCH] [KV_DTYPE] [ISA] [ACTIVATIONS MIN_ARGMAX] [FFN] [LM_HEAD]
# (ACTIVATIONS bf16 is lossy: compared against its own bar, golden-compare's MIN_ARGMAX;
# FFN sparse (default) or dense: MiniCPM-S's FFN, ignored by other models;
# LM_HEAD stored (default) or int8: the output layer quantized at load, lossy too)
set -eu
run=$1 compare=$2 dir=$3 tol=$4 threads=${5:-1} batch=${6:-512} kv=${7:-f32} isa=${8:-}
act=${9:-exact} min_argmax=${10:-} ffn=${11:-sparse} lm_head=${12:-stored}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
ids=$(tr ' ' ',' < "$dir/ids.txt" | tr -d '\n')
set --
[ -z "$isa" ] || set -- --isa "$isa"
"$run" --model "$dir" --ids "$ids" --n 32 --ignore-eos --print-ids --threads "$threads" \
    --batch "$batch" --kv-dtype "$kv" --activations "$act" --ffn "$ffn" --lm-head "$lm_head" \
    --logits-out "$out/logits.f32" "$@" \
    > "$out/greedy.txt"
set -- "$dir" "$out/logits.f32" "$out/greedy.txt" "$tol"
[ -z "$min_argmax" ] || set -- "$@" "$min_argmax"
exec "$compare" "$@"
