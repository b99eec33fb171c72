#!/usr/bin/python3
"""core_security.py - the fabric is encrypted and authenticated by default.

Layout: router, tokenizer, 2 samplers, 2 stages of a model with tokenizer files, all with
the cluster's keys (the default: security on); sampler 1 holds another cluster's keys; an
expert service of a MoE model listens with this cluster's keys beside them.

1. A packet capture on loopback (AF_PACKET, the root's own) of every fabric port while a
   prompt goes through HTTP and the internal RPC holds neither the prompt's text nor its
   token ids nor the generated ids. The same run with `security.curve: off` shows both
   in the capture (the capture would catch them) and every service warns it is plain text.
2. Refusals: a plain-text client and a CURVE client whose key is not allowed get no answer
   from any service (router RPC and results, tokenizer, samplers, stages, expert); a
   client key is answered by the router's RPC and by nothing else; each refusal is logged.
3. A service with another cluster's keys cannot join: neither side completes a handshake
   (each proves a key the other does not trust), /ready lists it as not ready, and
   requests are served by sampler 0 alone.

Needs root for the capture (skips that part, not the rest, without it).
usage: core_security.py BUILD_DIR MODEL_DIR (with tokenizer files) MOE_MODEL_DIR
"""
import os
import socket
import struct
import sys
import threading
import time

from harness import E2E, ep, free_port, make_keys, secure

h = E2E("cpm-security-")
fail = h.fail
MOE = os.path.abspath(sys.argv[3])
PROMPT = "The secret word is xylophone, and the password is swordfish"
FABRIC = ["rpc", "results", "tok", "smp0", "smp1", "st0", "st1"]


class Capture(threading.Thread):
    """TCP payloads on lo to or from the given ports, as one byte string."""

    def __init__(self, ports):
        super().__init__(daemon=True)
        self.ports, self.data, self.packets, self.stop = set(ports), bytearray(), 0, False
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(0x0003))
        self.sock.bind(("lo", 0))
        self.sock.settimeout(0.2)

    def run(self):
        while not self.stop:
            try:
                frame, addr = self.sock.recvfrom(65536)
            except socket.timeout:
                continue
            if addr[2] == socket.PACKET_OUTGOING:  # lo shows each packet twice
                continue
            self.take(frame)

    def take(self, frame):
        ip = frame[14:]
        if len(ip) < 20 or ip[0] >> 4 != 4 or ip[9] != 6:  # IPv4, TCP
            return
        ihl = (ip[0] & 15) * 4
        tcp = ip[ihl:]
        sport, dport = struct.unpack("!HH", tcp[:4])
        if sport in self.ports or dport in self.ports:
            payload = tcp[(tcp[12] >> 4) * 4:struct.unpack("!H", ip[2:4])[0] - ihl]
            self.data += payload
            self.packets += 1

    def end(self):
        self.stop = True
        self.join()
        self.sock.close()
        return bytes(self.data)


def varints(ids):
    """The ids as protobuf writes a packed repeated int32 (the wire's form of a token list)."""
    out = bytearray()
    for v in ids:
        v &= 0xFFFFFFFFFFFFFFFF
        while True:
            b = v & 0x7F
            v >>= 7
            out.append(b | (0x80 if v else 0))
            if not v:
                break
    return bytes(out)


def write_config(ports, curve):
    stages = [{"layers": "[0, 1]", "endpoint": "st0"}, {"layers": "[1, end]", "endpoint": "st1"}]
    lines = h.cluster_lines(ports, stages, samplers=["smp0", "smp1"])
    if not curve:
        lines += ["security:", "  curve: off"]
    return h.write_config(lines, "cluster-%s.yaml" % ("curve" if curve else "plain"))


def start_cluster(ports, curve, tag):
    cfg = write_config(ports, curve)
    h.start_service(cfg, "router", 0, "router-" + tag)
    h.start_service(cfg, "tokenizer", 0, "tok-" + tag)
    h.start_service(cfg, "sampler", 0, "smp0-" + tag)
    for i in range(2):
        h.start_service(cfg, "stage", i, "st%d-%s" % (i, tag))
    # sampler 1 belongs to another cluster: its own keys, so the two refuse each other
    other = make_keys(h.build, h.path("other-keys"))
    env = dict(os.environ, CPM_KEYS_DIR=other)
    h.start("smp1-" + tag, [h.bin("sampler"), "--config", cfg, "--index", "1"], env=env)
    h.wait_ready(ports["http"], limit=60)


def exchange(ports, prompt_ids):
    """One HTTP completion of PROMPT and one RPC generate of prompt_ids (a client key):
    the generated ids of both."""
    st, text = h.req(ports["http"], "POST", "/v1/completions",
                     {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True,
                      "return_token_ids": True})
    if st != 200:
        fail("completion: %s %s" % (st, text))
    import json
    http_ids = json.loads(text)["choices"][0]["token_ids"]
    out = []
    h.rpc_client(ep(ports["rpc"]), prompt_ids, out, max_tokens=8)  # fabric key
    events, _, _ = out[0]
    rpc_ids = [t for e in events if e.WhichOneof("body") == "token_event" for t in e.token_event.ids]
    if len(rpc_ids) != 8:
        fail("rpc generate: %s" % events)
    return http_ids, rpc_ids


