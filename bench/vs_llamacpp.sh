#!/usr/bin/env bash
# vs_llamacpp.sh - our engine beside llama.cpp on this machine, same random
# MiniCPM-1B-shaped checkpoint, decode, prefill and batched decode, BF16 / F16 / Int4.
#
#   bench/vs_llamacpp.sh [BUILD_DIR (default build)]
#
# Environment:
#   LLAMACPP_DIR      llama.cpp source tree (default /work/peers/llama.cpp); built
#                     here (build/, Release, GGML_NATIVE) when it has no llama-bench,
#                     llama-batched-bench or llama-quantize yet
#   CPM_BENCH_MODELS  where checkpoints and GGUF files are cached (default
#                     /tmp/cpm-bench-models: ~2.7 GB bf16 + 2.7 GB f16 + 0.9 GB gptq
#                     checkpoints, ~2.7 + 2.7 + 0.8 GB GGUF)
#   REPS              rounds per format (default 3); each cell is the median
#   ISA               best (default) or avx2: avx2 pins our kernels to AVX2 + FMA + F16C
#                     (bench_engine --isa avx2) and runs a llama.cpp built without
#                     AVX-512 (build-avx2/, GGML_NATIVE=OFF: SSE4.2, AVX, AVX2, BMI2, FMA,
#                     F16C), both standing in for an AVX2-only CPU with this machine's
#                     memory and cores
#   THREADS           threads for both engines (default 2)
#   BATCHES           batched decode: sequences decoding together (default 1,4,16; empty:
#                     none), each after its own 16-token prompt, 32 steps, aggregate t/s
#   FORMATS           subset of "bf16 bf16x f16 f16x int4 int4x int4x8 int4q8" (default all); bf16x is
#                     our BF16 checkpoint run with --activations bf16 (x rounded to
#                     bf16, as llama.cpp's BF16 path does) against the same BF16 GGUF;
#                     f16x our F16 checkpoint with --activations bf16 (weights rounded
#                     to bf16 too) against the same F16 GGUF;
#                     int4x our GPTQ checkpoint with --activations bf16 against the
#                     same Q4_0 (which meets activations quantized to 8 bits, Q8_0);
#                     int4x8 the same with --lm-head int8 (our output layer quantized
#                     to 8 bits at load, as llama-quantize makes Q4_0's Q6_K);
#                     int4q8 that with --activations int8 (x quantized to int8 per 32
#                     for the int4 weights, as Q4_0 meets Q8_0: like for like)
#
# Int4 is GPTQ int4, group 128, act-order (ours; embeddings stay BF16) against
# llama.cpp's Q4_0 made by llama-quantize from the F16 GGUF (its tied
# token_embd/output becomes Q6_K, as llama-quantize does by default).
#
# Per format and round the two engines run back to back (the order alternates
# between rounds):
#   ours   bench_engine --prompt 128 --decode 64   -> pp128, tg64 (decoded after the
#                                                     128-token prompt)
#          bench_engine --prompt 512 --decode 1    -> pp512
#   llama  llama-bench -p 128,512 -n 64 -r 1      -> pp128, pp512, tg64 (empty context)
# and, with BATCHES (B = each of them):
#   ours   bench_engine --prompt 16 --decode 32 --batch BATCHES  -> bB: aggregate t/s of
#                                                     B sequences stepping together
#   llama  llama-batched-bench -npp 16 -ntg 32 -npl BATCHES      -> bB: its S_TG
#                                                     (B * 32 tokens / generation time)
# The decode roofline is read GB/s (bench_membw, THREADS threads, measured once)
# divided by the bytes of weights one token reads: bench_engine's weights/token for
# ours, the GGUF's tensor bytes for llama.cpp (tools/hf_to_gguf.py --decode-bytes:
# token_embd counts once, as the tied output matrix).
#
# A benchmark, never a test: nothing is asserted and .ci/run does not call it.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
case ${1:-} in -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;; esac
build=${1:-build}
case $build in /*) ;; *) build="$root/$build" ;; esac
llama=${LLAMACPP_DIR:-/work/peers/llama.cpp}
models=${CPM_BENCH_MODELS:-/tmp/cpm-bench-models}
reps=${REPS:-3}
threads=${THREADS:-2}
formats=${FORMATS:-bf16 bf16x f16 f16x int4 int4x int4x8 int4q8}
isa=${ISA:-best}
batches=${BATCHES-1,4,16}
py=$(command -v python3 || echo /usr/bin/python3)

say() { echo "vs_llamacpp: $*" >&2; }
die() { say "$*"; exit 1; }

# ---------------------------------------------------------------- our binaries
[ -f "$build/build.ninja" ] || die "no build in $build: run tools/build.sh first"
ninja -C "$build" tools/cpm-gen-model bench/bench_engine bench/bench_membw >/dev/null ||
    die "building our benchmarks failed (ninja -C $build)"
gen="$build/tools/cpm-gen-model"
engine="$build/bench/bench_engine"

# ---------------------------------------------------------------- llama.cpp
case $isa in
best) lbuild=build lflags="-DGGML_NATIVE=ON" isa_arg=() ;;
avx2) lbuild=build-avx2 lflags="-DGGML_NATIVE=OFF" isa_arg=(--isa avx2) ;;
*) die "ISA=$isa: best or avx2" ;;
esac
lbench="$llama/$lbuild/bin/llama-bench"
lquant="$llama/$lbuild/bin/llama-quantize"
lbatched="$llama/$lbuild/bin/llama-batched-bench"
if [ ! -x "$lbench" ] || [ ! -x "$lquant" ] || [ ! -x "$lbatched" ]; then
    if [ ! -f "$llama/CMakeLists.txt" ]; then
        die "no llama.cpp at $llama. Get it with:
    git clone https://github.com/ggml-org/llama.cpp $llama
then run this script again (it builds llama-bench, llama-batched-bench and llama-quantize),
or set LLAMACPP_DIR."
    fi
    say "building llama.cpp in $llama/$lbuild (llama-bench, llama-batched-bench, llama-quantize;" \
        "takes a while)"
    (cd "$llama" &&
        nice -n 10 cmake -B "$lbuild" "$lflags" -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release >/dev/null &&
        nice -n 10 cmake --build "$lbuild" -j"$(nproc)" \
            --target llama-bench llama-batched-bench llama-quantize >/dev/null) ||
        die "building llama.cpp failed"
fi

# ---------------------------------------------------------------- models (cached)
mkdir -p "$models/gguf"
ckpt() { # ckpt FORMAT: our checkpoint directory for FORMAT
    case $1 in int4*) echo "$models/minicpm-1b-gptq" ;; bf16x) echo "$models/minicpm-1b-bf16" ;;
    f16x) echo "$models/minicpm-1b-f16" ;;
    *) echo "$models/minicpm-1b-$1" ;; esac
}
gguf() { # gguf FORMAT: llama.cpp's file for FORMAT
    case $1 in int4*) echo "$models/gguf/minicpm-1b-q4_0.gguf" ;;
    bf16x) echo "$models/gguf/minicpm-1b-bf16.gguf" ;; f16x) echo "$models/gguf/minicpm-1b-f16.gguf" ;;
    *) echo "$models/gguf/minicpm-1b-$1.gguf" ;; esac
}
need_ckpt() { # need_ckpt DTYPE-NAME: generates $models/minicpm-1b-NAME once
    local d="$models/minicpm-1b-$1" args
    case $1 in
    gptq) args="--dtype bf16 --quant gptq --group-size 128 --desc-act" ;;
    *) args="--dtype $1" ;;
    esac
    [ -f "$d/config.json" ] && return 0
    say "generating $d"
    # shellcheck disable=SC2086
    "$gen" --variant minicpm-1b $args --out "$d" >/dev/null
}
need_gguf() { # need_gguf bf16|f16: converts the checkpoint once
    local g; g=$(gguf "$1")
    [ -f "$g" ] && return 0
    need_ckpt "$1"
    say "converting $(ckpt "$1") -> $g"
    "$py" "$root/tools/hf_to_gguf.py" "$(ckpt "$1")" "$g" >/dev/null
}
for f in $formats; do
    case $f in
    bf16 | f16) need_ckpt "$f"; need_gguf "$f" ;;
    bf16x) need_ckpt bf16; need_gguf bf16 ;;
    f16x) need_ckpt f16; need_gguf f16 ;;
    int4 | int4x | int4x8 | int4q8)
        need_ckpt gptq
        if [ ! -f "$(gguf int4)" ]; then
            need_gguf f16
            say "llama-quantize -> $(gguf int4)"
            "$lquant" "$(gguf f16)" "$(gguf int4)" Q4_0 >/dev/null 2>&1 || die "llama-quantize failed"
        fi
        ;;
    *) die "unknown format $f (bf16, bf16x, f16, f16x, int4, int4x, int4x8, int4q8)" ;;
    esac
done

# ---------------------------------------------------------------- runs
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
samples="$out/samples" # lines: FORMAT SIDE TEST TOKENS/S
: >"$samples"

act_of() { # act_of FORMAT: our --activations and --lm-head for FORMAT
    case $1 in bf16x | f16x | int4x) echo "bf16 stored" ;; int4x8) echo "bf16 int8" ;;
    int4q8) echo "int8 int8" ;; *) echo "exact stored" ;; esac
}

run_ours() { # run_ours FORMAT: appends pp128, tg64, pp512 (and weights/token bytes)
    local d pp tg mb act head
    d=$(ckpt "$1")
    read -r act head < <(act_of "$1")
    # bench_engine's result row: threads, ffn, prefill t/s, decode t/s, weights/token MB, "MB",
    # read GB/s (its own measurement, unused here), % roofline
    "$engine" --model "$d" --threads "$threads" --prompt 128 --decode 64 --activations "$act" \
        --lm-head "$head" "${isa_arg[@]}" >"$out/ours.txt"
    read -r _ _ pp tg mb _ < <(awk -v t="$threads" '$1 == t' "$out/ours.txt") || true
    [ -n "${mb:-}" ] || die "bench_engine gave no result for $d"
    sed -n 's/.* isa \([^ ]*\) .*/\1/p' "$out/ours.txt" >"$out/isa"
    {
        echo "$1 ours pp128 $pp"
        echo "$1 ours tg64 $tg"
        echo "$1 ours_bytes - $(awk -v mb="$mb" 'BEGIN { printf "%.0f", mb * 1e6 }')"
    } >>"$samples"
    "$engine" --model "$d" --threads "$threads" --prompt 512 --decode 1 --activations "$act" \
        --lm-head "$head" "${isa_arg[@]}" >"$out/ours.txt"
    read -r _ _ pp _ < <(awk -v t="$threads" '$1 == t' "$out/ours.txt") || true
    [ -n "${pp:-}" ] || die "bench_engine gave no result for $d"
    echo "$1 ours pp512 $pp" >>"$samples"
}

