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
import http.client
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

import zmq

BUILD, MODEL = os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2])
SRC = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
N_GEN = 24
TIMEOUT_MS = 2000  # router.timeout_ms: also each all-reduce's deadline

tmp = tempfile.mkdtemp(prefix="cpm-tp-")
subprocess.run(["protoc", "--proto_path=" + os.path.join(SRC, "proto"), "--python_out=" + tmp,
                os.path.join(SRC, "proto", "cpm.proto")], check=True)
sys.path.insert(0, tmp)
import cpm_pb2 as pb  # noqa: E402

CTX = zmq.Context()
procs = {}
BINS = {"router": "router/cpm-router", "sampler": "services/sampler/cpm-sampler",
        "stage": "shard/cpm-shard"}


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def log_tail():
    out = ""
    for name in sorted(os.listdir(tmp)):
        if name.endswith(".log"):
            out += "--- %s\n%s" % (name, open(os.path.join(tmp, name)).read()[-2000:])
    return out


def cleanup():
    for p in procs.values():
        if p.poll() is None:
            p.kill()
            p.wait()


def fail(msg):
    print("FAIL:", msg)
    print(log_tail())
    cleanup()
    raise SystemExit(1)


def ep(ports, k):
    return "tcp://127.0.0.1:%d" % ports[k]


def write_config(ports, cut):
    lines = ["version: 1", "model: " + MODEL, "router:", "  http: 127.0.0.1:%d" % ports["http"],
             "  rpc: " + ep(ports, "rpc"), "  results: " + ep(ports, "results"), "  micro_batches: 2",
             "  tokenize: off", "  timeout_ms: %d" % TIMEOUT_MS,
             "tokenizers:", "  - endpoint: " + ep(ports, "tok"),
             "samplers:", "  - endpoint: " + ep(ports, "smp"),
             "stages:",
             "  - layers: [0, %d]" % cut, "    endpoint: " + ep(ports, "st0"),
             "    tp_mesh: " + ep(ports, "mesh0"),
             "    tp:", "      - endpoint: " + ep(ports, "tp1"), "        mesh: " + ep(ports, "mesh1"),
             "  - layers: [%d, end]" % cut, "    endpoint: " + ep(ports, "st1"),
             "    tp_mesh: " + ep(ports, "mesh2"),
             "    tp:", "      - endpoint: " + ep(ports, "tp1b"), "        mesh: " + ep(ports, "mesh3")]
    path = os.path.join(tmp, "cluster.yaml")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def start(cfg, role, index, label, tp_rank=0):
    args = [os.path.join(BUILD, BINS[role]), "--config", cfg]
    if role != "router":
        args += ["--index", str(index)]
    if tp_rank:
        args += ["--tp-rank", str(tp_rank)]
    log = open(os.path.join(tmp, label + ".log"), "a")
    procs[label] = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)


def req(port, method, path, body=None, timeout=60):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    c.request(method, path, body=json.dumps(body) if body is not None else None,
              headers={"Content-Type": "application/json"})
    r = c.getresponse()
    data = r.read().decode()
    c.close()
    return r.status, data


def ready(port):
    try:
        return req(port, "GET", "/ready", timeout=10)[0]
    except OSError:
        return None


def wait_ready(port, want=200, limit=30):
    t0 = time.time()
    while ready(port) != want:
        if time.time() - t0 > limit:
            fail("/ready not %d after %d s" % (want, limit))
        time.sleep(0.05)


def cpm_run_ids(ids, n):
    out = subprocess.run([os.path.join(BUILD, "shard", "cpm-run"), "--model", MODEL, "--ids",
                          ",".join(map(str, ids)), "--n", str(n), "--ignore-eos", "--print-ids"],
                         capture_output=True, text=True, check=True).stdout
    return [int(x) for x in out.split()]


def completion_ids(port, ids, n=N_GEN):
    body = {"prompt": ids, "max_tokens": n, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}
    st, text = req(port, "POST", "/v1/completions", body)
    if st != 200:
        return st, text
    return st, json.loads(text)["choices"][0]["token_ids"]


