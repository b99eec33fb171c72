#!/usr/bin/python3
"""core_failover.py - two replicas of the pipeline; a stage of one dies mid-generation.

The router holds every stream's whole token history, so when a replica loses a stage
its sequences move to the other replica, which prefills prompt + generated tokens
again and carries on: the clients see nothing but a pause (docs/ARCHITECTURE.md,
"Failover"). Checked here, with real processes on loopback:

1. With both replicas up, concurrent greedy requests spread over both and each equals
   `cpm-run` token for token.
2. Two streaming requests (internal RPC, HTTP SSE) are generating; one stage of replica 0
   is killed. Both complete with exactly the tokens/text of an uninterrupted run, none
   lost or repeated; /metrics counts the failover; /ready stays 200 (replica 1 serves).
3. New requests keep working on the surviving replica; the restarted stage brings
   replica 0 back and it serves again.
4. A stage stopped with SIGTERM (a rolling update) drains: its health says "draining",
   the router moves its replica's sequences at once, it exits 0, no stream notices.

usage: core_failover.py BUILD_DIR MODEL_DIR (a model with tokenizer files)
"""
import json
import os
import re
import threading
import time

from harness import E2E, RpcStream, SseStream, metric_value

N_GEN = 160  # long enough that the kill lands mid-generation
STAGES = ["p0s0", "p0s1", "p1s0", "p1s1"]  # config order: replica 0's two stages, then replica 1's

h = E2E("cpm-failover-")
MODEL, procs, fail, tmp = h.model, h.procs, h.fail, h.tmp
req, ready, wait_ready = h.req, h.ready, h.wait_ready


