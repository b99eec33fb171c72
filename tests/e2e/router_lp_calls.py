#!/usr/bin/python3
"""router_lp_calls.py - what logprob token texts cost the tokenizer: one call per token.

Starts a real cluster on loopback (cpm-router, one cpm-tokenizer, N cpm-shard stages, a
cpm-sampler) whose router reaches the tokenizer through a relay in this script: the relay
passes every frame on unchanged and counts the requests by body. A streamed completion
with top_logprobs 5 must then cost exactly one `pieces` request per generated token
(carrying the token and its 5 alternatives) and no more `detokenize` requests than
tokens (the text itself), and its logprob tokens must be, text for text, what a Detokenize
of [previous id, id] with prefix_len 1 says - asked of the same tokenizer directly. Then the
relay stops passing requests on: the stream fails with an in-band tokenizer error after the
call timeout, and once requests pass again the same request gives the same answer.

With --bench N, runs instead (no relay) N times --streams concurrent streamed completions
of --tokens tokens with top_logprobs 5 and prints generated tokens/s (median), the CPU time
the router and the tokenizer spent per token, and the logprob tokens and top lists of the
last one as JSON (to compare two builds' texts).

usage: router_lp_calls.py BUILD_DIR MODEL_DIR [N_STAGES] [--bench N] [--tokens N] [--streams N]
"""
import argparse
import collections
import http.client
import json
import os
import shutil
import statistics
import sys
import threading
import time

import zmq

from harness import E2E, free_port, secure

ap = argparse.ArgumentParser()
ap.add_argument("build")
ap.add_argument("model")
ap.add_argument("stages", nargs="?", type=int, default=2)
ap.add_argument("--bench", type=int, default=0)
ap.add_argument("--tokens", type=int, default=24)
ap.add_argument("--streams", type=int, default=1, help="--bench: concurrent streams per run")
ARGS = ap.parse_args()
h = E2E("cpm-lp-calls-", ARGS.build, ARGS.model)
pb, TMP = h.pb, h.tmp
procs = []
failures = []
CALL_TIMEOUT_MS = 1500
LAST_RAW = [""]  # the last streamed answer, as received


def check(cond, what):
    if not cond:
        failures.append(what)
        print("FAIL:", what, flush=True)


class Relay:
    """ROUTER in front, DEALER to the tokenizer: frames pass unchanged, requests are counted."""

    def __init__(self, ctx, front, back):
        self.front = secure(ctx.socket(zmq.ROUTER), h.keys, server=True)
        self.front.bind(front)
        self.back = secure(ctx.socket(zmq.DEALER), h.keys)
        self.back.connect(back)
        self.counts = collections.Counter()
        self.piece_ids = []  # len(ids) of every pieces request
        self.lock = threading.Lock()
        self.running = True
        self.hold = False  # True: requests are swallowed (a tokenizer that stopped answering)
        self.peer = None
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        poller = zmq.Poller()
        poller.register(self.front, zmq.POLLIN)
        poller.register(self.back, zmq.POLLIN)
        while self.running:
            for sock, _ in poller.poll(100):
                if sock is self.front:
                    frames = self.front.recv_multipart()
                    self.peer = frames[0]  # one client: the router's DEALER
                    env = pb.Envelope.FromString(frames[1])
                    with self.lock:
                        self.counts[env.WhichOneof("body")] += 1
                        if env.WhichOneof("body") == "pieces":
                            self.piece_ids.append(len(env.pieces.ids))
                    if not self.hold:
                        self.back.send_multipart(frames[1:])
                else:
                    frames = self.back.recv_multipart()
                    self.front.send_multipart([self.peer] + frames)

    def snapshot(self):
        with self.lock:
            return collections.Counter(self.counts), list(self.piece_ids)

    def close(self):
        self.running = False
        self.thread.join()
        self.front.close(0)
        self.back.close(0)