# ---------------------------------------------------------------- raw requests to the TP rank

def call(endpoint, frames, wait_ms=5000):
    """Sends frames on a fresh DEALER; the reply Envelope, or None when none comes."""
    s = CTX.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    s.send_multipart(frames)
    if not s.poll(wait_ms):
        s.close()
        return None
    r = pb.Envelope()
    r.ParseFromString(s.recv_multipart()[0])
    s.close()
    return r


def push(endpoint, frames):
    s = CTX.socket(zmq.PUSH)
    s.setsockopt(zmq.LINGER, 1000)
    s.connect(endpoint)
    s.send_multipart(frames)
    s.close()


# ---------------------------------------------------------------- requests in flight

def http_client(port, body, out):
    t0 = time.time()
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        c.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        r = c.getresponse()
        out.append((r.status, r.read().decode(), time.time() - t0))
        c.close()
    except (OSError, http.client.HTTPException) as e:
        out.append((None, repr(e), time.time() - t0))


def rpc_client(endpoint, ids, out):
    s = CTX.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    env = pb.Envelope(version=pb.PROTOCOL_VERSION_CURRENT, corr=3)
    env.generate.request_id = "tp-1"
    env.generate.prompt_ids.extend(ids)
    env.generate.max_tokens = 200
    env.generate.ignore_eos = True
    env.generate.stream = True
    s.send(env.SerializeToString())
    events, extra = [], 0
    while s.poll(30000):
        r = pb.Envelope()
        r.ParseFromString(s.recv_multipart()[0])
        events.append(r)
        if r.WhichOneof("body") != "token_event" or r.token_event.final:
            break
    while s.poll(1000):
        s.recv_multipart()
        extra += 1
    s.close()
    out.append((events, extra))


def check_one_final_answer(res):
    (st, text, _), = res["plain"]
    if st is None or st < 500 or "error" not in json.loads(text):
        fail("4: non-streaming: %s %r" % (st, text[:300]))
    (st, text, _), = res["stream"]
    blocks = [b for b in text.split("\n\n") if b.strip()]
    if st != 200 or not blocks or blocks[-1] != "data: [DONE]":
        fail("4: stream did not end with [DONE]: %s %r" % (st, text[-300:]))
    errors = [b for b in blocks if b.startswith("data: {") and "error" in json.loads(b[6:])]
    if len(errors) != 1 or blocks[-2] != errors[0] or blocks.count("data: [DONE]") != 1:
        fail("4: stream: want one error event then [DONE], got %r" % blocks[-3:])
    (events, extra), = res["rpc"]
    finals = [e for e in events if e.WhichOneof("body") == "token_event" and e.token_event.final]
    if len(finals) != 1 or not finals[0].token_event.HasField("error") or extra:
        fail("4: rpc: %d final events (last %s), %d after it" % (len(finals), events[-1:], extra))
    return json.loads(res["plain"][0][1])["error"]["message"]


# ---------------------------------------------------------------- the scenario