def capture_run(curve, prompt_ids):
    """(captured fabric bytes, ids that must not show) for one cluster."""
    tag = "curve" if curve else "plain"
    h.curve = curve
    ports = h.ports("http", *FABRIC)
    start_cluster(ports, curve, tag)
    cap = Capture([ports[k] for k in FABRIC])
    cap.start()
    http_ids, rpc_ids = exchange(ports, prompt_ids)
    time.sleep(0.3)
    data = cap.end()
    if cap.packets < 20:
        fail("%s: the capture saw %d packets on the fabric's ports" % (tag, cap.packets))
    return ports, data, [prompt_ids, http_ids, rpc_ids]


def clear_items(data, id_lists):
    """What of the prompt shows in clear in data."""
    found = [w for w in ("xylophone", "swordfish") if w.encode() in data]
    found += ["ids %s" % ids[:6] for ids in id_lists if len(ids) >= 4 and varints(ids[:6]) in data]
    return found


def part1(prompt_ids):
    if os.geteuid() != 0:
        print("ok 1 # SKIP the capture needs root")
        return h.ports("http", *FABRIC), None
    ports, plain, ids = capture_run(False, prompt_ids)
    seen = clear_items(plain, ids)
    if len(seen) < 3:
        fail("plain text: the capture should show the prompt and ids, saw %s" % seen)
    for label in ("router-plain", "tok-plain", "smp0-plain", "st0-plain", "st1-plain"):
        if "PLAIN TEXT" not in open(h.path(label + ".log")).read():
            fail("%s: no plain-text warning" % label)
    h.stop_all()
    ports, data, ids = capture_run(True, prompt_ids)
    seen = clear_items(data, ids)
    if seen:
        fail("CURVE: the capture shows %s in clear" % seen)
    print("ok 1 - capture: plain text shows the prompt and ids (%d bytes); with CURVE "
          "(default) %d bytes of fabric traffic hold none of them" % (len(plain), len(data)))
    return ports, data


def answers(endpoint, keys=None, name="fabric"):
    """Whether a Health request on a fresh DEALER gets any reply within 1 s."""
    import zmq
    s = h.ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    if keys:
        secure(s, keys, name=name)
    s.connect(endpoint)
    env = h.envelope(corr=11)
    env.health_request.SetInParent()
    s.send(env.SerializeToString())
    got = bool(s.poll(1000))
    s.close()
    return got


def stranger_keys():
    """A CURVE keypair that knows this cluster's public key but is not allowed by it."""
    d = make_keys(h.build, h.path("stranger"), client="x")
    with open(os.path.join(d, "fabric.pub"), "w") as f:
        f.write(open(os.path.join(h.keys, "fabric.pub")).read())
    return d


def part2(ports):
    expert_ep = ep(free_port())
    h.start("expert", [h.bin("expert"), "--bind", expert_ep, "--model", MOE, "--experts", "0:-1",
                       "--keys", h.keys])
    eps = {k: ep(ports[k]) for k in FABRIC if k != "smp1"}
    eps["expert"] = expert_ep
    deadline = time.time() + 30
    while not answers(expert_ep, h.keys) and time.time() < deadline:
        time.sleep(0.2)
    stranger = stranger_keys()
    for name, e in sorted(eps.items()):
        if name != "results" and not answers(e, h.keys):
            fail("%s: the fabric's own key gets no answer" % name)
        if answers(e):
            fail("%s answered a plain-text client" % name)
        if answers(e, stranger, "client-x"):
            fail("%s answered a key it does not allow" % name)
        if answers(e, h.keys, "client-e2e") != (name == "rpc"):
            fail("%s: a client key %s" % (name, "refused" if name == "rpc" else "answered"))
    logs = {"rpc": "router-curve", "tok": "tok-curve", "smp0": "smp0-curve", "st0": "st0-curve",
            "st1": "st1-curve", "expert": "expert"}
    for name, label in logs.items():
        if "refused a connection from 127.0.0.1" not in open(h.path(label + ".log")).read():
            fail("%s: no refusal logged" % label)
    print("ok 2 - %d services: plain text and a stranger's key get no answer (logged); a client "
          "key is answered by the router RPC only" % len(eps))


def part3(ports):
    import json
    st, body = h.req(ports["http"], "GET", "/ready")
    svcs = json.loads(body)["services"]
    bad = [s for s in svcs if s["name"] == "sampler1"]
    if st != 200 or len(bad) != 1 or bad[0].get("ready"):
        fail("/ready %s: sampler 1 should be listed and not ready: %s" % (st, body))
    exchange(ports, [1, 2, 3, 4])  # fails the test unless both are answered
    print("ok 3 - a sampler with another cluster's keys never joins (no handshake either way, "
          "/ready lists it not ready); sampler 0 serves")


def main():
    ids = [int(x) for x in open(os.path.join(h.model, "ids.txt")).read().split()][:12]
    ports, _ = part1(ids)
    if os.geteuid() != 0:
        start_cluster(ports, True, "curve")
    part2(ports)
    part3(ports)
    h.stop_cleanly()


h.run(main)
