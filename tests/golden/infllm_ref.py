#!/usr/bin/python3
"""infllm_ref.py - independent float64 reference for MiniCPM4 with InfLLM v2.

Written from docs/minicpm-spec.md (sec. 4 forward pass, sec. 5 InfLLM v2), sharing
no code with the C engine: it reads the safetensors file by hand, runs the
whole model in numpy float64 and writes, into OUT_DIR, the files
tests/golden/compare.c checks (ids.txt, ref_logits.f32, ref_greedy.txt).

Sparse attention follows the engine's documented rule (shard/engine/model/infllm.h):
the query at position t is sparse iff t + 1 >= dense_len, so the output does
not depend on the schedule and one incremental pass gives prefill and decode.
Each query's block selection is done literally as spec sec. 5.4: scores for every
candidate block, forced blocks +inf, one sort by (score desc, index asc), the
first k = min(topk, n_out), discard b >= q_blk, then the key set of sec. 5.5.

usage: infllm_ref.py MODEL_DIR OUT_DIR [--len N | --ids 1,2,..] [--greedy N] [--seed S] [--dense]
  --dense ignores sparse_config (plain causal attention), to show the two differ.
"""
import argparse
import json
import os
import struct
import sys

import numpy as np


def read_safetensors(path):
    with open(path, "rb") as f:
        blob = f.read()
    (hlen,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + hlen])
    base = 8 + hlen
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        a, b = t["data_offsets"]
        raw = blob[base + a:base + b]
        if t["dtype"] == "F32":
            x = np.frombuffer(raw, dtype="<f4")
        elif t["dtype"] == "BF16":
            x = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            sys.exit("infllm_ref: %s: dtype %s not handled" % (name, t["dtype"]))
        out[name] = x.astype(np.float64).reshape(t["shape"])
    return out