def main():
    cfgj = json.load(open(os.path.join(MODEL, "config.json")))
    kv = cfgj.get("num_key_value_heads", cfgj["num_attention_heads"])
    if kv % 2:
        fail("%s: %d key/value heads do not split over 2 ranks" % (MODEL, kv))
    layers, hidden = cfgj["num_hidden_layers"], cfgj["hidden_size"]
    ids = [int(x) for x in open(os.path.join(MODEL, "ids.txt")).read().split()]
    prompts = [ids, ids[:-3], ids[2:], ids[:-6] + ids[:4]]
    refs = [cpm_run_ids(p, N_GEN) for p in prompts]

    ports = {k: free_port() for k in ["http", "rpc", "results", "tok", "smp", "st0", "st1", "tp1",
                                      "mesh0", "mesh1", "tp1b", "mesh2", "mesh3"]}
    cfg = write_config(ports, max(1, layers // 2))
    t0 = time.time()
    start(cfg, "sampler", 0, "smp")
    start(cfg, "stage", 0, "st0")
    start(cfg, "stage", 0, "tp1", tp_rank=1)
    start(cfg, "stage", 1, "st1")
    start(cfg, "stage", 1, "tp1b", tp_rank=1)
    start(cfg, "router", 0, "router")
    port, rpc_ep = ports["http"], ep(ports, "rpc")
    wait_ready(port)

    # 1. greedy == cpm-run, one at a time
    for i, p in enumerate(prompts):
        st, got = completion_ids(port, p)
        if st != 200 or got != refs[i]:
            fail("1: prompt %d: %s %s\n want (cpm-run) %s" % (i, st, got, refs[i]))
    print("ok 1 - 4 prompts through HTTP with both stages on 2 tensor-parallel ranks each == cpm-run "
          "token for token (ready after %.1f s)" % (time.time() - t0))

    # 2. 8 concurrent requests == one at a time
    results = [None] * 8

    def one(i):
        results[i] = completion_ids(port, prompts[i % 4])
    th = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in th:
        t.start()
    for t in th:
        t.join(60)
    for i, r in enumerate(results):
        if r is None or r[0] != 200 or r[1] != refs[i % 4]:
            fail("2: concurrent request %d: %s\n want %s" % (i, r, refs[i % 4]))
    print("ok 2 - 8 concurrent requests == one at a time")

    # 3. bad input to the TP rank: an Error each on its endpoint, dropped on its mesh
    tp1 = ep(ports, "tp1")
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
    push(ep(ports, "mesh1"), [b"garbage on the mesh"])
    part = pb.Envelope(version=pb.PROTOCOL_VERSION_CURRENT)
    part.tp_partial.seq, part.tp_partial.op, part.tp_partial.rank = 0, 0, 0
    part.tp_partial.partial.dtype = pb.DTYPE_F32
    part.tp_partial.partial.shape.extend([1, hidden])
    push(ep(ports, "mesh1"), [part.SerializeToString(), struct.pack("<%df" % hidden, *[1.0] * hidden)])
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
    procs["tp1"].send_signal(signal.SIGSTOP)
    res = {"plain": [], "stream": [], "rpc": []}
    body = {"prompt": ids, "max_tokens": 200, "temperature": 0, "ignore_eos": True}
    th = [threading.Thread(target=http_client, args=(port, body, res["plain"])),
          threading.Thread(target=http_client, args=(port, dict(body, stream=True), res["stream"])),
          threading.Thread(target=rpc_client, args=(rpc_ep, ids, res["rpc"]))]
    for t in th:
        t.start()
    time.sleep(0.5)  # admitted and stuck in rank 0's all-reduce
    t_kill = time.time()
    procs["tp1"].kill()
    procs["tp1"].wait()
    for t in th:
        t.join(30)
    if any(t.is_alive() for t in th):
        fail("4: a client still waits 30 s after the TP rank died")
    why = check_one_final_answer(res)
    print("ok 4 - TP rank killed mid-request: non-streaming, streaming and RPC requests each got "
          "one final error (%.1f s after the kill): %r" % (time.time() - t_kill, why))
    wait_ready(port, want=503, limit=10)
    start(cfg, "stage", 0, "tp1", tp_rank=1)
    wait_ready(port)
    for i, p in enumerate(prompts):
        st, got = completion_ids(port, p)
        if st != 200 or got != refs[i]:
            fail("4: after the restart, prompt %d: %s %s\n want %s" % (i, st, got, refs[i]))
    for p in procs.values():
        p.terminate()
    unclean = {k: p.wait(20) for k, p in procs.items()}
    unclean = {k: rc for k, rc in unclean.items() if rc != 0}
    if unclean:
        fail("exit status after SIGTERM: %s" % unclean)
    procs.clear()
    print("ok 5 - /ready 503 while it was down; restarted, cpm-run's tokens again; clean exits on SIGTERM "
          "(%.1f s in all)" % (time.time() - t0))


try:
    main()
finally:
    cleanup()
print("PASS")
