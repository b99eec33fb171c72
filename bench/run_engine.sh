#!/bin/sh
# Engine benchmark on a MiniCPM-1B-shaped checkpoint (hidden 1536, 52 layers,
# 24/8 heads, FFN 3840, vocab 73440; random weights): BF16, F32 and GPTQ int4
# (group 128, act-order; embeddings stay BF16), 1 and 2 threads. Models are
# generated once into $CPM_BENCH_MODELS (default /tmp/cpm-bench-models:
# 2.7 GB + 5.4 GB + 0.9 GB).
#   bench/run_engine.sh [BUILD_DIR] [DTYPES (default "bf16 f32 gptq")]
set -eu
build=${1:-build}
dtypes=${2:-bf16 f32 gptq}
models=${CPM_BENCH_MODELS:-/tmp/cpm-bench-models}
mkdir -p "$models"
for dt in $dtypes; do
    d="$models/minicpm-1b-$dt"
    case $dt in
    gptq) args="--dtype bf16 --quant gptq --group-size 128 --desc-act" ;;
    *) args="--dtype $dt" ;;
    esac
    [ -f "$d/config.json" ] || "$build/tools/cpm-gen-model" --variant minicpm-1b $args --out "$d"
done
for dt in $dtypes; do
    "$build/bench/bench_engine" --model "$models/minicpm-1b-$dt" --threads 1,2 --prompt 128 --decode 32
done
