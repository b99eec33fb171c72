#!/usr/bin/python3
"""core_stage_death.py - a pipeline stage dies with requests in flight.

Every accepted request must still get exactly one final answer, and the cluster must
serve again once the stage is back. The stage is frozen (SIGSTOP) first, so the requests
are certainly inside the pipeline when it is killed (SIGKILL):

A. Services started one by one (as a supervisor or mpirun does; no launcher to stop the
   rest): the router's health polls notice that the stage stopped answering (two
   missed polls, ~2 s) and fail the steps in flight, long before the step timeout
   (router.timeout_ms, the default 30 s here). A non-streaming completion gets one 5xx JSON error; a streaming one
   its 200, one in-band error event, then `data: [DONE]` and nothing more; an internal-RPC
   generate one final error event. /ready turns 503 while the stage is down; once it is
   restarted, /ready is 200 again and greedy tokens equal ref_greedy.txt.
B. Under `cpm-cluster up`: the launcher stops the cluster (router first), and the router,
   closing, answers what it has in flight the same way, then exits cleanly like every
   other process but the killed stage.

usage: core_stage_death.py BUILD_DIR MODEL_DIR (a model with tokenizer files)
"""
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import zmq

BUILD, MODEL = os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2])
SRC = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUT_MS = 30000  # the default: the router must not need it to notice a dead stage

tmp = tempfile.mkdtemp(prefix="cpm-stage-death-")
subprocess.run(["protoc", "--proto_path=" + os.path.join(SRC, "proto"), "--python_out=" + tmp,
                os.path.join(SRC, "proto", "cpm.proto")], check=True)
sys.path.insert(0, tmp)
import cpm_pb2 as pb  # noqa: E402

CTX = zmq.Context()
procs = {}
BINS = {"router": "router/cpm-router", "tokenizer": "services/tokenizer/cpm-tokenizer",
        "sampler": "services/sampler/cpm-sampler", "stage": "shard/cpm-shard"}


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
            out += "--- %s\n%s" % (name, open(os.path.join(tmp, name)).read()[-1500:])
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


def write_config(ports, cut):
    ep = lambda k: "tcp://127.0.0.1:%d" % ports[k]  # noqa: E731
    lines = ["version: 1", "model: " + MODEL, "router:", "  http: 127.0.0.1:%d" % ports["http"],
             "  rpc: " + ep("rpc"), "  results: " + ep("results"), "  timeout_ms: %d" % TIMEOUT_MS,
             "  micro_batches: 2", "tokenizers:", "  - endpoint: " + ep("tok"), "samplers:",
             "  - endpoint: " + ep("smp"), "stages:", "  - layers: [0, %d]" % cut, "    endpoint: " + ep("st0"),
             "  - layers: [%d, end]" % cut, "    endpoint: " + ep("st1")]
    path = os.path.join(tmp, "cluster.yaml")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def start(cfg, role, index, label):
    args = [os.path.join(BUILD, BINS[role]), "--config", cfg]
    if role != "router":
        args += ["--index", str(index)]
    log = open(os.path.join(tmp, label + ".log"), "a")
    procs[label] = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)


def get(port, path):
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        c.request("GET", path)
        r = c.getresponse()
        r.read()
        return r.status
    except OSError:
        return None


def wait_ready(port, want=200, limit=30):
    t0 = time.time()
    while get(port, "/ready") != want:
        if time.time() - t0 > limit:
            fail("/ready not %d after %d s" % (want, limit))
        time.sleep(0.1)


# ---------------------------------------------------------------- clients in flight

def http_client(port, body, out):
    """One completion; out gets (status, raw body text, seconds)."""
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
    """One generate; out gets (list of events until final, extra events within 1 s after)."""
    s = CTX.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    env = pb.Envelope(version=pb.PROTOCOL_VERSION_CURRENT, corr=3)
    env.generate.request_id = "death-1"
    env.generate.prompt_ids.extend(ids)
    env.generate.max_tokens = 200
    env.generate.ignore_eos = True
    s.send(env.SerializeToString())
    events, extra = [], 0
    while s.poll(60000):
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


def in_flight(port, rpc_ep, ids):
    """Starts a non-streaming, a streaming and an RPC request; returns (threads, results)."""
    res = {"plain": [], "stream": [], "rpc": []}
    body = {"prompt": ids, "max_tokens": 200, "temperature": 0, "ignore_eos": True}
    th = [threading.Thread(target=http_client, args=(port, body, res["plain"])),
          threading.Thread(target=http_client, args=(port, dict(body, stream=True), res["stream"])),
          threading.Thread(target=rpc_client, args=(rpc_ep, ids, res["rpc"]))]
    for t in th:
        t.start()
    return th, res


def check_one_final_answer(res, what):
    """Each client got exactly one final answer, and it is an error."""
    (st, text, _), = res["plain"]
    if st is None or st < 500 or "error" not in json.loads(text):
        fail("%s: non-streaming: %s %r" % (what, st, text[:300]))
    (st, text, _), = res["stream"]
    blocks = [b for b in text.split("\n\n") if b.strip()]
    if st != 200 or not blocks or blocks[-1] != "data: [DONE]":
        fail("%s: stream did not end with [DONE]: %s %r" % (what, st, text[-300:]))
    errors = [b for b in blocks if b.startswith("data: {") and "error" in json.loads(b[6:])]
    if len(errors) != 1 or blocks[-2] != errors[0] or blocks.count("data: [DONE]") != 1:
        fail("%s: stream: want one error event then [DONE], got %r" % (what, blocks[-3:]))
    (events, extra), = res["rpc"]
    finals = [e for e in events if e.WhichOneof("body") == "token_event" and e.token_event.final]
    if len(finals) != 1 or not finals[0].token_event.HasField("error") or extra:
        fail("%s: rpc: %d final events (last %s), %d after it" % (what, len(finals), events[-1:], extra))
    return json.loads(res["plain"][0][1])["error"]["message"]