def config(tok_ep):
    with open(os.path.join(ARGS.model, "config.json")) as f:
        n_layers = json.load(f)["num_hidden_layers"]
    n = ARGS.stages
    cuts = [n_layers * i // n for i in range(n)] + ["end"]
    ports = dict(h.ports("http", "rpc", "results", "sampler", *["st%d" % i for i in range(n)]),
                 tok=tok_ep)
    stages = [{"layers": "[%d, %s]" % (cuts[i], cuts[i + 1]), "endpoint": "st%d" % i}
              for i in range(n)]
    lines = h.cluster_lines(ports, stages, samplers=["sampler"], router=[
        "micro_batches: %d" % n, "max_tokens: 1024", "timeout_ms: %d" % CALL_TIMEOUT_MS])
    return h.write_config(lines, "cluster-%s.yaml" % ("bench" if ARGS.bench else "relay")), ports["http"]


def start(args, name, cfg, extra=()):
    procs.append(h.start(name, [os.path.join(ARGS.build, args), "--config", cfg] + list(extra)))


def stop_all():
    h.stop_all(10)


def wait_ready(port):
    deadline = time.time() + 60
    while time.time() < deadline and all(p.poll() is None for p in procs):
        if h.ready(port) == 200:
            return True
        time.sleep(0.2)
    return False


def stream_logprobs(port, prompt, n):
    """One streamed completion with top_logprobs 5: (ids, logprob tokens, top lists, seconds)."""
    body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True,
            "logprobs": 5, "stream": True, "return_token_ids": True}
    t0 = time.time()
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    c.request("POST", "/v1/completions", body=json.dumps(body),
              headers={"Content-Type": "application/json"})
    r = c.getresponse()
    data = r.read().decode()
    dt = time.time() - t0
    ids, toks, tops = [], [], []
    for block in data.split("\n\n"):
        if not block.startswith("data: ") or block == "data: [DONE]":
            continue
        for ch in json.loads(block[6:]).get("choices", []):
            ids += ch.get("token_ids") or []
            if ch.get("logprobs"):
                toks += ch["logprobs"]["tokens"]
                tops += ch["logprobs"]["top_logprobs"]
    LAST_RAW[0] = "%s %s" % (r.status, data[-400:])  # for a failure's message
    return ids, toks, tops, dt


def pair_text(sock, ctx, tid):
    env = pb.Envelope(version=1, corr=1)
    env.detokenize.ids.extend([ctx, tid])
    env.detokenize.prefix_len = 1
    sock.send(env.SerializeToString())
    return pb.Envelope.FromString(sock.recv()).detokenized.text


def run_relay_check(prompt):
    ctx = zmq.Context()
    tok_ep = "tcp://127.0.0.1:%d" % free_port()
    relay_ep = "tcp://127.0.0.1:%d" % free_port()
    relay = Relay(ctx, relay_ep, tok_ep)
    cfg, port = config(relay_ep)
    start("router/cpm-router", "router", cfg)
    start("services/tokenizer/cpm-tokenizer", "tokenizer", cfg, ["--index", "0", "--bind", tok_ep])
    for i in range(ARGS.stages):
        start("shard/cpm-shard", "stage%d" % i, cfg, ["--index", str(i)])
    start("services/sampler/cpm-sampler", "sampler", cfg, ["--index", "0"])
    if not wait_ready(port):
        check(False, "cluster did not become ready; logs in " + TMP)
        relay.close()
        return
    before, _ = relay.snapshot()
    n = ARGS.tokens
    ids, toks, _, _ = stream_logprobs(port, prompt, n)
    after, piece_ids = relay.snapshot()
    calls = {k: after[k] - before[k] for k in ("pieces", "detokenize", "tokenize")}
    print("tokenizer requests for %d tokens with top_logprobs 5: %s" % (len(ids), calls))
    check(len(ids) == n and len(toks) == n, "got %d ids / %d logprob tokens, want %d"
          % (len(ids), len(toks), n))
    check(calls["pieces"] == n, "%d pieces requests for %d tokens" % (calls["pieces"], n))
    check(all(k == 6 for k in piece_ids[-n:]), "pieces sizes %s, want 6 each" % piece_ids[-n:])
    check(calls["detokenize"] <= n, "%d detokenize requests for %d tokens (text only)"
          % (calls["detokenize"], n))
    # the texts: as a [previous id, id] Detokenize says, asked of the tokenizer directly
    direct = secure(ctx.socket(zmq.DEALER), h.keys)
    direct.connect(tok_ep)
    prev = [prompt[-1]] + ids[:-1]
    want = [pair_text(direct, c, t) for c, t in zip(prev, ids)]
    direct.close(0)
    check(toks == want, "logprob tokens %r != pair detokenize %r" % (toks, want))
    # the tokenizer stops answering mid-request: the stream ends with an in-band error
    # naming it (after the call timeout), and the router serves again once it is back
    relay.hold = True
    body = {"prompt": prompt, "max_tokens": 4, "temperature": 0, "ignore_eos": True,
            "logprobs": 5, "stream": True}
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    c.request("POST", "/v1/completions", body=json.dumps(body),
              headers={"Content-Type": "application/json"})
    data = c.getresponse().read().decode()
    check("tokenizer_error" in data and "no answer within %d ms" % CALL_TIMEOUT_MS in data
          and data.rstrip().endswith("data: [DONE]"), "stalled tokenizer: %r" % data[-300:])
    relay.hold = False
    check(wait_ready(port), "router not ready after the tokenizer came back")
    ids2, toks2, _, _ = stream_logprobs(port, prompt, n)
    check(ids2 == ids and toks2 == toks, "after the stall: %r != %r (answer: %s)"
          % (toks2, toks, LAST_RAW[0]))
    relay.close()