run_llama() { # run_llama FORMAT: appends pp128, pp512, tg64 from llama-bench's CSV
    local csv="$out/llama.csv"
    "$lbench" -m "$(gguf "$1")" -t "$threads" -p 128,512 -n 64 -r 1 -o csv >"$csv" 2>"$out/llama.err" ||
        { cat "$out/llama.err" >&2; die "llama-bench failed on $(gguf "$1")"; }
    "$py" - "$1" "$csv" >>"$samples" <<'EOF'
import csv, sys
fmt, path = sys.argv[1], sys.argv[2]
for r in csv.DictReader(open(path)):
    p, n = int(r["n_prompt"]), int(r["n_gen"])
    print(fmt, "llama", "pp%d" % p if n == 0 else "tg%d" % n, r["avg_ts"])
EOF
}

run_ours_batched() { # run_ours_batched FORMAT: appends bB for each B of BATCHES
    local act head
    read -r act head < <(act_of "$1")
    "$engine" --model "$(ckpt "$1")" --threads "$threads" --prompt 16 --decode 32 \
        --batch "$batches" --activations "$act" --lm-head "$head" "${isa_arg[@]}" >"$out/ours.txt"
    # the batched table's rows: B, aggregate t/s, ratio to B = 1
    awk -v f="$1" '/^batch +agg/ { on = 1; next } on && NF >= 2 { print f, "ours", "b" $1, $2 }' \
        "$out/ours.txt" >>"$samples"
}

