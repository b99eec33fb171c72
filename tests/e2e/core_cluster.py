#!/usr/bin/python3
"""core_cluster.py - a whole cluster started by `cpm-cluster up`, on loopback.

Checks the launcher (precise start-up errors for a wrong config and a taken port; ready
line; clean stop on SIGTERM; a child that dies is restarted and the cluster serves again), and the
services through it: the router's internal generate RPC from Python (python3-zmq +
python3-protobuf, messages generated from proto/cpm.proto) gives the reference greedy
tokens, streamed and not; the tokenizer service round-trips the reference prompt; the
HTTP API's text equals the tokenizer service's decoding of the same tokens.

usage: core_cluster.py BUILD_DIR MODEL_DIR (a model with tokenizer files)
"""
import json
import os
import re
import signal
import socket
import subprocess
import time

import zmq

from harness import E2E, free_port
from harness import ep as h_ep

h = E2E("cpm-cluster-e2e-")
MODEL, pb, CTX, fail, tmp = h.model, h.pb, h.ctx, h.fail, h.tmp
CLUSTER = h.bin("cluster")


def write_config(name, stages, ports):
    ep = lambda k: "tcp://127.0.0.1:%d" % ports[k]  # noqa: E731
    lines = ["version: 1", "router:", "  rpc: " + ep("rpc"), "  results: " + ep("results"),
             "  micro_batches: 2", "tokenizers:", "  - endpoint: " + ep("tok"),
             "samplers:", "  - endpoint: " + ep("smp0"), "  - endpoint: " + ep("smp1"), "stages:"]
    for i, (a, b) in enumerate(stages):
        lines += ["  - layers: [%s, %s]" % (a, b), "    endpoint: " + ep("st%d" % i), "    kv_tokens: 4096"]
    path = os.path.join(tmp, name)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def ports_for(n_stages):
    keys = ["rpc", "results", "tok", "smp0", "smp1"] + ["st%d" % i for i in range(n_stages)]
    return {k: free_port() for k in keys}


def up(cfg, http_port, timeout=90):
    """Starts the cluster; returns (launcher, the HTTP port from its ready line). With
    http_port 0 the router picks the port and the launcher must report the real one."""
    log = open(os.path.join(tmp, "cluster.log"), "a")
    p = subprocess.Popen([CLUSTER, "up", cfg, "--model", MODEL, "--port", str(http_port), "--timeout", "60"],
                         stdout=subprocess.PIPE, stderr=log, text=True)
    h.procs["launcher"] = p
    deadline = time.time() + timeout
    line = p.stdout.readline()
    m = re.search(r"ready: http://127\.0\.0\.1:(\d+) ", line)
    if not m or int(m.group(1)) == 0 or (http_port and int(m.group(1)) != http_port):
        p.kill()
        fail("no ready line for port %d (got %r); log:\n%s"
             % (http_port, line, open(os.path.join(tmp, "cluster.log")).read()[-3000:]))
    if time.time() > deadline:
        fail("slow start")
    return p, int(m.group(1))


def rpc(endpoint, env, timeout_ms=20000):
    s = h.socket(zmq.DEALER)
    s.connect(endpoint)
    env.version = pb.PROTOCOL_VERSION_CURRENT
    env.corr = 5
    s.send(env.SerializeToString())
    replies = []
    while True:
        if not s.poll(timeout_ms):
            s.close()
            fail("%s: no reply" % endpoint)
        r = pb.Envelope()
        r.ParseFromString(s.recv_multipart()[0])
        replies.append(r)
        if r.WhichOneof("body") != "token_event" or r.token_event.final:
            break
    s.close()
    return replies


def generate(endpoint, ids, n, stream):
    env = pb.Envelope()
    g = env.generate
    g.request_id = "py-%d" % stream
    g.prompt_ids.extend(ids)
    g.params.temperature = 0.0
    g.max_tokens = n
    g.ignore_eos = True
    g.stream = stream
    out = rpc(endpoint, env)
    toks = []
    for r in out:
        if r.WhichOneof("body") != "token_event":
            fail("generate: %s" % r)
        if r.token_event.HasField("error"):
            fail("generate: %s" % r.token_event.error)
        toks += list(r.token_event.ids)
    last = out[-1].token_event
    if not last.final or last.completion_tokens != n or last.prompt_tokens != len(ids):
        fail("final event: %s" % last)
    return toks, len(out)


