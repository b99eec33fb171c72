#!/bin/sh
# cpm-run on broken checkpoints: each case must exit with status 1 (a clean
# error, not a crash or a sanitizer abort) and print a message naming what is
# wrong. With CPM_GEN_MODEL, broken GPTQ and AWQ int4 checkpoints too.
# Usage: bad_input.sh CPM_RUN GOOD_MODEL_DIR [CPM_GEN_MODEL]
set -u
run=$1 good=$2 gen=${3:-}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fails=0

# expect NAME PATTERN -- cpm-run args...
expect() {
    name=$1 pattern=$2
    shift 3
    "$run" "$@" >"$tmp/out" 2>"$tmp/err"
    rc=$?
    if [ $rc -ne 1 ] || ! grep -q -- "$pattern" "$tmp/err"; then
        echo "FAIL $name: exit $rc, stderr:"; sed 's/^/    /' "$tmp/err"
        fails=$((fails + 1))
    else
        echo "ok   $name: $(head -n 1 "$tmp/err")"
    fi
}

# A fresh copy of the good model ($base when set), then the edit given as a
# python snippet (p = path of the copy).
variant() {
    d="$tmp/$1"
    rm -rf "$d"
    cp -r "${base:-$good}" "$d"
    /usr/bin/python3 - "$d" <<PY
import json, struct, sys, os
p = sys.argv[1]
def cfg_edit(f):
    c = json.load(open(p + '/config.json')); f(c); json.dump(c, open(p + '/config.json', 'w'))
def header():
    b = open(p + '/model.safetensors', 'rb').read()
    n = struct.unpack('<Q', b[:8])[0]
    return b, n, json.loads(b[8:8 + n])
def write_header(b, n, h):
    h.pop('__metadata__', None)  # frees room for longer numbers
    t = json.dumps(h, separators=(',', ':')).encode(); t += b' ' * (n - len(t))
    assert len(t) == n, 'header grew'
    open(p + '/model.safetensors', 'wb').write(b[:8] + t + b[8 + n:])
$2
PY
}

ids="--ids 1,2,3 --n 2 --print-ids"

variant badjson "open(p + '/config.json', 'w').write('{\"vocab_size\": 12,')"
expect "config.json not JSON" "config.json: line" -- --model "$tmp/badjson" $ids

variant arch "cfg_edit(lambda c: c.update(architectures=['LlamaForCausalLM']))"
expect "unsupported architecture" "LlamaForCausalLM' is not supported" -- --model "$tmp/arch" $ids

variant shape "cfg_edit(lambda c: c.update(intermediate_size=333))"
expect "wrong shape" "shape" -- --model "$tmp/shape" $ids

variant missing "cfg_edit(lambda c: c.update(num_hidden_layers=c['num_hidden_layers'] + 1))"
expect "missing tensor" "model.layers.3" -- --model "$tmp/missing" $ids

variant quant "cfg_edit(lambda c: c.update(quantization_config={'quant_method': 'gptq'}))"
expect "quantized config" "quantization_config" -- --model "$tmp/quant" $ids

variant trunc "b = open(p + '/model.safetensors', 'rb').read(); open(p + '/model.safetensors', 'wb').write(b[:len(b) // 2])"
expect "truncated safetensors" "model.safetensors" -- --model "$tmp/trunc" $ids

variant hdrlen "b = open(p + '/model.safetensors', 'rb').read(); open(p + '/model.safetensors', 'wb').write(struct.pack('<Q', 1 << 40) + b[8:])"
expect "header length past the end" "model.safetensors" -- --model "$tmp/hdrlen" $ids

variant dtype "b, n, h = header(); h['model.norm.weight']['dtype'] = 'I32'; write_header(b, n, h)"
expect "unsupported dtype" "I32" -- --model "$tmp/dtype" $ids

variant overlap "b, n, h = header(); a = 'model.layers.0.input_layernorm.weight'; h['model.norm.weight']['data_offsets'] = h[a]['data_offsets']; write_header(b, n, h)"
expect "overlapping offsets" "overlap" -- --model "$tmp/overlap" $ids

variant past "b, n, h = header(); e = h['model.norm.weight']['data_offsets']; h['model.norm.weight']['data_offsets'] = [e[0] + (1 << 30), e[1] + (1 << 30)]; write_header(b, n, h)"
expect "offsets past the data" "model.norm.weight" -- --model "$tmp/past" $ids

variant nofile "os.remove(p + '/model.safetensors')"
expect "no weights file" "safetensors" -- --model "$tmp/nofile" $ids

expect "missing directory" "config.json" -- --model "$tmp/does-not-exist" $ids
expect "token id out of range" "token id 99999" -- --model "$good" --ids 1,99999 --n 1 --print-ids
expect "bad --ids" "bad token id" -- --model "$good" --ids 1,x --n 1 --print-ids