run_llama_batched() { # run_llama_batched FORMAT: appends bB from llama-batched-bench's table
    "$lbatched" -m "$(gguf "$1")" -t "$threads" -c 4096 -b 2048 -ub 512 -npp 16 -ntg 32 \
        -npl "$batches" >"$out/llama.txt" 2>"$out/llama.err" ||
        { cat "$out/llama.err" >&2; die "llama-batched-bench failed on $(gguf "$1")"; }
    # | PP | TG | B | N_KV | T_PP s | S_PP t/s | T_TG s | S_TG t/s | T s | S t/s |
    awk -F'|' -v f="$1" '$2 ~ /^ *16 *$/ { gsub(/ /, "", $4); gsub(/ /, "", $9); print f, "llama", "b" $4, $9 }' \
        "$out/llama.txt" >>"$samples"
}

run_round() { # run_round FORMAT ROUND: both engines, the order alternating between rounds
    if [ $(($2 % 2)) -eq 1 ]; then
        run_ours "$1"; run_llama "$1"
        [ -z "$batches" ] || { run_ours_batched "$1"; run_llama_batched "$1"; }
    else
        run_llama "$1"; run_ours "$1"
        [ -z "$batches" ] || { run_llama_batched "$1"; run_ours_batched "$1"; }
    fi
}