def cpu_s(p):
    """User + system CPU seconds a child has used so far (Linux /proc)."""
    with open("/proc/%d/stat" % p.pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_bench(prompt):
    cfg, port = config("tcp://127.0.0.1:%d" % free_port())
    start("router/cpm-router", "router", cfg)
    start("services/tokenizer/cpm-tokenizer", "tokenizer", cfg, ["--index", "0"])
    for i in range(ARGS.stages):
        start("shard/cpm-shard", "stage%d" % i, cfg, ["--index", str(i)])
    start("services/sampler/cpm-sampler", "sampler", cfg, ["--index", "0"])
    if not wait_ready(port):
        check(False, "cluster did not become ready; logs in " + TMP)
        return
    stream_logprobs(port, prompt, 8)  # warm-up
    rates, toks, tops = [], [], []
    cpu0 = [cpu_s(p) for p in procs[:2]]  # router, tokenizer
    for _ in range(ARGS.bench):
        outs = [None] * ARGS.streams

        def one(k):
            outs[k] = stream_logprobs(port, prompt, ARGS.tokens)
        t0 = time.time()
        threads = [threading.Thread(target=one, args=(k,)) for k in range(ARGS.streams)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        dt = time.time() - t0
        ids, toks, tops, _ = outs[0]
        got = sum(len(o[0]) for o in outs)
        check(got == ARGS.tokens * ARGS.streams, "bench: %d tokens" % got)
        rates.append(got / dt)
    print("streamed, top_logprobs 5, %d stream(s) x %d tokens, %d runs: median %.1f tokens/s "
          "(min %.1f, max %.1f)" % (ARGS.streams, ARGS.tokens, ARGS.bench,
                                     statistics.median(rates), min(rates), max(rates)))
    n = ARGS.tokens * ARGS.bench * ARGS.streams
    cpu = [(cpu_s(p) - c) * 1e3 / n for p, c in zip(procs[:2], cpu0)]
    print("CPU per generated token: router %.3f ms, tokenizer %.3f ms" % tuple(cpu))
    print("logprob tokens:", json.dumps(toks, ensure_ascii=False))
    print("top logprobs:", json.dumps(tops, ensure_ascii=False, sort_keys=True))


def main():
    ids_path = os.path.join(ARGS.model, "ids.txt")
    prompt = [1, 22557, 1909, 1386, 4596]  # any ids: a model without golden ids.txt
    if os.path.exists(ids_path):
        with open(ids_path) as f:
            prompt = [int(t) for t in f.read().split()]
    if ARGS.bench:
        run_bench(prompt)
    else:
        run_relay_check(prompt)
    for p in procs:
        check(p.poll() is None, "%s exited (rc %s)" % (p.args[0], p.poll()))
    return 1 if failures else 0


if __name__ == "__main__":
    try:
        rc = main()
    finally:
        stop_all()
    print("router lp calls:", "ok" if rc == 0 else "FAILED (logs in %s)" % TMP)
    if rc == 0:
        shutil.rmtree(TMP, ignore_errors=True)
    sys.exit(rc)
