#!/usr/bin/python3
"""bench_cluster.py - what the services and sockets cost: the whole cluster over HTTP vs cpm-run.

Starts a real cluster with `cpm-cluster up` on loopback (router, tokenizer, sampler, two
pipeline stages of one compute thread each) on a MiniCPM-1B-shaped BF16 checkpoint with
random weights, and reports
  (a) single-stream greedy decode tokens/s through the HTTP API next to cpm-run on the same
      model (1 thread, the budget of one stage: with one stream only one stage computes
      at a time), and time to first token;
  (b) aggregate generated tokens/s with 1, 4 and 16 concurrent streams (/v1/completions,
      streamed, token-id prompts, ignore_eos so every request makes exactly max_tokens
      tokens): over the whole run (prefills included), and while every stream of the first
      round was decoding (from the last first token to the first last token: the rate to
      set beside bench_engine --batch).
A benchmark: it prints a table and asserts nothing (it exits 1 only when the cluster fails).

usage: bench/bench_cluster.py BUILD_DIR [--model DIR] [--prompt N] [--tokens N]
                              [--streams 1,4,16] [--requests-per-stream N]
The model is generated into $CPM_BENCH_MODELS/minicpm-1b-bf16 (default /tmp/cpm-bench-models,
2.7 GB) when absent.
"""
import argparse
import json
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("build")
    ap.add_argument("--model", default=None)
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens per request")
    ap.add_argument("--tokens", type=int, default=32, help="max_tokens per request")
    ap.add_argument("--streams", default="1,4,16")
    ap.add_argument("--requests-per-stream", type=int, default=1)
    ap.add_argument("--stage-threads", type=int, default=1)
    ap.add_argument("--activations", default="exact", help="the stages' activations: exact, bf16 "
                    "or int8 (docs/KERNELS.md)")
    ap.add_argument("--curve", default="on", help="on, off or on,off: the fabric with CurveZMQ "
                    "(the default) and/or in plain text, one cluster each, side by side")
    return ap.parse_args()


def ensure_model(build, model):
    if model:
        return os.path.abspath(model)
    root = os.environ.get("CPM_BENCH_MODELS", "/tmp/cpm-bench-models")
    d = os.path.join(root, "minicpm-1b-bf16")
    if not os.path.exists(os.path.join(d, "config.json")):
        os.makedirs(root, exist_ok=True)
        print("generating %s (2.7 GB) ..." % d, file=sys.stderr)
        subprocess.run([os.path.join(build, "tools", "cpm-gen-model"), "--variant", "minicpm-1b",
                        "--dtype", "bf16", "--out", d], check=True)
    return d


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def prompts(vocab, n, length, seed=1):
    """Distinct random token-id prompts (ids above the special tokens)."""
    rng = random.Random(seed)
    return [[1] + [rng.randrange(100, vocab) for _ in range(length - 1)] for _ in range(n)]


# ---------------------------------------------------------------- cpm-run, the baseline

def cpm_run(build, model, ids, n, threads, activations):
    r = subprocess.run([os.path.join(build, "shard", "cpm-run"), "--model", model,
                        "--ids", ",".join(map(str, ids)), "--n", str(n), "--ignore-eos",
                        "--threads", str(threads), "--activations", activations, "--print-ids"],
                       capture_output=True, text=True, check=True)
    m = re.search(r"prefill ([\d.]+) tok/s; generated (\d+) tokens, decode ([\d.]+) tok/s", r.stderr)
    if not m:
        raise SystemExit("cpm-run: no timing line in %r" % r.stderr)
    return {"prefill": float(m.group(1)), "decode": float(m.group(3)),
            "ids": [int(x) for x in r.stdout.split()]}


# ---------------------------------------------------------------- the cluster

def write_config(tmp, threads, cut, curve, router_extra="", activations="exact"):
    ep = lambda: "tcp://127.0.0.1:%d" % free_port()  # noqa: E731
    text = ("""# written by bench/bench_cluster.py
version: 1
router:
  rpc: %s
  results: %s
  micro_batches: 2
  max_seqs: 64
""" + router_extra + """tokenizers:
  - endpoint: %s
samplers:
  - endpoint: %s
stages:
  - layers: [0, %d]
    endpoint: %s
    threads: %d
    kv_tokens: 8192
    activations: %s
  - layers: [%d, end]
    endpoint: %s
    threads: %d
    kv_tokens: 8192
    activations: %s
security:
  curve: %s
""") % (ep(), ep(), ep(), ep(), cut, ep(), threads, activations, cut, ep(), threads, activations,
         curve)
    path = os.path.join(tmp, "bench-%s-%d.yaml" % (curve, len(router_extra)))
    with open(path, "w") as f:
        f.write(text)
    return path


