#!/bin/sh
# Engine benchmark on a MiniCPM-1B-shaped checkpoint (hidden 1536, 52 layers,
# 24/8 heads, FFN 3840, vocab 73440; random weights), BF16 and F32, 1 and 2
# threads. Models are generated once into $CPM_BENCH_MODELS (default
# /tmp/cpm-bench-models: 2.7 GB + 5.4 GB).
#   bench/run_engine.sh [BUILD_DIR]
set -eu
build=${1:-build}
models=${CPM_BENCH_MODELS:-/tmp/cpm-bench-models}
mkdir -p "$models"
for dt in bf16 f32; do
    d="$models/minicpm-1b-$dt"
    [ -f "$d/config.json" ] || "$build/tools/cpm-gen-model" --variant minicpm-1b --dtype "$dt" --out "$d"
done
for dt in bf16 f32; do
    "$build/bench/bench_engine" --model "$models/minicpm-1b-$dt" --threads 1,2 --prompt 128 --decode 32
done
