#!/usr/bin/python3
"""bench_tp.py - what tensor parallelism costs and gives: one stage vs the same stage on 2 TP ranks.

Starts a real cluster on loopback (router with `tokenize: off`, sampler, one stage owning every
layer, one compute thread per process) twice: plain, then with the stage split over 2 tensor-
parallel ranks (`stages[].tp`). Reports single-stream greedy decode tokens/s over HTTP (from
the time of max_tokens = 1 + N minus that of max_tokens = 1) and, from the TP ranks' stop line,
the mean wall time of one all-reduce (send the partial, wait for the other's, sum). A benchmark:
it prints a table and asserts nothing (it exits 1 only when the cluster fails).

usage: bench/bench_tp.py BUILD_DIR [--model DIR] [--tokens N] [--repeats N]
The model (MiniCPM4-shaped, BF16, random weights: 8 layers, hidden 1024, FFN 2816, 16 heads,
2 KV heads, vocab 16384) is generated into $CPM_BENCH_MODELS/minicpm4-tp-bench when absent.
"""
import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("build")
    ap.add_argument("--model", default=None)
    ap.add_argument("--tokens", type=int, default=64, help="decode tokens per measurement")
    ap.add_argument("--repeats", type=int, default=3)
    return ap.parse_args()


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def ensure_model(build, model):
    if model:
        return os.path.abspath(model)
    root = os.environ.get("CPM_BENCH_MODELS", "/tmp/cpm-bench-models")
    out = os.path.join(root, "minicpm4-tp-bench")
    if not os.path.exists(os.path.join(out, "config.json")):
        os.makedirs(root, exist_ok=True)
        subprocess.run([os.path.join(build, "tools", "cpm-gen-model"), "--variant", "minicpm4-8b",
                        "--out", out, "--layers", "8", "--hidden", "1024", "--inter", "2816",
                        "--heads", "16", "--kv-heads", "2", "--vocab", "16384", "--dtype", "bf16"],
                       check=True, stdout=subprocess.DEVNULL)
    return out


def post(port, body):
    r = urllib.request.Request("http://127.0.0.1:%d/v1/completions" % port, json.dumps(body).encode(),
                               {"Content-Type": "application/json"})
    with urllib.request.urlopen(r, timeout=300) as f:
        return json.loads(f.read())


def run_cluster(build, model, tp, tokens, repeats, tmp):
    P = {k: free_port() for k in ["http", "rpc", "res", "tok", "smp", "st", "tp1", "m0", "m1"]}
    ep = lambda k: "tcp://127.0.0.1:%d" % P[k]  # noqa: E731
    lines = ["version: 1", "model: " + model, "router:", "  http: 127.0.0.1:%d" % P["http"],
             "  rpc: " + ep("rpc"), "  results: " + ep("res"), "  tokenize: off",
             "tokenizers:", "  - endpoint: " + ep("tok"), "samplers:", "  - endpoint: " + ep("smp"),
             "stages:", "  - layers: [0, end]", "    endpoint: " + ep("st")]
    if tp:
        lines += ["    tp_mesh: " + ep("m0"), "    tp:", "      - endpoint: " + ep("tp1"),
                  "        mesh: " + ep("m1")]
    cfg = os.path.join(tmp, "tp%d.yaml" % tp)
    open(cfg, "w").write("\n".join(lines) + "\n")
    specs = [("smp", "services/sampler/cpm-sampler", ["--index", "0"]),
             ("st", "shard/cpm-shard", ["--index", "0"])]
    if tp:
        specs.append(("tp1", "shard/cpm-shard", ["--index", "0", "--tp-rank", "1"]))
    specs.append(("router", "router/cpm-router", []))
    procs, logs = {}, {}
    for name, binary, extra in specs:
        logs[name] = os.path.join(tmp, "%s-tp%d.log" % (name, tp))
        procs[name] = subprocess.Popen([os.path.join(build, binary), "--config", cfg] + extra,
                                       stdout=open(logs[name], "w"), stderr=subprocess.STDOUT)
    try:
        t0 = time.time()
        while True:
            try:
                with urllib.request.urlopen("http://127.0.0.1:%d/ready" % P["http"], timeout=5) as f:
                    if f.status == 200:
                        break
            except OSError:
                pass
            if time.time() - t0 > 120:
                raise SystemExit("cluster (tp %d) not ready: see %s" % (tp, tmp))
            time.sleep(0.1)
        prompt = [1] + [100 + i for i in range(15)]
        body = {"prompt": prompt, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
        post(P["http"], dict(body, max_tokens=4))  # warm up
        best, ids = None, None
        for _ in range(repeats):
            t1 = time.time()
            post(P["http"], dict(body, max_tokens=1))
            t2 = time.time()
            out = post(P["http"], dict(body, max_tokens=1 + tokens))
            t3 = time.time()
            dt = (t3 - t2) - (t2 - t1)
            best = dt if best is None or dt < best else best
            ids = out["choices"][0]["token_ids"]
    finally:
        for p in procs.values():
            p.send_signal(signal.SIGTERM)
        for p in procs.values():
            p.wait(30)
    us = None
    if tp:
        m = re.search(r"(\d+) all-reduces of ([0-9.]+) us mean", open(logs["st"]).read())
        us = (int(m.group(1)), float(m.group(2))) if m else None
    return tokens / best, us, ids


def main():
    a = parse_args()
    build = os.path.abspath(a.build)
    model = ensure_model(build, a.model)
    cfg = json.load(open(os.path.join(model, "config.json")))
    tmp = tempfile.mkdtemp(prefix="cpm-bench-tp-")
    plain, _, ids1 = run_cluster(build, model, 0, a.tokens, a.repeats, tmp)
    tp2, us, ids2 = run_cluster(build, model, 1, a.tokens, a.repeats, tmp)
    n_layers = cfg["num_hidden_layers"]
    print("model %s: %d layers, hidden %d, %d heads / %d KV heads; %d decode tokens, best of %d"
          % (model, n_layers, cfg["hidden_size"], cfg["num_attention_heads"],
             cfg["num_key_value_heads"], a.tokens, a.repeats))
    print("| stage | decode tok/s (1 stream) | ms/token | all-reduces/token | us per all-reduce |")
    print("|---|---|---|---|---|")
    print("| 1 process, 1 thread | %.1f | %.2f | 0 | - |" % (plain, 1000 / plain))
    print("| TP 2 (2 processes, 1 thread each) | %.1f | %.2f | %d | %s |"
          % (tp2, 1000 / tp2, 2 * n_layers, "%.1f (mean of %d)" % (us[1], us[0]) if us else "?"))
    print("greedy tokens equal: %s" % (ids1 == ids2))


if __name__ == "__main__":
    sys.exit(main())
