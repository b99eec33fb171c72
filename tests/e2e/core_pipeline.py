#!/usr/bin/python3
"""core_pipeline.py - the back end of the cluster, driven from Python over the wire.

Starts real cpm-shard (2+ stages) and cpm-sampler processes on loopback and plays the
router with python3-zmq and python3-protobuf, using messages generated from proto/cpm.proto.
Checks: greedy decoding through the pipeline equals the reference continuation
(ref_greedy.txt) token for token; several sequences interleaved in micro-batches, with
several micro-batches in flight, give the same tokens as one at a time; bad frames on
every socket get an error (or are dropped) and the services keep serving; a stage
reports its failure as a StageResult the router receives.

usage: core_pipeline.py BUILD_DIR MODEL_DIR [N_STAGES]

Multi-host mode (core_netns.sh sets it up): CPM_E2E_NETNS="ns0 ns1" runs stage i inside
network namespace i with address CPM_E2E_ADDRS[i], and the router side (this script)
binds its results endpoint on CPM_E2E_ROUTER_ADDR.
"""
import os
import subprocess
import sys
import time

import zmq

from harness import E2E, free_port

N_STAGES = int(sys.argv[3]) if len(sys.argv) > 3 else 2
NETNS = os.environ.get("CPM_E2E_NETNS", "").split()
ADDRS = os.environ.get("CPM_E2E_ADDRS", "").split()
ROUTER_ADDR = os.environ.get("CPM_E2E_ROUTER_ADDR", "127.0.0.1")

e2e = E2E("cpm-e2e-")
BUILD, MODEL, pb, CTX, fail = e2e.build, e2e.model, e2e.pb, e2e.ctx, e2e.fail
VERSION = pb.PROTOCOL_VERSION_CURRENT


def n_layers():
    import json
    with open(os.path.join(MODEL, "config.json")) as f:
        return json.load(f)["num_hidden_layers"]


def start(args):
    return e2e.start("proc%d" % len(e2e.procs), args, stdout=subprocess.DEVNULL)


def rpc(endpoint, env, frames=(), timeout_ms=5000):
    env.version = VERSION
    env.corr = 77
    out, parts = e2e.rpc(endpoint, env, frames, timeout_ms)
    if out is None:
        return None
    assert out.corr == 77, out
    return out, parts[1:]


def health(endpoint, timeout_ms=500):
    return e2e.health(endpoint, timeout_ms)


class Router:
    """The part of the router that drives the ring: forward to stage 0, results back."""

    def __init__(self, stage0, results):
        self.results = e2e.socket(zmq.ROUTER, server=True)
        self.results.bind(results)
        self.to_stage0 = e2e.socket(zmq.DEALER)
        self.to_stage0.connect(stage0)
        self.step = 0

    def send(self, rows, release=()):
        """rows: list of (seq, pos, id, want). Returns the step id."""
        self.step += 1
        env = pb.Envelope(version=VERSION)
        f = env.forward
        f.step = self.step
        for seq, pos, tok, want in rows:
            f.seq.append(seq)
            f.pos.append(pos)
            f.ids.append(tok)
            f.want.append(want)
        f.release.extend(release)
        self.to_stage0.send(env.SerializeToString())
        return self.step

    def recv(self, timeout_ms=20000):
        if not self.results.poll(timeout_ms):
            fail("no result within %d ms" % timeout_ms)
        parts = self.results.recv_multipart()
        env = pb.Envelope()
        env.ParseFromString(parts[1])
        assert env.WhichOneof("body") == "result", env
        return env.result, (parts[2] if len(parts) > 2 else None)


def sample(endpoint, logits_frame, n_rows, vocab, steps, temperature=0.0, seed=0):
    env = pb.Envelope()
    for i in range(n_rows):
        row = env.sample.rows.add()
        row.params.temperature = temperature
        row.params.seed = seed
        row.params.n_logprobs = 2
        row.step = steps[i]
    env.sample.logits.dtype = pb.DTYPE_F32
    env.sample.logits.shape.extend([n_rows, vocab])
    r = rpc(endpoint, env, [logits_frame])
    if r is None:
        fail("sampler did not answer")
    if r[0].WhichOneof("body") != "sampled":
        fail("sampler: %s" % r[0])
    return [t.id for t in r[0].sampled.tokens]


