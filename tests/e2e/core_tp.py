#!/usr/bin/python3
"""core_tp.py - tensor parallelism inside a pipeline stage, over ZeroMQ.

A real cluster on loopback: router (`tokenize: off`), sampler, and two pipeline stages,
each running as two tensor-parallel ranks (cpm-shard --index N and --index N --tp-rank 1:
half the heads and half the FFN each, two all-reduces per layer over their mesh
endpoints; stage 0's ranks get token ids, stage 1's the activation frame, and only stage
1's rank 0 runs lm_head). Checked:

1. Greedy completions through the HTTP API equal `cpm-run` (one process) token for
   token, for several prompts (TP sums o_proj/down in two halves, so logits differ in
   the last bits; the golden model's greedy margins are far larger).
2. 8 concurrent requests give the same tokens as one at a time.
3. Stage 0's TP rank answers bad input with an Error and keeps serving: bytes that are no
   protobuf, a StageForward sent to it directly (only its rank 0 may hand it work);
   garbage and a stray TpPartial on its mesh endpoint are dropped; then the cluster still
   gives cpm-run's tokens.
4. Stage 0's TP rank frozen then killed with requests in flight: a non-streaming, a streaming
   and an RPC request each end with exactly one final error (no hang: rank 0's all-reduce
   deadline is router.timeout_ms, and the router polls the rank's health); /ready turns
   503; restarted, the cluster gives cpm-run's tokens again; every process exits cleanly
   on SIGTERM.

usage: core_tp.py BUILD_DIR MODEL_DIR (key/value heads divisible by 2)
"""
import json
import os
import struct
import time

import zmq

from harness import E2E, ep

N_GEN = 24
TIMEOUT_MS = 30000  # router.timeout_ms: also each all-reduce's deadline (the default)

h = E2E("cpm-tp-")
MODEL, pb, CTX, procs, fail = h.model, h.pb, h.ctx, h.procs, h.fail


def write_config(ports, cut):
    def tp(rank, mesh):
        return "\n      - endpoint: %s\n        mesh: %s" % (ep(ports[rank]), ep(ports[mesh]))
    stages = [{"layers": "[0, %d]" % cut, "endpoint": "st0", "tp_mesh": ep(ports["mesh0"]),
               "tp": tp("tp1", "mesh1")},
              {"layers": "[%d, end]" % cut, "endpoint": "st1", "tp_mesh": ep(ports["mesh2"]),
               "tp": tp("tp1b", "mesh3")}]
    return h.write_config(h.cluster_lines(ports, stages, router=[
        "micro_batches: 2", "tokenize: off", "timeout_ms: %d" % TIMEOUT_MS]))


def start(cfg, role, index, label, tp_rank=0):
    h.start_service(cfg, role, index, label, ["--tp-rank", str(tp_rank)] if tp_rank else [])


def completion_ids(port, ids, n=N_GEN):
    return h.completion_ids(port, ids, n)


# ---------------------------------------------------------------- raw requests to the TP rank

def call(endpoint, frames, wait_ms=5000):
    """Sends frames on a fresh DEALER; the reply Envelope, or None when none comes."""
    return h.rpc(endpoint, frames[0], frames[1:], wait_ms)[0]


def push(endpoint, frames):
    s = h.socket(zmq.PUSH)
    s.setsockopt(zmq.LINGER, 1000)
    s.connect(endpoint)
    s.send_multipart(frames)
    s.close()


# ---------------------------------------------------------------- the scenario