def rpc_greedy(endpoint, ids, n):
    out = []
    s = CTX.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    env = pb.Envelope(version=pb.PROTOCOL_VERSION_CURRENT, corr=4)
    env.generate.request_id = "after"
    env.generate.prompt_ids.extend(ids)
    env.generate.max_tokens = n
    env.generate.ignore_eos = True
    s.send(env.SerializeToString())
    if not s.poll(30000):
        fail("rpc generate after restart: no answer")
    r = pb.Envelope()
    r.ParseFromString(s.recv_multipart()[0])
    s.close()
    out = list(r.token_event.ids)
    return out, r


# ---------------------------------------------------------------- the two scenarios

def scenario_services(ids, ref, cut):
    ports = {k: free_port() for k in ["http", "rpc", "results", "tok", "smp", "st0", "st1"]}
    cfg = write_config(ports, cut)
    for role, idx, label in [("tokenizer", 0, "tok"), ("sampler", 0, "smp"), ("stage", 0, "st0"),
                             ("stage", 1, "st1"), ("router", 0, "router")]:
        start(cfg, role, idx, label)
    wait_ready(ports["http"])
    rpc_ep = "tcp://127.0.0.1:%d" % ports["rpc"]

    procs["st1"].send_signal(signal.SIGSTOP)
    th, res = in_flight(ports["http"], rpc_ep, ids)
    time.sleep(0.5)  # admitted, prefilled by stage 0, stuck at stage 1
    t_kill = time.time()
    procs["st1"].kill()
    procs["st1"].wait()
    for t in th:
        t.join(30)
    if any(t.is_alive() for t in th):
        fail("A: a client still waits 30 s after the stage died")
    why = check_one_final_answer(res, "A")
    took = max(r[0][2] for r in (res["plain"], res["stream"])) - 0.5
    print("ok 1 - A: stage killed mid-request: non-streaming, streaming and RPC requests each got one "
          "final error (within %.1f s; timeout_ms %d): %r" % (time.time() - t_kill, TIMEOUT_MS, why))
    if took > 8:
        fail("A: answers took %.1f s: the router should notice the dead stage from its health "
             "polls, not wait for timeout_ms (%d ms)" % (took, TIMEOUT_MS))

    wait_ready(ports["http"], want=503, limit=10)
    start(cfg, "stage", 1, "st1")
    wait_ready(ports["http"])
    got, r = rpc_greedy(rpc_ep, ids, len(ref))
    if got != ref:
        fail("A: after the restart: %s\n want %s (%s)" % (got, ref, r))
    print("ok 2 - A: /ready 503 while the stage is down; restarted, the cluster gives ref_greedy.txt again")
    for p in procs.values():
        p.terminate()
    unclean = {k: p.wait(20) for k, p in procs.items()}
    unclean = {k: rc for k, rc in unclean.items() if rc != 0}
    if unclean:
        fail("A: exit status after SIGTERM: %s" % unclean)
    procs.clear()


def scenario_launcher(ids, cut):
    ports = {k: free_port() for k in ["http", "rpc", "results", "tok", "smp", "st0", "st1"]}
    cfg = write_config(ports, cut)
    log = open(os.path.join(tmp, "launcher.log"), "a")
    p = subprocess.Popen([os.path.join(BUILD, "tools", "cpm-cluster"), "up", cfg, "--port", "0", "--timeout", "60"],
                         stdout=subprocess.PIPE, stderr=log, text=True)
    procs["launcher"] = p
    m = re.search(r"ready: http://127\.0\.0\.1:(\d+) ", p.stdout.readline())
    if not m:
        fail("B: no ready line")
    port = int(m.group(1))
    out = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", str(p.pid)], capture_output=True, text=True).stdout
    stage1 = [int(line.split()[0]) for line in out.splitlines() if "cpm-shard" in line and "--index 1" in line]
    if len(stage1) != 1:
        fail("B: stage 1 not found among %r" % out)
    os.kill(stage1[0], signal.SIGSTOP)
    th, res = in_flight(port, "tcp://127.0.0.1:%d" % ports["rpc"], ids)
    time.sleep(0.5)
    os.kill(stage1[0], signal.SIGKILL)
    for t in th:
        t.join(30)
    if any(t.is_alive() for t in th):
        fail("B: a client still waits 30 s after the stage died")
    why = check_one_final_answer(res, "B")
    if p.wait(30) != 1:
        fail("B: launcher exit %s" % p.returncode)
    # Exit 1 is for the dead stage; every other process, the router closing with those
    # requests in flight included, must have stopped cleanly.
    stops = re.findall(r"cpm-cluster: on stop: (.*)", open(os.path.join(tmp, "launcher.log")).read())
    if stops != ["stage 1 killed by signal 9"]:
        fail("B: not a clean stop: %s" % stops)
    print("ok 3 - B: under cpm-cluster up, the launcher stops the cluster and each request in flight got "
          "one final error: %r" % why)


def main():
    layers = json.load(open(os.path.join(MODEL, "config.json")))["num_hidden_layers"]
    ids = [int(x) for x in open(os.path.join(MODEL, "ids.txt")).read().split()]
    ref = [int(x) for x in open(os.path.join(MODEL, "ref_greedy.txt")).read().split()]
    cut = max(1, layers // 2)
    try:
        scenario_services(ids, ref, cut)
        scenario_launcher(ids, cut)
    finally:
        cleanup()


main()
print("PASS")
