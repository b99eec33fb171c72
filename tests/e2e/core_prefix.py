#!/usr/bin/python3
"""core_prefix.py - prefix caching across requests, exact, under `cpm-cluster up`.

Three clusters on one model, one after another: B (one stage, router.prefix_cache off)
answers every prompt first: the reference. A (two replicas of two stages, prefix cache
on) and C (one replica of two stages whose KV caches hold 128 tokens: eviction
pressure) must give exactly B's tokens. Checked:

1. A: a prompt sent twice: the second reuses every full block but the one holding its last
   token (usage.prompt_tokens_details.cached_tokens); a prompt sharing a prefix reuses the
   shared full blocks; greedy and seeded sampling give B's tokens either way;
2. A: 8 concurrent requests with shared prefixes give B's tokens;
3. A: cache-aware routing: with the replica that holds a prefix busier than the other, a
   prompt starting with that prefix still goes to it (its answer reports cached tokens);
   /metrics counts queries and hits;
4. C: prompt families in turn, so the stages evict cached blocks (and the router, whose
   directory is an estimate, meets stale prefixes: the stage refuses, the request starts
   over): every answer is B's; then concurrently; the stages hold no sequence afterwards.

usage: core_prefix.py BUILD_DIR MODEL_DIR [KV_DTYPE (f32)]
"""
import json
import os
import sys
import threading
import time

from harness import E2E

h = E2E("cpm-prefix-")
MODEL, fail = h.model, h.fail
KV_DTYPE = sys.argv[3] if len(sys.argv) > 3 else "f32"
N_GEN = 8
SAMPLED = {"temperature": 0.8, "top_p": 0.9, "seed": 11}


