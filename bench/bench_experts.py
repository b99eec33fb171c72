#!/usr/bin/python3
"""bench_experts.py - what expert parallelism costs a single stream: MiniCPM-MoE decode through
the cluster with the experts in the stages vs on two cpm-expert services, next to cpm-run.

Starts each cluster with `cpm-cluster up` on loopback (router, tokenizer, sampler, two stages;
then the same plus two expert services owning experts [0, 4) and [4, 8)) on a scaled-down
MiniCPM-MoE-8x2B-shaped BF16 checkpoint with random weights, and reports single-stream greedy
decode tokens/s over HTTP (SSE: time between the first and the last token) and that the tokens
of all three runs agree. A benchmark: it prints a table and asserts nothing (exit 1 only when
a cluster fails to start).

usage: bench/bench_experts.py BUILD_DIR [--model DIR] [--tokens N] [--threads N]
The model is generated into $CPM_BENCH_MODELS/minicpm-moe-small (default /tmp/cpm-bench-models)
when absent: 8 layers, hidden 1024, 8 experts of 2048, top-2.
"""
import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request


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
    d = os.path.join(root, "minicpm-moe-small")
    if not os.path.exists(os.path.join(d, "config.json")):
        os.makedirs(root, exist_ok=True)
        subprocess.run([os.path.join(build, "tools", "cpm-gen-model"), "--variant", "minicpm-moe-8x2b",
                        "--layers", "8", "--hidden", "1024", "--inter", "2048", "--heads", "16",
                        "--kv-heads", "16", "--experts", "8", "--out", d], check=True)
    return d


def write_config(tmp, threads, experts):
    ep = lambda: "tcp://127.0.0.1:%d" % free_port()  # noqa: E731
    lines = ["version: 1", "router:", "  rpc: " + ep(), "  results: " + ep(), "  micro_batches: 2",
             "tokenizers:", "  - endpoint: " + ep(), "samplers:", "  - endpoint: " + ep(), "stages:",
             "  - {layers: [0, 4], endpoint: %s, threads: %d}" % (ep(), threads),
             "  - {layers: [4, end], endpoint: %s, threads: %d}" % (ep(), threads)]
    if experts:
        lines += ["experts:", "  - {experts: [0, 4], endpoint: %s, threads: %d}" % (ep(), threads),
                  "  - {experts: [4, end], endpoint: %s, threads: %d}" % (ep(), threads)]
    path = os.path.join(tmp, "bench-%s.yaml" % ("experts" if experts else "local"))
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def stream_decode(port, ids, n):
    body = json.dumps({"prompt": ids, "max_tokens": n, "temperature": 0, "ignore_eos": True,
                       "stream": True, "return_token_ids": True}).encode()
    rq = urllib.request.Request("http://127.0.0.1:%d/v1/completions" % port, data=body,
                                headers={"Content-Type": "application/json"})
    times, toks = [], []
    with urllib.request.urlopen(rq, timeout=600) as r:
        for line in r:
            line = line.decode().strip()
            if line.startswith("data: {"):
                ev = json.loads(line[6:])
                got = [t for ch in ev.get("choices", []) for t in ch.get("token_ids", [])]
                if got:
                    times.append(time.time())
                    toks += got
    return (len(toks) - 1) / (times[-1] - times[0]), toks


def run_cluster(build, model, cfg, tmp, ids, n):
    log = open(os.path.join(tmp, os.path.basename(cfg) + ".log"), "w")
    p = subprocess.Popen([os.path.join(build, "tools", "cpm-cluster"), "up", cfg, "--model", model,
                          "--port", "0", "--timeout", "300"], stdout=subprocess.PIPE, stderr=log, text=True)
    line = p.stdout.readline()
    m = re.search(r"ready: http://[^:]+:(\d+)", line)
    if not m:
        p.terminate()
        raise SystemExit("cluster %s did not start: %r (log in %s)" % (cfg, line, tmp))
    port = int(m.group(1))
    stream_decode(port, ids, 8)  # warm up
    best, toks = 0.0, None
    for _ in range(3):
        rate, toks = stream_decode(port, ids, n)
        best = max(best, rate)
    p.terminate()
    p.wait(60)
    return best, toks


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("build")
    ap.add_argument("--model", default=None)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    build = os.path.abspath(a.build)
    model = ensure_model(build, a.model)
    tmp = tempfile.mkdtemp(prefix="cpm-bench-experts-")
    ids = [1] + [100 + 37 * i % 20000 for i in range(31)]
    r = subprocess.run([os.path.join(build, "shard", "cpm-run"), "--model", model, "--ids",
                        ",".join(map(str, ids)), "--n", str(a.tokens), "--ignore-eos", "--threads",
                        str(a.threads), "--print-ids"], capture_output=True, text=True, check=True)
    m = re.search(r"decode ([\d.]+) tok/s", r.stderr)
    ref = [int(x) for x in r.stdout.split()]
    local, t_local = run_cluster(build, model, write_config(tmp, a.threads, False), tmp, ids, a.tokens)
    remote, t_remote = run_cluster(build, model, write_config(tmp, a.threads, True), tmp, ids, a.tokens)
    cfg = json.load(open(os.path.join(model, "config.json")))
    print("model %s: %d layers, hidden %d, %d experts x %d, top-%d; %d thread(s) per process; "
          "single stream, %d-token prompt, %d tokens"
          % (os.path.basename(model), cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_experts"],
             cfg["intermediate_size"], cfg["num_experts_per_tok"], a.threads, len(ids), a.tokens))
    print("  %-52s %8s tok/s" % ("cpm-run (one process)", m.group(1) if m else "?"))
    print("  %-52s %8.2f tok/s" % ("cluster, 2 stages, experts in the stages", local))
    print("  %-52s %8.2f tok/s" % ("cluster, 2 stages + 2 expert services", remote))
    print("  tokens: cluster == cpm-run: %s; with expert services == cpm-run: %s"
          % (t_local == ref, t_remote == ref))


if __name__ == "__main__":
    sys.exit(main())