class Model:
    def __init__(self, d, dense):
        with open(os.path.join(d, "config.json")) as f:
            c = json.load(f)
        self.c = c
        self.w = read_safetensors(os.path.join(d, "model.safetensors"))
        self.H = c["hidden_size"]
        self.L = c["num_hidden_layers"]
        self.nh = c["num_attention_heads"]
        self.nkv = c.get("num_key_value_heads", self.nh)
        self.d = self.H // self.nh
        self.eps = c.get("rms_norm_eps", 1e-6)
        self.sparse = None if dense else c.get("sparse_config")
        theta = c.get("rope_theta", 10000.0)
        half = self.d // 2
        self.inv_freq = 1.0 / theta ** (np.arange(half) * 2.0 / self.d)
        self.rope_div = np.ones(half)
        rs = c.get("rope_scaling")
        if rs:  # LongRoPE (sec. 4.3.4); lengths here stay below L0: short factors
            assert rs.get("rope_type", rs.get("type")) == "longrope"
            assert c["max_position_embeddings"] <= rs["original_max_position_embeddings"]
            self.rope_div = np.array(rs["short_factor"], dtype=np.float64)
        self.K = [np.zeros((0, self.nkv, self.d)) for _ in range(self.L)]
        self.V = [np.zeros((0, self.nkv, self.d)) for _ in range(self.L)]
        self.margins = []  # relative gap at the top-k cut, where it decided something

    def g(self, name):
        return self.w[name]

    def rmsnorm(self, x, w):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * w

    def rope(self, x, pos):  # x [n, heads, d], rotate-half
        ang = pos[:, None] * (1.0 / self.rope_div)[None, :] * self.inv_freq[None, :]
        cs, sn = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        h = self.d // 2
        a, b = x[..., :h], x[..., h:]
        return np.concatenate([a * cs - b * sn, b * cs + a * sn], axis=-1)

    def key_set(self, li, t, g, q):
        """Key positions the query heads q [G, d] of group g at position t attend."""
        sc = self.sparse
        if sc is None:
            return np.arange(t + 1)
        dense_len = sc.get("dense_len", 8192)
        if dense_len != -1 and t + 1 < dense_len:
            return np.arange(t + 1)
        p, s, m = sc.get("kernel_size", 32), sc.get("kernel_stride", 16), sc.get("block_size", 64)
        init, topk = sc.get("init_blocks", 1), sc.get("topk", 64)
        local = sc.get("window_size", 2048) // m
        K = self.K[li][:t + 1, g, :]
        T = t + 1
        n_c = (T - p) // s + 1 if T >= p else 0
        q_blk, n_out = t // m, (T + m - 1) // m
        S = np.zeros(n_c)
        if n_c:
            C = np.stack([K[s * j:s * j + p].mean(axis=0) for j in range(n_c)])
            z = q @ C.T / np.sqrt(self.d)
            z = np.exp(z - z.max(axis=1, keepdims=True))
            S = (z / z.sum(axis=1, keepdims=True)).sum(axis=0)
        r = m // s
        R = np.full(n_out, -np.inf)
        for b in range(n_out):
            js = [j for j in range(r * b - 1, r * b + r) if 0 <= j < n_c]
            if js:
                R[b] = S[js].max()
            if b < init or q_blk - local <= b <= q_blk:
                R[b] = np.inf
        k = min(topk, n_out)
        order = sorted(range(n_out), key=lambda b: (-R[b], b))
        # How close the cut came to flipping; exact ties are structural (two
        # blocks sharing their best kernel) and go to the lower index anyway.
        if k < n_out and np.isfinite(R[order[k - 1]]) and np.isfinite(R[order[k]]):
            gap = (R[order[k - 1]] - R[order[k]]) / R[order[k - 1]]
            if gap > 0:
                self.margins.append(gap)
        chosen = [b for b in order[:k] if b < q_blk]
        blocks = set(range(min(init, n_out))) | set(range(max(0, q_blk - local), q_blk + 1))
        blocks |= set(chosen)
        keys = [u for b in sorted(blocks) for u in range(b * m, min(b * m + m, t + 1))]
        return np.array(keys)

    def attention(self, li, a, pos):
        p = "model.layers.%d.self_attn." % li
        n, G = a.shape[0], self.nh // self.nkv
        q = (a @ self.g(p + "q_proj.weight").T).reshape(n, self.nh, self.d)
        k = (a @ self.g(p + "k_proj.weight").T).reshape(n, self.nkv, self.d)
        v = (a @ self.g(p + "v_proj.weight").T).reshape(n, self.nkv, self.d)
        q, k = self.rope(q, pos), self.rope(k, pos)
        self.K[li] = np.concatenate([self.K[li], k])
        self.V[li] = np.concatenate([self.V[li], v])
        out = np.zeros((n, self.nh, self.d))
        for i in range(n):
            t = int(pos[i])
            for g in range(self.nkv):
                qg = q[i, g * G:(g + 1) * G]
                keys = self.key_set(li, t, g, qg)
                z = qg @ self.K[li][keys, g, :].T / np.sqrt(self.d)
                z = np.exp(z - z.max(axis=1, keepdims=True))
                z /= z.sum(axis=1, keepdims=True)
                out[i, g * G:(g + 1) * G] = z @ self.V[li][keys, g, :]
        return out.reshape(n, self.H) @ self.g(p + "o_proj.weight").T

    def ffn(self, li, b):
        p = "model.layers.%d.mlp." % li
        gt = b @ self.g(p + "gate_proj.weight").T
        up = b @ self.g(p + "up_proj.weight").T
        return (gt / (1.0 + np.exp(-gt)) * up) @ self.g(p + "down_proj.weight").T

    def forward(self, ids):
        """Runs new tokens ids after what is cached; returns their logits."""
        c = self.c
        start = self.K[0].shape[0]
        pos = np.arange(start, start + len(ids), dtype=np.float64)
        h = self.g("model.embed_tokens.weight")[ids] * c.get("scale_emb", 1.0)
        r = c.get("scale_depth", 1.0) / np.sqrt(self.L)
        for li in range(self.L):
            pre = "model.layers.%d." % li
            h = h + self.attention(li, self.rmsnorm(h, self.g(pre + "input_layernorm.weight")), pos) * r
            h = h + self.ffn(li, self.rmsnorm(h, self.g(pre + "post_attention_layernorm.weight"))) * r
        hn = self.rmsnorm(h, self.g("model.norm.weight")) / (self.H / c.get("dim_model_base", 1.0))
        tied = "lm_head.weight" not in self.w
        return hn @ self.g("model.embed_tokens.weight" if tied else "lm_head.weight").T


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--len", type=int, default=300)
    ap.add_argument("--greedy", type=int, default=8)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--dense", action="store_true")
    ap.add_argument("--ids", help="comma-separated prompt ids instead of --len random ones")
    a = ap.parse_args()
    m = Model(a.model, a.dense)
    rng = np.random.RandomState(a.seed)
    vocab = m.c["vocab_size"]
    ids = [1] + [int(x) for x in rng.randint(3, vocab, size=a.len - 1)]
    if a.ids:
        ids = [int(x) for x in a.ids.split(",")]
    logits = m.forward(ids)
    greedy, margins = [], []
    last = logits[-1]
    for _ in range(a.greedy):
        top = np.argsort(-last)[:2]
        greedy.append(int(top[0]))
        margins.append(last[top[0]] - last[top[1]])
        last = m.forward([greedy[-1]])[-1]
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "ids.txt"), "w") as f:
        f.write(" ".join(map(str, ids)) + "\n")
    logits.astype("<f4").tofile(os.path.join(a.out, "ref_logits.f32"))
    with open(os.path.join(a.out, "ref_greedy.txt"), "w") as f:
        f.write(" ".join(map(str, greedy)) + "\n")
    mx = np.abs(logits).max()
    row_margin = np.sort(logits, axis=1)
    row_margin = (row_margin[:, -1] - row_margin[:, -2]).min()
    sel = min(m.margins) if m.margins else float("nan")
    print("infllm_ref: %d positions, %d greedy; min top-1 margin %.3g of max|logit| (prompt), "
          "%.3g (greedy); %d decisive top-k cuts, smallest nonzero relative gap %.3g"
          % (len(ids), a.greedy, row_margin / mx, min(margins) / mx, len(m.margins), sel))
    if m.sparse is not None and not m.margins:
        sys.exit("infllm_ref: no query had more candidate blocks than top-k slots: "
                 "this prompt does not exercise the selection")


if __name__ == "__main__":
    main()