def start(name, replicas, per_replica, prefix, kv_tokens=None):
    """A cluster under cpm-cluster up: (launcher, HTTP port, stage endpoints)."""
    layers = json.load(open(os.path.join(MODEL, "config.json")))["num_hidden_layers"]
    names = ["%s%ds%d" % (name, r, s) for r in range(replicas) for s in range(per_replica)]
    ports = h.ports("http", "rpc", "results", "tok", "smp", *names)
    stages, cut = [], max(1, layers // 2)
    for i, nm in enumerate(names):
        s = i % per_replica
        rng = "[0, end]" if per_replica == 1 else "[0, %d]" % cut if s == 0 else "[%d, end]" % cut
        item = {"layers": rng, "endpoint": nm, "pipeline": i // per_replica, "kv_dtype": KV_DTYPE}
        if kv_tokens:
            item["kv_tokens"] = kv_tokens
        stages.append(item)
    tokenizer = os.path.exists(os.path.join(MODEL, "tokenizer.json"))
    router = ["prefix_cache: " + ("on" if prefix else "off"), "micro_batches: 2"]
    if not tokenizer:
        router.append("tokenize: off")
    cfg = h.write_config(h.cluster_lines(ports, stages, router=router, tokenizer=tokenizer),
                         name + ".yaml")
    launcher, port = h.up(cfg, ports["http"], log_name=name + ".log")
    return launcher, port, ["tcp://127.0.0.1:%d" % ports[n] for n in names]


def stop(launcher):
    launcher.terminate()
    if launcher.wait(30) != 0:
        fail("launcher exit %s" % launcher.returncode)
    h.procs.clear()


def ask(port, ids, extra=None, n=N_GEN):
    """(generated ids, cached prompt tokens) of one completion."""
    body = dict({"prompt": ids, "max_tokens": n, "temperature": 0, "ignore_eos": True,
                 "return_token_ids": True}, **(extra or {}))
    st, a = h.http_json(port, "/v1/completions", body)
    if st != 200:
        fail("completion: %s %s" % (st, a))
    return a["choices"][0]["token_ids"], a["usage"]["prompt_tokens_details"]["cached_tokens"]


def concurrently(port, P, ref, k, what):
    """k requests at once, the prompts in turn: each must give its reference tokens.
    Returns [(prompt key, (ids, cached))]."""
    keys, results = sorted(P), [None] * k

    def one(i):
        key = keys[i % len(keys)]
        results[i] = (key, ask(port, P[key]))
    th = [threading.Thread(target=one, args=(i,)) for i in range(k)]
    for t in th:
        t.start()
    for t in th:
        t.join(120)
    for r in results:
        if r is None or r[1][0] != ref[r[0]]:
            fail("%s: %s" % (what, r))
    return results


def prompts():
    ids = [int(x) for x in open(os.path.join(MODEL, "ids.txt")).read().split()]
    vocab = json.load(open(os.path.join(MODEL, "config.json")))["vocab_size"]
    base = (ids * 4)[:70]
    other = [(t * 7 + 3) % vocab for t in reversed(base)]
    third = [(t * 5 + 1) % vocab for t in base]
    return {"a": base + [5, 6, 7], "b": base[:50] + [9] * 10, "c": base, "d": other[:66],
            "e": third[:40] + base[:30]}


def main():
    P = prompts()

    # the reference: no prefix cache, one stage
    launcher, port, _ = start("b", 1, 1, prefix=False)
    ref = {k: ask(port, P[k])[0] for k in sorted(P)}
    ref_sampled = ask(port, P["a"], SAMPLED)[0]
    ref_long = ask(port, P["c"], n=24)[0]
    stop(launcher)
    if KV_DTYPE == "f32":  # one process agrees too (f16 KV moves the logits a little)
        want = h.cpm_run_ids(P["a"], N_GEN)
        if ref["a"] != want:
            fail("reference cluster %s != cpm-run %s" % (ref["a"], want))

    # 1. two replicas of two stages, prefix cache on
    launcher, port, _ = start("a", 2, 2, prefix=True)
    seen = {}
    for k, want_cached in (("a", 0), ("a", 64), ("b", 48), ("c", 64), ("d", 0), ("d", 64)):
        got, cached = ask(port, P[k])
        seen[k] = cached
        if got != ref[k] or cached != want_cached:
            fail("prompt %s: %s cached %d, want %s cached %d" % (k, got, cached, ref[k], want_cached))
    got, cached = ask(port, P["a"], SAMPLED)
    if got != ref_sampled or cached != 64:
        fail("sampled: %s cached %d, want %s (cached 64)" % (got, cached, ref_sampled))
    print("ok 1 - a repeated prompt reuses 64 of its 73 tokens, a shared 50-token prefix 48; greedy "
          "and seeded answers equal the uncached cluster's")

    # 2. concurrent requests sharing prefixes
    results = concurrently(port, P, ref, 8, "concurrent")
    print("ok 2 - 8 concurrent requests with shared prefixes: the uncached cluster's tokens "
          "(cached tokens %s)" % sorted(r[1][1] for r in results))

    # 3. the replica holding e's prefix is busy with a long answer; e still goes there
    ask(port, P["e"])  # e's blocks now live on the replica that took it (both were idle)
    busy = {}
    t = threading.Thread(target=lambda: busy.update(r=ask(port, P["e"], n=400)))
    t.start()
    time.sleep(0.3)
    got, cached = ask(port, P["e"][:64] + [3, 4, 5])
    t.join(120)
    if cached != 64 or busy.get("r", ([], 0))[1] != 64:
        fail("routing: the prefix's replica was passed over (cached %d; the long one %s)"
             % (cached, busy.get("r", (None, None))[1]))
    queries, hits = h.metric(port, "cpm_prefix_cache_queries_total"), h.metric(port, "cpm_prefix_cache_hits_total")
    if not 0 < hits <= queries:
        fail("metrics: %s hits of %s" % (hits, queries))
    print("ok 3 - a prompt follows its cached prefix to the busier replica (64 tokens reused); "
          "/metrics: %d of %d prompt tokens from the cache" % (hits, queries))
    stop(launcher)

    # 4. eviction pressure: 128 KV tokens per stage, one sequence at a time
    launcher, port, stages = start("c", 1, 2, prefix=True, kv_tokens=128)
    order = ["a", "d", "a", "b", "e", "c", "a", "d", "b", "c", "e", "a"]
    cached = []
    for k in order:
        got, c = ask(port, P[k])
        cached.append(c)
        if got != ref[k]:
            fail("under eviction, prompt %s: %s want %s" % (k, got, ref[k]))
    got, _ = ask(port, P["c"], n=24)
    if got != ref_long:
        fail("under eviction, a longer answer: %s want %s" % (got, ref_long))
    concurrently(port, P, ref, 6, "concurrent under eviction")
    misses = h.metric(port, "cpm_prefix_cache_misses_total")
    h.stages_clean(stages)
    print("ok 4 - 128-token KV caches: %d prompts in turn and 6 at once, every answer the uncached "
          "cluster's (cached tokens %s, %d stale prefixes started over); stages clean"
          % (len(order), cached, misses))
    stop(launcher)


h.run(main)