def main():
    cfgj = json.load(open(os.path.join(MODEL, "config.json")))
    kv = cfgj.get("num_key_value_heads", cfgj["num_attention_heads"])
    if kv % 2:
        fail("%s: %d key/value heads do not split over 2 ranks" % (MODEL, kv))
    layers, hidden = cfgj["num_hidden_layers"], cfgj["hidden_size"]
    ids = [int(x) for x in open(os.path.join(MODEL, "ids.txt")).read().split()]
    prompts = [ids, ids[:-3], ids[2:], ids[:-6] + ids[:4]]
    refs = [h.cpm_run_ids(p, N_GEN) for p in prompts]

    ports = h.ports(*["http", "rpc", "results", "tok", "smp", "st0", "st1", "tp1",
                                      "mesh0", "mesh1", "tp1b", "mesh2", "mesh3"])
    cfg = write_config(ports, max(1, layers // 2))
    t0 = time.time()
    start(cfg, "sampler", 0, "smp")
    start(cfg, "stage", 0, "st0")
    start(cfg, "stage", 0, "tp1", tp_rank=1)
    start(cfg, "stage", 1, "st1")
    start(cfg, "stage", 1, "tp1b", tp_rank=1)
    start(cfg, "router", 0, "router")
    port, rpc_ep = ports["http"], ep(ports["rpc"])
    h.wait_ready(port)

    # 1. greedy == cpm-run, one at a time
    h.check_greedy(port, prompts, refs, N_GEN)
    print("ok 1 - 4 prompts through HTTP with both stages on 2 tensor-parallel ranks each == cpm-run "
          "token for token (ready after %.1f s)" % (time.time() - t0))

    # 2. 8 concurrent requests == one at a time
    h.check_concurrent(port, prompts, refs, N_GEN)
    print("ok 2 - 8 concurrent requests == one at a time")

    # 3. bad input to the TP rank: an Error each on its endpoint, dropped on its mesh
    tp1 = ep(ports["tp1"])
    r = call(tp1, [b"\xff\xfe not a protobuf"])
    if r is None or r.WhichOneof("body") != "error" or r.error.code != -4:
        fail("3: garbage bytes: %s" % r)
    env = pb.Envelope(version=pb.PROTOCOL_VERSION_CURRENT, corr=5)
    env.forward.step = 1
    env.forward.seq.append(77)
    env.forward.pos.append(0)
    env.forward.ids.append(1)
    r = call(tp1, [env.SerializeToString()])
    if r is None or r.WhichOneof("body") != "error" or r.error.code != -6 \
            or "tp_forward" not in r.error.message:
        fail("3: a StageForward straight to the TP rank: %s" % r)
    env = pb.Envelope(version=pb.PROTOCOL_VERSION_CURRENT, corr=6)
    env.tp_forward.seq = 1
    env.tp_forward.forward.step = 1
    env.tp_forward.forward.seq.append(78)
    env.tp_forward.forward.pos.append(0)
    r = call(tp1, [env.SerializeToString()])  # ids missing for its rows: refused by validation
    if r is None or r.WhichOneof("body") != "error" or r.error.code != -4:
        fail("3: a malformed TpForward: %s" % r)
    push(ep(ports["mesh1"]), [b"garbage on the mesh"])
    part = pb.Envelope(version=pb.PROTOCOL_VERSION_CURRENT)
    part.tp_partial.seq, part.tp_partial.op, part.tp_partial.rank = 0, 0, 0
    part.tp_partial.partial.dtype = pb.DTYPE_F32
    part.tp_partial.partial.shape.extend([1, hidden])
    push(ep(ports["mesh1"]), [part.SerializeToString(), struct.pack("<%df" % hidden, *[1.0] * hidden)])
    r = call(tp1, [pb.Envelope(version=pb.PROTOCOL_VERSION_CURRENT, corr=7,
                               health_request=pb.HealthRequest()).SerializeToString()])
    if r is None or not r.health.ready:
        fail("3: health after the bad messages: %s" % r)
    for i, p in enumerate(prompts[:2]):
        st, got = completion_ids(port, p)
        if st != 200 or got != refs[i]:
            fail("3: after the bad messages, prompt %d: %s %s" % (i, st, got))
    print("ok 3 - bad frames / a StageForward to the TP rank got Error replies; mesh garbage "
          "dropped; the cluster serves on")

    # 4. the TP rank dies with requests in flight
    why, took = h.kill_in_flight("tp1", port, rpc_ep, ids, "4", "tp-1", rpc_stream=True)
    if took > 5:  # rank 0 sees the connection drop; the 30 s deadline is not what ends them
        fail("4: the requests ended %.1f s after the kill (router.timeout_ms %d)" % (took, TIMEOUT_MS))
    print("ok 4 - TP rank killed mid-request: non-streaming, streaming and RPC requests each got "
          "one final error (%.1f s after the kill): %r" % (took, why))
    h.wait_ready(port, want=503, limit=10)
    start(cfg, "stage", 0, "tp1", tp_rank=1)
    h.wait_ready(port)
    h.check_greedy(port, prompts, refs, N_GEN, "4: after the restart")
    h.stop_cleanly()
    print("ok 5 - /ready 503 while it was down; restarted, cpm-run's tokens again; clean exits on SIGTERM "
          "(%.1f s in all)" % (time.time() - t0))


h.run(main)
