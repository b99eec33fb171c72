#!/usr/bin/python3
"""core_experts.py - expert parallelism: the MoE experts on their own services.

A real cluster on loopback: router (`tokenize: off`: the golden MoE models have no
tokenizer files), sampler, two pipeline stages that bind no expert weights, and two
cpm-expert services owning experts [0, 4) and [4, 8) of every layer. Checked:

1. Greedy completions through the HTTP API equal `cpm-run` (one process, local experts)
   token for token, for several prompts; /ready waited for the expert services too.
2. 8 concurrent requests give the same tokens as one at a time.
3. An expert service answers bad input with an Error and keeps serving: bytes that are
   no protobuf, a rows frame whose size disagrees with n_rows, an expert outside its
   range, a layer the model lacks, rows of the wrong width; then a good ExpertForward
   gets an ExpertResult and the cluster still gives the same tokens.
4. An expert service frozen then killed with requests in flight: a non-streaming, a
   streaming and an RPC request each end with exactly one final error within a few
   seconds of the kill, not at the stages' 30 s deadline (router.timeout_ms: the stage
   sees the connection drop); /ready turns 503; restarted, the cluster
   gives cpm-run's tokens again; every process exits cleanly on SIGTERM.

usage: core_experts.py BUILD_DIR MODEL_DIR (a MiniCPM-MoE with 8 experts)
"""
import json
import os
import struct
import time

import zmq

from harness import E2E

N_GEN = 24
TIMEOUT_MS = 30000  # router.timeout_ms: also each stage's deadline for expert replies (the default)

h = E2E("cpm-experts-")
MODEL, pb, CTX, procs, fail = h.model, h.pb, h.ctx, h.procs, h.fail


def write_config(ports, cut):
    stages = [{"layers": "[0, %d]" % cut, "endpoint": "st0"},
              {"layers": "[%d, end]" % cut, "endpoint": "st1"}]
    experts = [{"experts": "[0, 4]", "endpoint": "ex0", "threads": 2},
               {"experts": "[4, end]", "endpoint": "ex1"}]
    return h.write_config(h.cluster_lines(ports, stages, experts=experts, router=[
        "micro_batches: 2", "tokenize: off", "timeout_ms: %d" % TIMEOUT_MS]))


def completion_ids(port, ids, n=N_GEN):
    return h.completion_ids(port, ids, n)


# ---------------------------------------------------------------- raw expert requests