def generate(router, sampler, vocab, prompts, n_new, inflight):
    """Greedy-decodes several prompts at once: prefill each, then one decode row per
    sequence per step, micro-batches split so `inflight` of them travel together."""
    out = {s: [] for s in prompts}
    pos = {s: 0 for s in prompts}
    nxt = {}
    # Prefill: one micro-batch per sequence, all in flight at once.
    pending = {}
    for s, ids in prompts.items():
        rows = [(s, i, t, i == len(ids) - 1) for i, t in enumerate(ids)]
        pending[router.send(rows)] = [s]
        pos[s] = len(ids)
    while len(out[next(iter(prompts))]) < n_new:
        while pending:
            res, frame = router.recv()
            if res.HasField("error"):
                fail("pipeline error: %s" % res.error)
            seqs = pending.pop(res.step)
            assert list(res.seq) == seqs, (res.seq, seqs)
            toks = sample(sampler, frame, len(seqs), vocab, [len(out[s]) for s in seqs])
            for s, t in zip(seqs, toks):
                out[s].append(t)
                nxt[s] = t
        if len(out[next(iter(prompts))]) >= n_new:
            break
        seqs = sorted(prompts)
        groups = [seqs[i::inflight] for i in range(inflight)]
        for g in groups:
            if not g:
                continue
            rows = [(s, pos[s], nxt[s], True) for s in g]
            for s in g:
                pos[s] += 1
            pending[router.send(rows)] = g
    router.send([], release=list(prompts))
    res, _ = router.recv()
    assert not res.HasField("error") and len(res.seq) == 0, res
    return out


