#!/bin/sh
# cpm-run on broken checkpoints: each case must exit with status 1 (a clean
# error, not a crash or a sanitizer abort) and print a message naming what is
# wrong. Usage: bad_input.sh CPM_RUN GOOD_MODEL_DIR
set -u
run=$1 good=$2
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

# A fresh copy of the good model, then the edit given as a python snippet
# (p = path of the copy).
variant() {
    d="$tmp/$1"
    rm -rf "$d"
    cp -r "$good" "$d"
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

[ $fails -eq 0 ] && echo "all bad-input cases gave clean errors"
exit $fails
