#!/usr/bin/env python3
"""hf_to_gguf.py - a MiniCPM checkpoint (HuggingFace layout) to a GGUF file for
llama.cpp's `minicpm` architecture, in pure Python (no torch, no numpy).

    tools/hf_to_gguf.py MODEL_DIR OUT.gguf        convert (BF16/F16/F32 as stored)
    tools/hf_to_gguf.py --decode-bytes FILE.gguf  print the bytes of weights one
                                                  decode token reads (see below)

Only what bench/vs_llamacpp.sh needs: dense MiniCPM (not GPTQ, not MoE, not
MiniCPM3), every matrix kept in the checkpoint's dtype (BF16 -> GGML type 30,
F16 -> 1, F32 -> 0), 1-D tensors (norms) as F32 as llama.cpp's own converter
stores them. Q and K rows are permuted the way convert_hf_to_gguf.py
(MiniCPMModel.modify_tensors / LlamaModel.permute) does for llama.cpp's rope.
The tokenizer is written as an SPM ("llama") vocabulary built from
tokenizer.json's vocab (ids < vocab_size): enough for llama.cpp to load it and
for llama-bench, which feeds random tokens; it is not meant for real text.

The data is streamed: a tensor is copied in chunks (Q/K, a few MB, are
permuted in memory), so a 2.7 GB checkpoint never sits in memory.

GGUF layout (llama.cpp ggml/include/gguf.h): magic "GGUF", uint32 version 3,
int64 tensor count, int64 KV count, the KV pairs, the tensor infos (name,
n_dims, dims innermost first, ggml type, offset into the data blob), then the
data blob, every tensor aligned to general.alignment (default 32).
"""
import json
import os
import struct
import sys

ALIGN = 32

# gguf value types (gguf.h)
T_UINT8, T_INT8, T_UINT16, T_INT16, T_UINT32, T_INT32, T_FLOAT32, T_BOOL, T_STRING, T_ARRAY, \
    T_UINT64, T_INT64, T_FLOAT64 = range(13)

# ggml tensor types and the llama_ftype written as general.file_type
GGML_F32, GGML_F16, GGML_BF16 = 0, 1, 30
ST_TO_GGML = {"F32": (GGML_F32, 4), "F16": (GGML_F16, 2), "BF16": (GGML_BF16, 2)}
FILE_TYPE = {GGML_F32: 0, GGML_F16: 1, GGML_BF16: 32}  # ALL_F32, MOSTLY_F16, MOSTLY_BF16

# token types (gguf-py constants.py TokenType)
TOK_NORMAL, TOK_UNKNOWN, TOK_CONTROL, TOK_BYTE = 1, 2, 3, 6


# ---------------------------------------------------------------- GGUF writing
def gguf_str(s):
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def kv_bytes(key, vtype, value):
    """One KV pair: key, value type, value (arrays: (elem type, list))."""
    out = gguf_str(key) + struct.pack("<i", vtype)
    if vtype == T_ARRAY:
        etype, items = value
        out += struct.pack("<iQ", etype, len(items))
        if etype == T_STRING:
            out += b"".join(gguf_str(x) for x in items)
        else:
            fmt = {T_FLOAT32: "f", T_INT32: "i", T_UINT32: "I"}[etype]
            out += struct.pack("<%d%s" % (len(items), fmt), *items)
        return out
    if vtype == T_STRING:
        return out + gguf_str(value)
    fmt = {T_UINT32: "<I", T_INT32: "<i", T_FLOAT32: "<f", T_BOOL: "<?", T_UINT64: "<Q"}[vtype]
    return out + struct.pack(fmt, value)


def pad(n, a=ALIGN):
    return (a - n % a) % a