def main():
    layers = n_layers()
    n_st = min(N_STAGES, layers)
    cuts = [layers * i // n_st for i in range(n_st + 1)]
    if NETNS:
        n_st = len(NETNS)
        cuts = [layers * i // n_st for i in range(n_st + 1)]
        stage_ep = ["tcp://%s:5580" % a for a in ADDRS]
    else:
        stage_ep = ["tcp://127.0.0.1:%d" % free_port() for _ in range(n_st)]
    results_ep = "tcp://%s:%d" % (ROUTER_ADDR, free_port())
    sampler_ep = "tcp://127.0.0.1:%d" % free_port()
    router = Router(stage_ep[0], results_ep)
    start([os.path.join(BUILD, "services/sampler/cpm-sampler"), "--bind", sampler_ep, "--threads", "2",
           "--keys", e2e.keys])
    for i in range(n_st):
        nxt = stage_ep[i + 1] if i + 1 < n_st else results_ep
        prefix = ["ip", "netns", "exec", NETNS[i]] if NETNS else []
        start(prefix + [os.path.join(BUILD, "shard/cpm-shard"), "--bind", stage_ep[i], "--next", nxt,
               "--model", MODEL, "--layers", "%d:%d" % (cuts[i], cuts[i + 1]), "--name", "stage%d" % i,
               "--max-seqs", "32", "--kv-tokens", "4096", "--keys", e2e.keys])
    deadline = time.time() + 30
    for ep in stage_ep + [sampler_ep]:
        while True:
            h = health(ep)
            if h is not None and h.ready:
                break
            if time.time() > deadline:
                fail("%s not ready: %s" % (ep, h))
            time.sleep(0.05)
    h = health(stage_ep[-1])
    vocab = h.model.vocab_size
    print("stages ready: %s, vocab %d, layers %s" % (n_st, vocab, cuts))

    ids = [int(x) for x in open(os.path.join(MODEL, "ids.txt")).read().split()]
    ref = [int(x) for x in open(os.path.join(MODEL, "ref_greedy.txt")).read().split()]

    # 1. One sequence, greedy, equals the reference.
    got = generate(router, sampler_ep, vocab, {1: ids}, len(ref), 1)[1]
    if got != ref:
        fail("greedy through the pipeline:\n got %s\nwant %s" % (got, ref))
    print("ok 1 - greedy %d tokens through %d stages equal ref_greedy.txt" % (len(ref), n_st))

    # 2. Eight sequences (different prompts), two micro-batches in flight, vs one at a time.
    prompts = {100 + k: ids[: 8 + k] for k in range(8)}
    together = generate(router, sampler_ep, vocab, prompts, 8, 2)
    for s, p in prompts.items():
        alone = generate(router, sampler_ep, vocab, {s: p}, 8, 1)[s]
        if alone != together[s]:
            fail("seq %d: batched %s != alone %s" % (s, together[s], alone))
    print("ok 2 - 8 sequences in 2 micro-batches in flight equal one at a time")

    # 3. Bad input on every socket; the services keep serving.
    for ep in stage_ep + [sampler_ep]:
        s = e2e.socket(zmq.DEALER)
        s.connect(ep)
        s.send(b"\xff\xfe garbage")
        if not s.poll(3000):
            fail("%s: no error reply to garbage" % ep)
        env = pb.Envelope()
        env.ParseFromString(s.recv_multipart()[0])
        if env.WhichOneof("body") != "error" or "unpack" not in env.error.message:
            fail("%s: %s" % (ep, env))
        s.close()
    # A forward whose activation frame has the wrong size goes to stage 1 directly.
    if n_st > 1:
        env = pb.Envelope(version=VERSION)
        env.forward.step = 999
        env.forward.seq.append(5)
        env.forward.pos.append(0)
        env.forward.hidden.dtype = pb.DTYPE_F32
        env.forward.hidden.shape.extend([1, h.model.hidden_size])
        r = rpc(stage_ep[1], env, [b"\0" * 12])
        if r is None or r[0].WhichOneof("body") != "error" or "bytes" not in r[0].error.message:
            fail("short activation frame: %s" % (r,))
    # A sequence that starts mid-way: the stage answers with an error result, in order.
    step = router.send([(77, 5, 1, True)])
    res, _ = router.recv()
    if res.step != step or not res.HasField("error") or "unknown" not in res.error.message:
        fail("unknown seq: %s" % res)
    # An id outside the vocabulary.
    step = router.send([(78, 0, vocab + 5, True)])
    res, _ = router.recv()
    if not res.HasField("error") or "outside vocab" not in res.error.message:
        fail("bad id: %s" % res)
    # Sampler: logits frame of the wrong size, and bad parameters.
    env = pb.Envelope()
    row = env.sample.rows.add()
    row.params.top_p = 2.0
    env.sample.logits.dtype = pb.DTYPE_F32
    env.sample.logits.shape.extend([1, 4])
    r = rpc(sampler_ep, env, [b"\0" * 16])
    if r is None or "top_p" not in r[0].error.message:
        fail("sampler bad params: %s" % (r,))
    r = rpc(sampler_ep, env, [b"\0" * 15])
    if r is None or "bytes" not in r[0].error.message:
        fail("sampler short frame: %s" % (r,))
    got = generate(router, sampler_ep, vocab, {2: ids}, 4, 1)[2]
    if got != ref[:4]:
        fail("after bad input: %s" % got)
    print("ok 3 - bad frames on every socket answered with errors; still serving")

    # 4. Health carries the stage's facts.
    h0 = health(stage_ep[0])
    if (h0.layer_begin, h0.layer_end) != (cuts[0], cuts[1]) or h0.live_seqs != 0:
        fail("health: %s" % h0)
    print("ok 4 - health: layers %d..%d, kv %d/%d blocks" % (h0.layer_begin, h0.layer_end, h0.kv_used,
                                                           h0.kv_total))


try:
    main()
finally:
    unclean = {k: rc for k, rc in e2e.stop_all(10).items() if rc != -15}
    if unclean:
        print("processes exited with %s" % unclean)
        sys.exit(1)
print("PASS")