# GPTQ int4: the linear model.layers.0.self_attn.q_proj is [128 out, 128 in], group 32.
if [ -n "$gen" ]; then
    base="$tmp/gptq-good"
    "$gen" --variant minicpm4-tiny --layers 2 --hidden 128 --inter 256 --heads 4 --kv-heads 2 \
        --dtype f32 --quant gptq --group-size 32 --desc-act --out "$base" 2>/dev/null
    q=model.layers.0.self_attn.q_proj

    variant q_bits "cfg_edit(lambda c: c['quantization_config'].update(bits=8))"
    expect "GPTQ bits 8" "quantization_config.bits: 8 is not supported" -- --model "$tmp/q_bits" $ids

    variant q_awq "cfg_edit(lambda c: c['quantization_config'].update(quant_method='awq'))"
    expect "AWQ config, GPTQ tensors" "$q.qweight: shape \[16,128\], expected \[128,16\]" -- --model "$tmp/q_awq" $ids

    variant q_marlin "cfg_edit(lambda c: c['quantization_config'].update(quant_method='marlin'))"
    expect "marlin" "quantization_config.quant_method: marlin is not supported" -- --model "$tmp/q_marlin" $ids

    variant q_v2 "cfg_edit(lambda c: c['quantization_config'].update(checkpoint_format='gptq_v2'))"
    expect "gptq_v2 format" "checkpoint_format: gptq_v2" -- --model "$tmp/q_v2" $ids

    variant q_shape "b, n, h = header(); h['$q.qweight']['shape'] = [128, 16]; write_header(b, n, h)"
    expect "qweight shape" "$q.qweight: shape \[128,16\], expected \[16,128\]" -- --model "$tmp/q_shape" $ids

    variant q_noscales "b, n, h = header(); h['$q.scalez'] = h.pop('$q.scales'); write_header(b, n, h)"
    expect "missing scales" "tensor $q.scales: missing" -- --model "$tmp/q_noscales" $ids

    variant q_gidx "b, n, h = header(); o = 8 + n + h['$q.g_idx']['data_offsets'][0] + 5 * 4
b = bytearray(b); b[o:o + 4] = struct.pack('<i', 999); open(p + '/model.safetensors', 'wb').write(b)"
    expect "g_idx out of range" "$q.g_idx: entry \[5\] is outside \[0, 4)" -- --model "$tmp/q_gidx" $ids

    variant q_dtype "b, n, h = header(); h['$q.qzeros']['dtype'] = 'F32'; write_header(b, n, h)"
    expect "qzeros not I32" "$q.qzeros: dtype F32, expected I32" -- --model "$tmp/q_dtype" $ids

    # AWQ (GEMM): the same q_proj as qweight [128 in, 16], qzeros [4, 16], group 32.
    base="$tmp/awq-good"
    "$gen" --variant minicpm4-tiny --layers 2 --hidden 128 --inter 256 --heads 4 --kv-heads 2 \
        --dtype f32 --quant awq --group-size 32 --out "$base" 2>/dev/null

    variant a_gemv "cfg_edit(lambda c: c['quantization_config'].update(version='GEMV'))"
    expect "AWQ gemv" "quantization_config.version: GEMV is not supported" -- --model "$tmp/a_gemv" $ids

    variant a_nozp "cfg_edit(lambda c: c['quantization_config'].update(zero_point=False))"
    expect "AWQ no zero point" "quantization_config.zero_point: false is not supported" -- --model "$tmp/a_nozp" $ids

    variant a_bits "cfg_edit(lambda c: c['quantization_config'].update(bits=3))"
    expect "AWQ bits 3" "quantization_config.bits: 3 is not supported" -- --model "$tmp/a_bits" $ids

    variant a_shape "b, n, h = header(); h['$q.qweight']['shape'] = [16, 128]; write_header(b, n, h)"
    expect "AWQ qweight shape" "$q.qweight: shape \[16,128\], expected \[128,16\]" -- --model "$tmp/a_shape" $ids

    variant a_group "cfg_edit(lambda c: c['quantization_config'].update(group_size=64))"
    expect "AWQ group size" "$q.qzeros: shape \[4,16\], expected \[2,16\]" -- --model "$tmp/a_group" $ids

    variant a_gdiv "cfg_edit(lambda c: c['quantization_config'].update(group_size=48))"
    expect "AWQ group not dividing" "group_size 48 does not divide the 128 input features" -- --model "$tmp/a_gdiv" $ids
fi

[ $fails -eq 0 ] && echo "all bad-input cases gave clean errors"
exit $fails
