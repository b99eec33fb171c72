#!/bin/sh
# BitCPM4-style ternary weights: decode and prefill tokens/s with the 2-bit kernels vs the
# bf16 kernels on the very same weights (cpm-run --keep-bf16), interleaved, repeated; the
# weight bytes each decode token reads. The model is MiniCPM-1B-shaped (BitCPM4-1B's own
# config is not public), random ternary weights, written once into $CPM_BENCH_MODELS.
#   bench/bench_ternary.sh [BUILD_DIR] [REPEATS (3)] [THREADS ("1 2")]
set -eu
build=${1:-build}
reps=${2:-3}
threads=${3:-1 2}
models=${CPM_BENCH_MODELS:-/tmp/cpm-bench-models}
d="$models/minicpm-1b-ternary"
mkdir -p "$models"
[ -f "$d/config.json" ] || "$build/tools/cpm-gen-model" --variant minicpm-1b --ternary --out "$d" >&2
ids=$(seq 1 128 | awk '{print 1 + ($1 * 7919) % 73000}' | paste -sd, -)
run() { # THREADS [--keep-bf16]: "prefill decode" tok/s
    "$build/shard/cpm-run" --model "$d" --ids "$ids" --n 33 --ignore-eos --print-ids --threads "$@" \
        2>&1 >/dev/null | sed -n 's/.*prefill \([0-9.]*\) tok\/s; generated .* decode \([0-9.]*\) tok\/s.*/\1 \2/p'
}
median() { sort -n | awk '{a[NR] = $1} END {print a[int((NR + 1) / 2)]}'; }
echo "cpu: $(lscpu | sed -n 's/^Model name: *//p')"
printf "%-8s %-10s %14s %14s\n" threads weights "prefill tok/s" "decode tok/s"
for t in $threads; do
    : > /tmp/bench_t2.$$ ; : > /tmp/bench_bf.$$
    for r in $(seq "$reps"); do
        run "$t" >> /tmp/bench_t2.$$
        run "$t" --keep-bf16 >> /tmp/bench_bf.$$
    done
    for kind in t2 bf; do
        f=/tmp/bench_$kind.$$
        printf "%-8s %-10s %14s %14s\n" "$t" "$([ $kind = t2 ] && echo 2-bit || echo bf16)" \
            "$(cut -d' ' -f1 $f | median)" "$(cut -d' ' -f2 $f | median)"
    done
    rm -f /tmp/bench_t2.$$ /tmp/bench_bf.$$
done