def http(port, path, body=None):
    return h.http_json(port, path, body)


def children(pid):
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def main():
    layers = json.load(open(os.path.join(MODEL, "config.json")))["num_hidden_layers"]
    ids = [int(x) for x in open(os.path.join(MODEL, "ids.txt")).read().split()]
    ref = [int(x) for x in open(os.path.join(MODEL, "ref_greedy.txt")).read().split()]
    cut = max(1, layers // 2)

    # 1. Wrong configs fail before anything starts, naming the problem.
    ports = ports_for(2)
    bad = write_config("overlap.yaml", [(0, cut), (cut - 1, "end")], ports)
    r = subprocess.run([CLUSTER, "up", bad, "--model", MODEL], capture_output=True, text=True, timeout=30)
    if r.returncode != 1 or "stages[1].layers: starts at %d, overlapping stage 0" % (cut - 1) not in r.stderr:
        fail("overlap: rc %d, %r" % (r.returncode, r.stderr))
    short = write_config("short.yaml", [(0, cut), (cut, layers + 3)], ports)
    r = subprocess.run([CLUSTER, "up", short, "--model", MODEL], capture_output=True, text=True, timeout=30)
    if r.returncode != 1 or "but the model has %d layers" % layers not in r.stderr:
        fail("beyond the model: rc %d, %r" % (r.returncode, r.stderr))
    good = write_config("pp2.yaml", [(0, cut), (cut, "end")], ports)
    taken = socket.socket()
    taken.bind(("127.0.0.1", ports["st1"]))
    taken.listen()
    r = subprocess.run([CLUSTER, "up", good, "--model", MODEL], capture_output=True, text=True, timeout=30)
    taken.close()
    if r.returncode != 1 or "stage 1: tcp://127.0.0.1:%d: cannot bind here" % ports["st1"] not in r.stderr:
        fail("port in use: rc %d, %r" % (r.returncode, r.stderr))
    print("ok 1 - wrong configs and a taken port fail at start-up with precise errors")

    # 2. Up with --port 0: the ready line names the port the router bound; then the internal
    # RPC from Python gives the reference tokens.
    p, http_port = up(good, 0)
    kids = children(p.pid)
    if len(kids) != 6:
        fail("expected 6 processes, got %s" % kids)
    log = open(os.path.join(tmp, "cluster.log")).read()
    paged = re.findall(r"(stage\d) loading: weights paged in [\d.]+ of ([\d.]+) MiB \(100 %", log)
    if len({s for s, _ in paged}) != 2 or any(float(mib) <= 0 for _, mib in paged):
        fail("each stage logs its weights paged in before ready: %s" % paged)
    print("ok 1b - each stage paged its weights in before saying ready (the log says how much)")
    rpc_ep = "tcp://127.0.0.1:%d" % ports["rpc"]
    try:
        toks, n_events = generate(rpc_ep, ids, len(ref), stream=False)
        if toks != ref or n_events != 1:
            fail("rpc generate: %s (%d events)\n want %s" % (toks, n_events, ref))
        toks, n_events = generate(rpc_ep, ids, len(ref), stream=True)
        if toks != ref or n_events < len(ref):
            fail("rpc generate stream: %s (%d events)" % (toks, n_events))
        print("ok 2 - internal RPC from Python: %d greedy tokens equal ref_greedy.txt, streamed and not"
              % len(ref))

        # 3. Tokenizer service: the reference prompt's text encodes to the reference ids.
        prompt_file = os.path.join(MODEL, "prompt.txt")
        tok_ep = "tcp://127.0.0.1:%d" % ports["tok"]
        if os.path.exists(prompt_file):
            env = pb.Envelope()
            env.tokenize.text = open(prompt_file).read()
            env.tokenize.add_bos = True
            got = list(rpc(tok_ep, env)[0].tokenized.ids)
            if got != ids:
                fail("tokenize: %s\n want %s" % (got, ids))
        env = pb.Envelope()
        env.detokenize.ids.extend(ref)
        env.detokenize.skip_special = True
        want_text = rpc(tok_ep, env)[0].detokenized.text
        print("ok 3 - tokenizer service: prompt.txt encodes to ids.txt")

        # 4. HTTP: ready, and a token-id prompt gives the same text as the reference tokens.
        st, body = http(http_port, "/ready")
        if st != 200:
            fail("/ready: %d %s" % (st, body))
        st, body = http(http_port, "/v1/completions",
                        {"model": os.path.basename(MODEL), "prompt": ids, "max_tokens": len(ref),
                         "temperature": 0})
        if st != 200:
            fail("completions: %d %s" % (st, body))
        text = body["choices"][0]["text"]
        n_done = body["usage"]["completion_tokens"]
        env = pb.Envelope()
        env.detokenize.ids.extend(ref[:n_done])
        env.detokenize.skip_special = True
        want_text = rpc(tok_ep, env)[0].detokenized.text
        if text != want_text:
            fail("HTTP text %r != decode(ref[:%d]) %r" % (text, n_done, want_text))
        print("ok 4 - HTTP completion (%d tokens) on the port --port 0 picked (%d) equals the reference "
              "decoded by cpm-tokenizer" % (n_done, http_port))
        # max_tokens is bounded by the context left (no fixed 1024): 1100 tokens are made
        st, body = http(http_port, "/v1/completions",
                        {"prompt": ids, "max_tokens": 1100, "ignore_eos": True, "temperature": 0})
        if st != 200 or body["usage"]["completion_tokens"] != 1100:
            fail("max_tokens 1100: %s %s" % (st, str(body)[:300]))
        print("ok 4b - max_tokens 1100 (above the old fixed cap of 1024) makes 1100 tokens")
    except BaseException:
        p.kill()
        for k in kids:
            if alive(k):
                os.kill(k, signal.SIGKILL)
        raise

    # 5. SIGTERM stops everything cleanly.
    p.send_signal(signal.SIGTERM)
    rc = p.wait(30)
    if rc != 0:
        fail("launcher exit %d after SIGTERM" % rc)
    time.sleep(0.2)
    left = [k for k in kids if alive(k)]
    if left:
        fail("still running after stop: %s" % left)
    print("ok 5 - SIGTERM: launcher and all 6 processes stopped, exit 0")

    # 6. A stage that dies is restarted by the launcher; the cluster serves again.
    p, http_port = up(good, free_port())
    kids = children(p.pid)
    stage_pid = [k for k in kids if "cpm-shard" in open("/proc/%d/cmdline" % k).read()][-1]
    os.kill(stage_pid, signal.SIGKILL)
    t0 = time.time()  # the new stage: started by the launcher, loaded, and seen by the router
    while "started again" not in open(os.path.join(tmp, "cluster.log")).read() or \
            not (h.health(h_ep(ports["st1"])) or pb.Health()).ready:
        if time.time() - t0 > 30:
            fail("the killed stage did not come back: %s" % open(os.path.join(tmp, "cluster.log")).read()[-1000:])
        time.sleep(0.1)
    time.sleep(1.5)  # a health poll of the router's
    h.wait_ready(http_port, limit=30)
    toks, _ = generate(rpc_ep, ids, len(ref), stream=False)
    log = open(os.path.join(tmp, "cluster.log")).read()
    if toks != ref or "killed by signal 9: restarting it" not in log or p.poll() is not None:
        fail("dead stage: tokens %s, launcher %s, log %s" % (toks, p.poll(), log[-1000:]))
    new_kids = children(p.pid)
    if alive(stage_pid) or len(new_kids) != 6:
        fail("after the restart: old stage alive %s, children %s" % (alive(stage_pid), new_kids))
    p.send_signal(signal.SIGTERM)
    if p.wait(30) != 0:
        fail("launcher exit %d after SIGTERM" % p.returncode)
    time.sleep(0.2)
    if [k for k in new_kids if alive(k)]:
        fail("children left after the stop")
    print("ok 6 - a killed stage is restarted by the launcher (named in the log), the reference tokens "
          "come back, and SIGTERM still stops everything")


h.run(main)