def expert_call(endpoint, layer, experts, n_rows, rows, width, nbytes=None, raw=None):
    """One ExpertForward by hand; the reply Envelope and its frames."""
    s = h.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    if raw is not None:
        s.send(raw)
    else:
        env = pb.Envelope(version=pb.PROTOCOL_VERSION_CURRENT, corr=11)
        f = env.expert_forward
        f.layer = layer
        f.expert.extend(experts)
        f.n_rows.extend(n_rows)
        f.rows.dtype = pb.DTYPE_F32
        f.rows.shape.extend([rows, width])
        n = rows * width * 4 if nbytes is None else nbytes
        data = struct.pack("<%df" % (n // 4), *[0.01 * (i % 17) for i in range(n // 4)])
        s.send_multipart([env.SerializeToString(), data])
    if not s.poll(5000):
        fail("3: expert service %s did not answer" % endpoint)
    frames = s.recv_multipart()
    s.close()
    r = pb.Envelope()
    r.ParseFromString(frames[0])
    return r, frames


def check_refused(endpoint, what, code, **kw):
    r, _ = expert_call(endpoint, **kw)
    if r.WhichOneof("body") != "error" or r.error.code != code:
        fail("3: %s: want error %d, got %s" % (what, code, r))
    return r.error.message


# ---------------------------------------------------------------- the scenario

def main():
    cfgj = json.load(open(os.path.join(MODEL, "config.json")))
    if cfgj.get("num_experts") != 8:
        fail("%s: want a MoE model with 8 experts" % MODEL)
    layers, hidden = cfgj["num_hidden_layers"], cfgj["hidden_size"]
    ids = [int(x) for x in open(os.path.join(MODEL, "ids.txt")).read().split()]
    prompts = [ids, ids[:-3], ids[2:], ids[:-6] + ids[:4]]
    refs = [h.cpm_run_ids(p, N_GEN) for p in prompts]

    ports = h.ports("http", "rpc", "results", "tok", "smp", "st0", "st1", "ex0", "ex1")
    cfg = write_config(ports, max(1, layers // 2))
    t0 = time.time()
    h.start_service(cfg, "sampler", 0, "smp")
    h.start_service(cfg, "expert", 0, "ex0")
    h.start_service(cfg, "expert", 1, "ex1")
    h.start_service(cfg, "stage", 0, "st0")
    h.start_service(cfg, "stage", 1, "st1")
    h.start_service(cfg, "router", 0, "router")
    port, rpc_ep = ports["http"], "tcp://127.0.0.1:%d" % ports["rpc"]
    h.wait_ready(port)

    # 1. greedy == cpm-run, one at a time
    h.check_greedy(port, prompts, refs, N_GEN)
    print("ok 1 - 4 prompts through HTTP with experts on 2 expert services == cpm-run token for token "
          "(ready after %.1f s)" % (time.time() - t0))

    # 2. 8 concurrent requests == one at a time
    h.check_concurrent(port, prompts, refs, N_GEN)
    print("ok 2 - 8 concurrent requests == one at a time")

    # 3. bad input to an expert service: an Error each, and it keeps serving
    ex0 = "tcp://127.0.0.1:%d" % ports["ex0"]
    r, _ = expert_call(ex0, 0, [], [], 0, 0, raw=b"\xff\xfe not a protobuf")
    if r.WhichOneof("body") != "error" or r.error.code != -4:
        fail("3: garbage bytes: %s" % r)
    check_refused(ex0, "frame size vs n_rows", -8, layer=0, experts=[1, 2], n_rows=[2, 1], rows=3,
                  width=hidden, nbytes=2 * hidden * 4)
    check_refused(ex0, "shape vs n_rows", -8, layer=0, experts=[1, 2], n_rows=[2, 1], rows=4, width=hidden)
    msg = check_refused(ex0, "expert out of range", -7, layer=0, experts=[1, 6], n_rows=[2, 1], rows=3,
                        width=hidden)
    if "outside this service's [0, 4)" not in msg:
        fail("3: expert out of range: message %r" % msg)
    check_refused(ex0, "layer out of range", -7, layer=layers, experts=[1], n_rows=[2], rows=2, width=hidden)
    check_refused(ex0, "wrong width", -8, layer=0, experts=[1], n_rows=[2], rows=2, width=hidden + 1)
    r, frames = expert_call(ex0, layer=layers - 1, experts=[0, 3], n_rows=[2, 1], rows=3, width=hidden)
    if r.WhichOneof("body") != "expert_result" or list(r.expert_result.expert) != [0, 3] \
            or len(frames) != 2 or len(frames[1]) != 3 * hidden * 4:
        fail("3: a good request after the bad ones: %s (%d frames)" % (r, len(frames)))
    st, got = completion_ids(port, prompts[0])
    if st != 200 or got != refs[0]:
        fail("3: after the bad requests: %s %s" % (st, got))
    print("ok 3 - bad frames / bad ExpertForwards got Error replies; the service and the cluster serve on")

    # 4. an expert service dies with requests in flight
    why, took = h.kill_in_flight("ex1", port, rpc_ep, ids, "4", "experts-1", rpc_stream=True)
    if took > 5:  # the stage sees the connection drop; the 30 s deadline is not what ends them
        fail("4: the requests ended %.1f s after the kill (router.timeout_ms %d)" % (took, TIMEOUT_MS))
    print("ok 4 - expert service killed mid-request: non-streaming, streaming and RPC requests each got "
          "one final error (%.1f s after the kill): %r" % (took, why))
    h.wait_ready(port, want=503, limit=10)
    h.start_service(cfg, "expert", 1, "ex1")
    h.wait_ready(port)
    h.check_greedy(port, prompts, refs, N_GEN, "4: after the restart")
    h.stop_cleanly()
    print("ok 5 - /ready 503 while it was down; restarted, cpm-run's tokens again; clean exits on SIGTERM "
          "(%.1f s in all)" % (time.time() - t0))


h.run(main)