# ---------------------------------------------------------------- safetensors
def read_safetensors_headers(model_dir):
    """name -> (path, data start in file, dtype, shape, nbytes) over every shard."""
    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if not files:
        sys.exit("hf_to_gguf: no *.safetensors in %s" % model_dir)
    tensors = {}
    for f in files:
        path = os.path.join(model_dir, f)
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            hdr = json.loads(fh.read(n))
        for name, info in hdr.items():
            if name == "__metadata__":
                continue
            b, e = info["data_offsets"]
            tensors[name] = (path, 8 + n + b, info["dtype"], info["shape"], e - b)
    return tensors


def hf_to_gguf_name(name):
    """HF tensor name -> llama.cpp tensor name (None: not a tensor we write)."""
    fixed = {"model.embed_tokens.weight": "token_embd.weight",
             "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if name in fixed:
        return fixed[name]
    parts = name.split(".")
    if len(parts) < 5 or parts[:2] != ["model", "layers"]:
        return None
    bid, rest = parts[2], ".".join(parts[3:])
    table = {"input_layernorm.weight": "attn_norm.weight",
             "post_attention_layernorm.weight": "ffn_norm.weight",
             "self_attn.q_proj.weight": "attn_q.weight",
             "self_attn.k_proj.weight": "attn_k.weight",
             "self_attn.v_proj.weight": "attn_v.weight",
             "self_attn.o_proj.weight": "attn_output.weight",
             "mlp.gate_proj.weight": "ffn_gate.weight",
             "mlp.up_proj.weight": "ffn_up.weight",
             "mlp.down_proj.weight": "ffn_down.weight"}
    return "blk.%s.%s" % (bid, table[rest]) if rest in table else None


def to_f32(raw, st_dtype):
    """A small tensor's bytes in the checkpoint dtype -> little-endian F32 bytes."""
    n = len(raw) // (4 if st_dtype == "F32" else 2)
    if st_dtype == "F32":
        return raw
    if st_dtype == "F16":
        return struct.pack("<%df" % n, *struct.unpack("<%de" % n, raw))
    # BF16: the high half of an F32
    halves = struct.unpack("<%dH" % n, raw)
    return struct.pack("<%dI" % n, *(h << 16 for h in halves))


def permute_rows(raw, rows, n_head, row_bytes):
    """LlamaModel.permute: rows of each head reordered (2, hd/2) -> (hd/2, 2)."""
    hd = rows // n_head
    half = hd // 2
    out = bytearray(len(raw))
    for h in range(n_head):
        for i in range(half):
            for j in range(2):
                dst = h * hd + i * 2 + j
                src = h * hd + j * half + i
                out[dst * row_bytes:(dst + 1) * row_bytes] = raw[src * row_bytes:(src + 1) * row_bytes]
    return bytes(out)


# ---------------------------------------------------------------- tokenizer
def vocab_arrays(model_dir, vocab_size):
    """tokens, scores, token types: vocab_size entries from tokenizer.json."""
    tokens = ["<unused_%d>" % i for i in range(vocab_size)]
    types = [TOK_NORMAL] * vocab_size
    path = os.path.join(model_dir, "tokenizer.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            tj = json.load(f)
        vocab = tj.get("model", {}).get("vocab", {})
        items = vocab.items() if isinstance(vocab, dict) else ((t, i) for i, (t, _) in enumerate(vocab))
        for tok, i in items:
            if 0 <= i < vocab_size:
                tokens[i] = tok
        for at in tj.get("added_tokens", []):
            if 0 <= at["id"] < vocab_size:
                tokens[at["id"]] = at["content"]
                types[at["id"]] = TOK_CONTROL if at.get("special") else TOK_NORMAL
    for i, t in enumerate(tokens):
        if len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            types[i] = TOK_BYTE
    types[0] = TOK_UNKNOWN
    scores = [-float(i) for i in range(vocab_size)]  # earlier (more frequent) first
    return tokens, scores, types


# ---------------------------------------------------------------- convert
def convert(model_dir, out_path):
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    if cfg.get("quantization_config"):
        sys.exit("hf_to_gguf: %s is quantized (%s); convert the BF16/F16 checkpoint and use "
                 "llama-quantize" % (model_dir, cfg["quantization_config"].get("quant_method")))
    arch = "minicpm"
    n_embd, n_layer = cfg["hidden_size"], cfg["num_hidden_layers"]
    n_head = cfg["num_attention_heads"]
    n_head_kv = cfg.get("num_key_value_heads") or n_head
    vocab_size = cfg["vocab_size"]

    st = read_safetensors_headers(model_dir)
    # token_embd first, then block by block, then output_norm (and output)
    def order(name):
        g = hf_to_gguf_name(name)
        if g.startswith("token_embd"):
            return (-1, g)
        if g.startswith("blk."):
            return (int(g.split(".")[1]), g)
        return (1 << 30, g)
    names = sorted((n for n in st if hf_to_gguf_name(n)), key=order)

    infos, offset, ftype = [], 0, None
    for name in names:
        path, start, dt, shape, nbytes = st[name]
        if dt not in ST_TO_GGML:
            sys.exit("hf_to_gguf: %s has dtype %s (only F32/F16/BF16)" % (name, dt))
        gtype, esize = ST_TO_GGML[dt]
        if len(shape) == 1:
            gtype, nbytes = GGML_F32, nbytes // esize * 4
        elif ftype is None:
            ftype = gtype
        infos.append((name, hf_to_gguf_name(name), list(reversed(shape)), gtype, offset, nbytes))
        offset += nbytes + pad(nbytes)

    tokens, scores, types = vocab_arrays(model_dir, vocab_size)
    kvs = [
        ("general.architecture", T_STRING, arch),
        ("general.name", T_STRING, os.path.basename(os.path.normpath(model_dir))),
        ("general.file_type", T_UINT32, FILE_TYPE[ftype if ftype is not None else GGML_F32]),
        ("general.alignment", T_UINT32, ALIGN),
        (arch + ".vocab_size", T_UINT32, vocab_size),
        (arch + ".context_length", T_UINT32, cfg.get("max_position_embeddings", 4096)),
        (arch + ".embedding_length", T_UINT32, n_embd),
        (arch + ".block_count", T_UINT32, n_layer),
        (arch + ".feed_forward_length", T_UINT32, cfg["intermediate_size"]),
        (arch + ".attention.head_count", T_UINT32, n_head),
        (arch + ".attention.head_count_kv", T_UINT32, n_head_kv),
        (arch + ".rope.dimension_count", T_UINT32, n_embd // n_head),
        (arch + ".rope.freq_base", T_FLOAT32, float(cfg.get("rope_theta", 10000.0))),
        (arch + ".attention.layer_norm_rms_epsilon", T_FLOAT32, float(cfg.get("rms_norm_eps", 1e-5))),
        (arch + ".embedding_scale", T_FLOAT32, float(cfg.get("scale_emb", 1.0))),
        (arch + ".residual_scale", T_FLOAT32,
         float(cfg.get("scale_depth", 1.0)) / n_layer ** 0.5),
        (arch + ".logit_scale", T_FLOAT32, n_embd / float(cfg.get("dim_model_base", n_embd))),
        ("tokenizer.ggml.model", T_STRING, "llama"),
        ("tokenizer.ggml.tokens", T_ARRAY, (T_STRING, tokens)),
        ("tokenizer.ggml.scores", T_ARRAY, (T_FLOAT32, scores)),
        ("tokenizer.ggml.token_type", T_ARRAY, (T_INT32, types)),
        ("tokenizer.ggml.bos_token_id", T_UINT32, cfg.get("bos_token_id", 1)),
        ("tokenizer.ggml.eos_token_id", T_UINT32, cfg.get("eos_token_id", 2)),
        ("tokenizer.ggml.unknown_token_id", T_UINT32, 0),
        ("tokenizer.ggml.add_bos_token", T_BOOL, True),
    ]

    tmp = out_path + ".part"
    with open(tmp, "wb") as out:
        out.write(b"GGUF" + struct.pack("<IqQ", 3, len(infos), len(kvs)))
        for kv in kvs:
            out.write(kv_bytes(*kv))
        for _, gname, dims, gtype, off, _ in infos:
            out.write(gguf_str(gname) + struct.pack("<I", len(dims)))
            out.write(struct.pack("<%dq" % len(dims), *dims) + struct.pack("<iQ", gtype, off))
        out.write(b"\0" * pad(out.tell()))
        base = out.tell()
        for name, gname, dims, gtype, off, nbytes in infos:
            assert out.tell() == base + off
            path, start, dt, shape, src_bytes = st[name]
            with open(path, "rb") as src:
                src.seek(start)
                if len(shape) == 1:
                    out.write(to_f32(src.read(src_bytes), dt))
                elif gname.endswith(("attn_q.weight", "attn_k.weight")):
                    heads = n_head if gname.endswith("attn_q.weight") else n_head_kv
                    out.write(permute_rows(src.read(src_bytes), shape[0], heads, src_bytes // shape[0]))
                else:
                    left = src_bytes
                    while left:
                        chunk = src.read(min(left, 16 << 20))
                        out.write(chunk)
                        left -= len(chunk)
            out.write(b"\0" * pad(nbytes))
    os.replace(tmp, out_path)
    print("hf_to_gguf: %s: %d tensors, %.2f GB" % (out_path, len(infos), os.path.getsize(out_path) / 1e9))


# ---------------------------------------------------------------- reading back
GGML_BLOCK = {0: (1, 4), 1: (1, 2), 30: (1, 2), 2: (32, 18), 3: (32, 20), 8: (32, 34),
              12: (256, 144), 13: (256, 176), 14: (256, 210), 10: (256, 84), 11: (256, 110)}


def read_gguf_tensors(path):
    """[(name, dims, ggml type, bytes)] of a GGUF file (the types in GGML_BLOCK)."""
    def rd(fmt):
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))

    def rstr():
        (n,) = rd("<Q")
        return f.read(n).decode("utf-8", "replace")

    def skip_value(t):
        sizes = {T_UINT8: 1, T_INT8: 1, T_UINT16: 2, T_INT16: 2, T_UINT32: 4, T_INT32: 4,
                 T_FLOAT32: 4, T_BOOL: 1, T_UINT64: 8, T_INT64: 8, T_FLOAT64: 8}
        if t == T_STRING:
            rstr()
        elif t == T_ARRAY:
            et, n = rd("<iQ")
            if et == T_STRING:
                for _ in range(n):
                    rstr()
            else:
                f.seek(sizes[et] * n, 1)
        else:
            f.seek(sizes[t], 1)

    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            sys.exit("hf_to_gguf: %s is not a GGUF file" % path)
        _, n_t, n_kv = rd("<Iqq")
        for _ in range(n_kv):
            rstr()
            (t,) = rd("<i")
            skip_value(t)
        out = []
        for _ in range(n_t):
            name = rstr()
            (nd,) = rd("<I")
            dims = rd("<%dq" % nd)
            t, _off = rd("<iQ")
            if t not in GGML_BLOCK:
                sys.exit("hf_to_gguf: %s: ggml type %d not known here" % (name, t))
            n = 1
            for d in dims:
                n *= d
            blk, bsz = GGML_BLOCK[t]
            out.append((name, dims, t, n // blk * bsz))
        return out


def decode_bytes(path):
    """Bytes of weights one decode token reads in llama.cpp: every tensor except
    token_embd when an output.weight exists (then only one embedding row is
    read); a tied token_embd counts once, as the output matrix."""
    ts = read_gguf_tensors(path)
    has_output = any(n == "output.weight" for n, *_ in ts)
    return sum(b for n, _, _, b in ts if not (n == "token_embd.weight" and has_output))


def main(argv):
    if len(argv) == 3 and argv[1] == "--decode-bytes":
        print(decode_bytes(argv[2]))
        return 0
    if len(argv) != 3 or argv[1].startswith("-"):
        sys.stderr.write(__doc__)
        return 2
    convert(argv[1], argv[2])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