def write_config(ports, cut):
    stages = [{"layers": "[0, %d]" % cut if i % 2 == 0 else "[%d, end]" % cut, "endpoint": name,
               "pipeline": i // 2} for i, name in enumerate(STAGES)]
    return h.write_config(h.cluster_lines(ports, stages, router=["micro_batches: 2"]))


def start(cfg, role, index, label):
    h.start_service(cfg, role, index, label)


def failovers(port):
    text = req(port, "GET", "/metrics")[1]
    return int(metric_value(text, "cpm_failovers_total")) if "cpm_failovers_total{" in text else None


def completion(port, ids, stream=False):
    body = {"prompt": ids, "max_tokens": N_GEN, "temperature": 0, "ignore_eos": True, "stream": stream}
    return req(port, "POST", "/v1/completions", body)


# ---------------------------------------------------------------- the scenario

def main():
    layers = json.load(open(os.path.join(MODEL, "config.json")))["num_hidden_layers"]
    ids = [int(x) for x in open(os.path.join(MODEL, "ids.txt")).read().split()]
    cut = max(1, layers // 2)
    prompts = [ids, ids[:-3], ids[2:], ids[:-6] + ids[:4]]
    refs = [h.cpm_run_ids(p, N_GEN) for p in prompts]

    ports = h.ports("http", "rpc", "results", "tok", "smp", *STAGES)
    cfg = write_config(ports, cut)
    start(cfg, "tokenizer", 0, "tok")
    start(cfg, "sampler", 0, "smp")
    for i, name in enumerate(STAGES):
        start(cfg, "stage", i, name)
    start(cfg, "router", 0, "router")
    port, rpc_ep = ports["http"], "tcp://127.0.0.1:%d" % ports["rpc"]
    wait_ready(port)

    # 1. both replicas serve; every answer equals cpm-run
    results = [None] * len(prompts)

    def one(i):
        st, text = completion(port, prompts[i])
        results[i] = (st, text)
    th = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in th:
        t.start()
    for t in th:
        t.join(60)
    texts = []
    for i, (st, text) in enumerate(results):
        if st != 200:
            fail("1: prompt %d: %s %s" % (i, st, text[:300]))
        texts.append(json.loads(text)["choices"][0]["text"])
    rpc = RpcStream(h, rpc_ep, prompts[0], N_GEN, "failover-rpc")
    rpc.start()
    rpc.join(60)
    if rpc.ids != refs[0]:
        fail("1: rpc ids %s\n want (cpm-run) %s" % (rpc.ids, refs[0]))
    print("ok 1 - two replicas: 4 concurrent completions and an RPC stream, greedy == cpm-run")

    # 2. kill a stage of replica 0 while two streams generate
    a, b = RpcStream(h, rpc_ep, prompts[0], N_GEN, "failover-rpc"), SseStream(port, prompts[0], N_GEN)
    a.start()
    b.start()
    t0 = time.time()
    while (len(a.ids) < 8 or len(b.pieces) < 8) and time.time() - t0 < 30:
        time.sleep(0.005)
    if len(a.ids) >= N_GEN or len(b.pieces) >= N_GEN:
        fail("2: the streams finished before the kill; raise N_GEN")
    procs["p0s1"].kill()
    procs["p0s1"].wait()
    t_kill = time.time()
    a.join(60)
    b.join(60)
    if a.is_alive() or b.is_alive():
        fail("2: a stream still runs 60 s after the kill")
    if a.ids != refs[0] or a.final is None or a.final.token_event.HasField("error") or a.extra:
        fail("2: rpc stream after failover: %d ids (want %d), final %s, %d events after it\n got %s\n want %s"
             % (len(a.ids), len(refs[0]), a.final, a.extra, a.ids, refs[0]))
    if b.status != 200 or b.blocks[-1] != "data: [DONE]" or "".join(b.pieces) != texts[0] \
            or any('"error"' in blk for blk in b.blocks):
        fail("2: SSE stream after failover: status %s, text %r\n want %r\n last blocks %r"
             % (b.status, "".join(b.pieces), texts[0], b.blocks[-3:]))
    n = failovers(port)
    if not n:
        fail("2: cpm_failovers_total is %s: no sequence moved (both on replica 1?)" % n)
    if ready(port) != 200:
        fail("2: /ready %s with replica 1 healthy" % ready(port))
    print("ok 2 - stage of replica 0 killed mid-generation: RPC and SSE streams completed with the "
          "uninterrupted tokens/text (%d sequence(s) moved, done %.1f s after the kill), /ready 200"
          % (n, time.time() - t_kill))

    # 3. the survivor serves new requests; the restarted stage brings replica 0 back
    st, text = completion(port, prompts[1])
    if st != 200 or json.loads(text)["choices"][0]["text"] != texts[1]:
        fail("3: after the kill: %s %s" % (st, text[:300]))
    start(cfg, "stage", 1, "p0s1")
    t0 = time.time()
    while "replica 0 answers again" not in open(os.path.join(tmp, "router.log")).read():
        if time.time() - t0 > 20:
            fail("3: the router did not take replica 0 back")
        time.sleep(0.1)
    # replica 1 now loses a stage too: everything must run on the restarted replica 0
    procs["p1s1"].kill()
    procs["p1s1"].wait()
    th = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in th:
        t.start()
    for t in th:
        t.join(60)
    for i, (st, text) in enumerate(results):
        if st != 200 or json.loads(text)["choices"][0]["text"] != texts[i]:
            fail("3: prompt %d on the restarted replica 0: %s %s" % (i, st, text[:300]))
    del procs["p1s1"]
    print("ok 3 - the survivor served on; the restarted stage brought replica 0 back, and with replica 1 "
          "then losing a stage too, replica 0 alone gave the same answers as the first run")
    drain_a_stage(cfg, port, rpc_ep, prompts, refs, texts)
    h.stop_cleanly()


def drain_a_stage(cfg, port, rpc_ep, prompts, refs, texts):
    """4. A stage stopped with SIGTERM (a rolling update) drains: its health says so, the
    router moves its replica's sequences at once, it exits 0, and no stream notices."""
    start(cfg, "stage", 3, "p1s1")
    t0 = time.time()
    while open(os.path.join(tmp, "router.log")).read().count("replica 1 answers again") < 1:
        if time.time() - t0 > 20:
            fail("4: replica 1 did not come back")
        time.sleep(0.1)
    before = failovers(port)
    ss = [RpcStream(h, rpc_ep, prompts[0], N_GEN, "drain-a"), RpcStream(h, rpc_ep, prompts[0], N_GEN, "drain-b"),
          SseStream(port, prompts[0], N_GEN), SseStream(port, prompts[0], N_GEN)]
    for s in ss:
        s.start()
    t0 = time.time()
    while min(len(s.ids) if isinstance(s, RpcStream) else len(s.pieces) for s in ss) < 8 \
            and time.time() - t0 < 30:
        time.sleep(0.005)
    procs["p0s1"].terminate()
    rc = procs["p0s1"].wait(20)
    for s in ss:
        s.join(60)
        if isinstance(s, RpcStream) and (s.ids != refs[0] or s.final.token_event.HasField("error")):
            fail("4: rpc stream across the drain: %s" % s.ids)
        if isinstance(s, SseStream) and ("".join(s.pieces) != texts[0] or s.blocks[-1] != "data: [DONE]"):
            fail("4: SSE stream across the drain: %r" % "".join(s.pieces))
    log = open(os.path.join(tmp, "router.log")).read()
    if rc != 0 or "stage1 is stopping (draining)" not in log or failovers(port) <= before:
        fail("4: stage exit %s, draining seen %s, failovers %s -> %s" %
             (rc, "is stopping (draining)" in log, before, failovers(port)))
    del procs["p0s1"]
    print("ok 4 - a stage SIGTERMed mid-stream drained (health 'draining', the router moved %d "
          "sequence(s) at once), exited 0; all 4 streams == the uninterrupted run"
          % (failovers(port) - before))


h.run(main)