class Cluster:
    def __init__(self, build, model, cfg, tmp):
        self.log_path = os.path.join(tmp, "cluster.log")
        # --port 0: the router picks a free port and the launcher's ready line names it.
        self.p = subprocess.Popen([os.path.join(build, "tools", "cpm-cluster"), "up", cfg, "--model", model,
                                   "--port", "0", "--timeout", "300"],
                                  stdout=subprocess.PIPE, stderr=open(self.log_path, "w"), text=True)
        line = self.p.stdout.readline()
        m = re.search(r"ready: http://[^:]+:(\d+)", line)
        if not m:
            self.stop()
            raise SystemExit("cluster did not start: %r\n%s" % (line, self.log()))
        self.port = int(m.group(1))

    def log(self):
        with open(self.log_path) as f:
            return f.read()[-3000:]

    def stop(self):
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(60)
            except subprocess.TimeoutExpired:
                self.p.kill()

    def complete(self, ids, n, stream=False):
        """One /v1/completions. Returns (completion_tokens, seconds, token ids, [(seconds, n ids)]
        per streamed chunk)."""
        body = {"prompt": ids, "max_tokens": n, "temperature": 0, "ignore_eos": True, "stream": stream,
                "return_token_ids": True}
        req = urllib.request.Request("http://127.0.0.1:%d/v1/completions" % self.port,
                                     data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        t0 = time.perf_counter()
        with urllib.request.urlopen(req, timeout=600) as r:
            if not stream:
                out = json.loads(r.read())
                return (out["usage"]["completion_tokens"], time.perf_counter() - t0,
                        out["choices"][0].get("token_ids", []), [])
            toks, chunks = [], []
            for raw in r:
                line = raw.decode().strip()
                if line == "data: [DONE]":
                    break
                if not line.startswith("data: "):
                    continue
                got = json.loads(line[6:])["choices"][0].get("token_ids", [])
                if got:
                    chunks.append((time.perf_counter() - t0, len(got)))
                    toks += got
        return len(toks), time.perf_counter() - t0, toks, chunks


def stream_rates(chunks):
    """(seconds to the first token, decode tokens/s after it) from streamed chunk times."""
    first = chunks[0][0]
    later = sum(n for _, n in chunks) - chunks[0][1]
    return first, later / (chunks[-1][0] - first) if later else 0.0


def steady_rate(firsts):
    """Aggregate tokens/s while all the given requests were decoding: tokens that arrived after
    the last of their first tokens and up to the first of their last ones, over that time.
    firsts: per request, its streamed chunks as (absolute seconds, n ids)."""
    a = max(c[0][0] for c in firsts)
    b = min(c[-1][0] for c in firsts)
    if b <= a:
        return 0.0
    return sum(k for c in firsts for t, k in c if a < t <= b) / (b - a)


def concurrent(cl, all_prompts, streams, per_stream, n):
    """streams clients, each sending per_stream requests back to back (streamed). Returns the
    tokens, the wall time, the median request time and steady_rate over each stream's first."""
    results, errors, firsts = [], [], []

    def client(k):
        try:
            for j in range(per_stream):
                ids = all_prompts[(k * per_stream + j) % len(all_prompts)]
                t0 = time.perf_counter()
                r = cl.complete(ids, n, stream=True)
                results.append(r)
                if j == 0 and r[3]:
                    firsts.append([(t0 + t, k) for t, k in r[3]])
        except (urllib.error.URLError, OSError, KeyError, ValueError) as e:
            errors.append(repr(e))

    th = [threading.Thread(target=client, args=(k,)) for k in range(streams)]
    t0 = time.perf_counter()
    for t in th:
        t.start()
    for t in th:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise SystemExit("%d streams: %s\n%s" % (streams, errors[0], cl.log()))
    toks = sum(r[0] for r in results)
    lat = sorted(r[1] for r in results)
    if len(results) != streams * per_stream or len(firsts) != streams:
        raise SystemExit("%d streams: %d answers" % (streams, len(results)))
    return toks, wall, lat[len(lat) // 2], steady_rate(firsts)


def main():
    a = parse_args()
    build = os.path.abspath(a.build)
    model = ensure_model(build, a.model)
    cfg_json = json.load(open(os.path.join(model, "config.json")))
    vocab = cfg_json["vocab_size"]
    streams = [int(x) for x in a.streams.split(",")]
    ps = prompts(vocab, max(streams) * a.requests_per_stream, a.prompt)
    n = a.tokens

    print("model: %s (%s, %d layers, hidden %d, %s)" % (model, cfg_json.get("architectures", ["?"])[0],
                                                       cfg_json["num_hidden_layers"], cfg_json["hidden_size"],
                                                       cfg_json.get("torch_dtype", "?")))
    print("machine: %d CPUs; prompt %d tokens, max_tokens %d, greedy, ignore_eos; activations %s"
          % (os.cpu_count(), a.prompt, n, a.activations))

    base1 = max((cpm_run(build, model, ps[0], n + 1, 1, a.activations) for _ in range(2)),
                key=lambda r: r["decode"])
    base2 = cpm_run(build, model, ps[0], n + 1, 2, a.activations)

    layers = cfg_json["num_hidden_layers"]
    cut = max(1, layers // 2)
    for curve in a.curve.split(","):
        r = measure(a, build, model, ps, streams, cut, curve, base1)
        report(a, r, cut, layers, curve, base1, base2)


def measure(a, build, model, ps, streams, cut, curve, base1):
    """One cluster with the fabric's security set to curve (on/off): its figures."""
    n = a.tokens
    tmp = tempfile.mkdtemp(prefix="cpm-bench-cluster-")
    cfg = write_config(tmp, a.stage_threads, cut, curve, activations=a.activations)
    t0 = time.perf_counter()
    cl = Cluster(build, model, cfg, tmp)
    start_s = time.perf_counter() - t0
    try:
        cl.complete(ps[1], 2)  # warm: page the weights in, first connections
        # (a) per-token times from the stream; the best of two runs, as for cpm-run
        runs = [cl.complete(ps[0], n + 1, stream=True) for _ in range(2)]
        rates = [stream_rates(r[3]) for r in runs]
        ttft, dec = max(rates, key=lambda x: x[1])
        same = all(r[2] == base1["ids"] for r in runs)
        # (b) aggregate
        agg = [(s,) + concurrent(cl, ps, s, a.requests_per_stream, n) for s in streams]
    finally:
        cl.stop()
    return start_s, ttft, dec, same, agg


def report(a, r, cut, layers, curve, base1, base2):
    start_s, ttft, dec, same, agg = r
    n = a.tokens
    print()
    print("=== fabric: %s" % ("CurveZMQ (encrypted, authenticated)" if curve == "on" else "PLAIN TEXT"))
    print("cluster: router + tokenizer + sampler + 2 stages (layers 0..%d | %d..%d), %d compute thread(s) "
          "per stage, micro_batches 2, loopback; started in %.1f s" % (cut - 1, cut, layers - 1,
                                                                      a.stage_threads, start_s))
    print("load average during the run: %s" % " ".join("%.2f" % x for x in os.getloadavg()))
    print()
    print("(a) single stream, greedy: %d tokens after a %d-token prompt (best of 2)" % (n + 1, a.prompt))
    print("  %-44s %10s %12s" % ("", "decode t/s", "first token"))
    # cpm-run: prompt / prefill rate; cluster: first streamed token, end to end over HTTP.
    print("  %-44s %10.2f %10.0f ms" % ("cpm-run, 1 thread", base1["decode"], 1000 * a.prompt / base1["prefill"]))
    print("  %-44s %10.2f %10.0f ms" % ("cpm-run, 2 threads", base2["decode"], 1000 * a.prompt / base2["prefill"]))
    print("  %-44s %10.2f %10.0f ms" % ("cluster over HTTP (2 stages x %d thread)" % a.stage_threads, dec,
                                        1000 * ttft))
    print("  cluster / cpm-run 1 thread: %.0f %% (%+.1f ms per token); same greedy tokens as cpm-run: %s"
          % (100 * dec / base1["decode"], 1000 * (1 / dec - 1 / base1["decode"]), "yes" if same else "NO"))
    print()
    print("(b) aggregate, /v1/completions, %d-token id prompts, max_tokens %d, %d request(s) per stream"
          % (a.prompt, n, a.requests_per_stream))
    print("  %8s %10s %9s %12s %14s %18s" % ("streams", "tokens", "wall s", "agg tok/s", "median req s",
                                             "all decoding t/s"))
    for s, toks, wall, med, steady in agg:
        print("  %8d %10d %9.2f %12.2f %14.2f %18.2f" % (s, toks, wall, toks / wall, med, steady))


if __name__ == "__main__":
    main()
