#!/usr/bin/python3
"""bench_prefix.py - prefix caching on a multi-turn chat workload: TTFT and throughput, on vs off.

Starts the cluster twice with `cpm-cluster up` (router, tokenizer, sampler, two pipeline
stages), once with router.prefix_cache on and once off, on a MiniCPM-1B-shaped BF16
checkpoint with random weights, and replays the same workload on each: C conversations at
once, each T turns; every conversation starts with the same system prompt (S tokens), and
turn t's prompt is the system prompt, the earlier turns (user message, then the answer the
cluster gave) and a new user message (U tokens) - what a chat client sends. Reports per
mode: median and p90 time to first token (streamed), median TTFT of turns after the first,
prompt tokens taken from the cache (usage.prompt_tokens_details), wall time and generated
tokens/s. Greedy answers: both modes must produce the same tokens (checked, exit 1 if not).
A benchmark: timings are printed, never asserted.

usage: bench/bench_prefix.py BUILD_DIR [--model DIR] [--system N] [--user N] [--answer N]
                             [--conversations C] [--turns T] [--stage-threads N]
"""
import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_cluster import Cluster, ensure_model, write_config  # noqa: E402


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("build")
    ap.add_argument("--model", default=None)
    ap.add_argument("--system", type=int, default=256, help="system prompt tokens")
    ap.add_argument("--user", type=int, default=24, help="tokens per user message")
    ap.add_argument("--answer", type=int, default=16, help="max_tokens per answer")
    ap.add_argument("--conversations", type=int, default=2)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--stage-threads", type=int, default=1)
    return ap.parse_args()


def stream_completion(port, ids, n):
    """(generated ids, TTFT seconds, cached prompt tokens) of one streamed greedy completion."""
    body = {"prompt": ids, "max_tokens": n, "temperature": 0, "ignore_eos": True, "stream": True,
            "return_token_ids": True, "stream_options": {"include_usage": True}}
    req = urllib.request.Request("http://127.0.0.1:%d/v1/completions" % port,
                                 data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    t0 = time.time()
    ttft, out, cached = None, [], 0
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for ch in chunk.get("choices", []):
                got = ch.get("token_ids") or []
                if got and ttft is None:
                    ttft = time.time() - t0
                out += got
            if chunk.get("usage"):
                cached = chunk["usage"].get("prompt_tokens_details", {}).get("cached_tokens", 0)
    return out, ttft, cached


def conversation(port, system, users, n, record):
    history = list(system)
    for t, user in enumerate(users):
        prompt = history + user
        ids, ttft, cached = stream_completion(port, prompt, n)
        record.append({"turn": t, "prompt": len(prompt), "ttft": ttft, "cached": cached, "ids": ids})
        history = prompt + ids


def workload(vocab, a, seed=7):
    rng = random.Random(seed)
    tok = lambda k: [rng.randrange(100, vocab) for _ in range(k)]  # noqa: E731
    system = [1] + tok(a.system - 1)
    return system, [[tok(a.user) for _ in range(a.turns)] for _ in range(a.conversations)]


def run_mode(a, model, layers, mode, system, users):
    tmp = tempfile.mkdtemp(prefix="cpm-bench-prefix-")
    cfg = write_config(tmp, a.stage_threads, max(1, layers // 2), "on",
                       router_extra="  prefix_cache: %s\n" % mode)
    cl = Cluster(a.build, model, cfg, tmp)
    port = cl.port
    try:
        cl.complete([1, 200, 300], 2)  # warm: page the weights in
        records = [[] for _ in users]
        th = [threading.Thread(target=conversation, args=(port, system, users[c], a.answer, records[c]))
              for c in range(len(users))]
        t0 = time.time()
        for t in th:
            t.start()
        for t in th:
            t.join()
        wall = time.time() - t0
    finally:
        cl.stop()
    return records, wall


def summary(records, wall):
    flat = [r for conv in records for r in conv]
    ttfts = sorted(r["ttft"] for r in flat)
    later = [r["ttft"] for r in flat if r["turn"] > 0]
    gen = sum(len(r["ids"]) for r in flat)
    return {"ttft_p50": statistics.median(ttfts), "ttft_p90": ttfts[int(0.9 * (len(ttfts) - 1))],
            "ttft_later_p50": statistics.median(later) if later else float("nan"),
            "cached": sum(r["cached"] for r in flat), "prompt": sum(r["prompt"] for r in flat),
            "wall": wall, "tok_s": gen / wall}


def main():
    a = parse_args()
    a.build = os.path.abspath(a.build)
    model = ensure_model(a.build, a.model)
    cfg = json.load(open(os.path.join(model, "config.json")))
    vocab, layers = cfg["vocab_size"], cfg["num_hidden_layers"]
    system, users = workload(vocab, a)
    print("multi-turn chat: %d conversations x %d turns, system prompt %d tokens, user messages %d, "
          "answers %d (greedy); model %s" % (a.conversations, a.turns, a.system, a.user, a.answer, model))
    results = {}
    for mode in ("off", "on"):
        records, wall = run_mode(a, model, layers, mode, system, users)
        results[mode] = (records, summary(records, wall))
    off, on = results["off"][0], results["on"][0]
    same = all([r["ids"] for r in x] == [r["ids"] for r in y] for x, y in zip(off, on))
    print("%-14s %10s %10s %16s %18s %9s %10s" % ("prefix cache", "TTFT p50", "TTFT p90",
                                                  "TTFT p50 turn>1", "cached / prompt", "wall s",
                                                  "gen tok/s"))
    for mode in ("off", "on"):
        s = results[mode][1]
        print("%-14s %9.2fs %9.2fs %15.2fs %10d / %-6d %9.1f %10.2f" % (
            mode, s["ttft_p50"], s["ttft_p90"], s["ttft_later_p50"], s["cached"], s["prompt"],
            s["wall"], s["tok_s"]))
    s0, s1 = results["off"][1], results["on"][1]
    print("on / off: TTFT p50 x%.2f, turns after the first x%.2f, throughput x%.2f; same tokens: %s"
          % (s0["ttft_p50"] / s1["ttft_p50"], s0["ttft_later_p50"] / s1["ttft_later_p50"],
             s1["tok_s"] / s0["tok_s"], "yes" if same else "NO"))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