# Read bandwidth: measured before the runs and after each format, since others' load on
# the machine moves it (and every t/s); the roofline is the best seen, as in bench_matmul.
membw() { "$build/bench/bench_membw" "$threads" 1024 5 | awk '{ print $3 }'; }
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
bws=$(membw)
for f in $formats; do
    # warm the page cache so that neither side pays for the first read from disk
    cat "$(ckpt "$f")"/*.safetensors "$(gguf "$f")" >/dev/null
    for r in $(seq 1 "$reps"); do
        say "$f round $r/$reps"
        run_round "$f" "$r"
    done
    echo "$f llama_bytes - $("$py" "$root/tools/hf_to_gguf.py" --decode-bytes "$(gguf "$f")")" >>"$samples"
    bws="$bws $(membw)"
done
bw=$(echo "$bws" | tr ' ' '\n' | sort -g | tail -1)

# ---------------------------------------------------------------- report
median() { # median FORMAT SIDE TEST: median of the samples (the lower middle one if even)
    awk -v f="$1" -v s="$2" -v t="$3" '$1 == f && $2 == s && $3 == t { print $4 }' "$samples" |
        sort -g | awk '{ v[NR] = $1 } END { if (NR) print v[int((NR + 1) / 2)] }'
}
all() { # all FORMAT SIDE TEST: the samples, in run order
    awk -v f="$1" -v s="$2" -v t="$3" '$1 == f && $2 == s && $3 == t { printf "%s%.2f", sep, $4; sep = " " }' "$samples"
}

tests_batched() { [ -z "$batches" ] || echo "$batches" | tr ',' '\n' | sed 's/^/b/'; }

flags=$(grep -m1 '^flags' /proc/cpuinfo || true)
has() { case " $flags " in *" $1 "*) echo yes ;; *) echo no ;; esac; }
echo "# ours vs llama.cpp, MiniCPM-1B-shaped random checkpoint"
echo
echo "- CPU: $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) CPUs;" \
    "avx512f $(has avx512f), avx512_bf16 $(has avx512_bf16), avx512_vnni $(has avx512_vnni)," \
    "amx_bf16 $(has amx_bf16), amx_tile $(has amx_tile)"
echo "- ours: $(git -C "$root" log -1 --format='%h %ad' --date=short 2>/dev/null || echo '?')," \
    "kernels $(cat "$out/isa")"
echo "- llama.cpp: $(git -C "$llama" log -1 --format='%h %ad %s' --date=short 2>/dev/null || echo '?')," \
    "$lbuild/ ($lflags)"
echo "- threads $threads, $reps round(s) per format, ours and llama.cpp interleaved; cells are medians"
echo "- read bandwidth ($threads threads, bench_membw, 1 GiB, best of 5 passes): $bw GB/s, the best of" \
    "[$bws] measured before the runs and after each format"
echo "- load average before: $load_before, after: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "- decode: ours after its 128-token prompt (bench_engine --prompt 128 --decode 64), llama.cpp from an" \
    "empty context (llama-bench -n 64); prefill: one batch of 128 or 512 tokens on both sides"
[ -z "$batches" ] || echo "- batched decode bB: B sequences, each after its own 16-token prompt, 32 steps" \
    "together, aggregate generated t/s (ours: bench_engine --batch; llama.cpp: llama-batched-bench" \
    "-npp 16 -ntg 32, its S_TG); the ratio to B = 1 is each engine's own"
echo "- decode roofline t/s = read GB/s / weights read per token: ours = bench_engine's weights/token," \
    "llama.cpp = the GGUF's tensor bytes (token_embd once, as the tied output; Q4_0 keeps it in Q6_K)"
echo
echo "| format | test | ours t/s | llama.cpp t/s | ours / llama.cpp | ours % roofline | llama.cpp % roofline |"
echo "|---|---|---:|---:|---:|---:|---:|"
for f in $formats; do
    ob=$(median "$f" ours_bytes -)
    lb=$(median "$f" llama_bytes -)
    for t in pp128 pp512 tg64 $(tests_batched); do
        o=$(median "$f" ours "$t")
        l=$(median "$f" llama "$t")
        awk -v f="$f" -v t="$t" -v o="$o" -v l="$l" -v bw="$bw" -v ob="$ob" -v lb="$lb" 'BEGIN {
            name = (f == "int4") ? "int4 (GPTQ g128 / Q4_0)" : (f == "int4x") ? "int4x (same, bf16 act.)" \
                 : (f == "int4x8") ? "int4x8 (+ int8 lm_head)" \
                 : (f == "int4q8") ? "int4q8 (int8 act. + lm_head)" : f
            ratio = (l > 0) ? sprintf("%.2f", o / l) : "-"
            ro = "-"; rl = "-"
            if (t ~ /^tg/) {
                ro = sprintf("%.0f%%", 100 * o / (bw * 1e9 / ob))
                rl = sprintf("%.0f%%", 100 * l / (bw * 1e9 / lb))
            }
            printf "| %s | %s | %.2f | %.2f | %s | %s | %s |\n", name, t, o, l, ratio, ro, rl
        }'
    done
done
echo
echo "Weights read per decode token, and every sample (t/s, in run order):"
echo
for f in $formats; do
    printf -- "- %s: ours %.1f MB, llama.cpp %.1f MB\n" "$f" \
        "$(awk -v b="$(median "$f" ours_bytes -)" 'BEGIN { print b / 1e6 }')" \
        "$(awk -v b="$(median "$f" llama_bytes -)" 'BEGIN { print b / 1e6 }')"
    for t in pp128 pp512 tg64 $(tests_batched); do
        echo "  - $t: ours [$(all "$f" ours "$t")], llama.cpp [$(all "$f" llama "$t")]"
    done
    for t in $(tests_batched); do # each engine's scaling: its median at B over its median at 1
        [ "$t" = b1 ] && continue
        awk -v t="$t" -v o="$(median "$f" ours "$t")" -v o1="$(median "$f" ours b1)" \
            -v l="$(median "$f" llama "$t")" -v l1="$(median "$f" llama b1)" 'BEGIN {
            if (o1 > 0 && l1 > 0) printf "  - %s / b1: ours %.2fx, llama.cpp %.2fx\n", t, o / o1, l / l1 }'
    done
done
