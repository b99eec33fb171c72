#!/usr/bin/python3
"""router_door.py - the HTTP door: API keys, CORS, where it may listen open, graceful drain.

1. Keys from router.api_keys (a file) and $CPM_API_KEYS: no key or a wrong one gets 401 in
   OpenAI's error shape with WWW-Authenticate; either right key is served; the probes
   (/health, /live, /ready) stay open; /metrics needs a key.
2. CORS (router.cors_origins): a preflight from an allowed origin gets 204 with the
   Allow-Origin/-Methods/-Headers lines and needs no key; answers to an allowed origin
   carry Access-Control-Allow-Origin, to any other origin nothing.
3. A router on 0.0.0.0 without keys refuses to start and says how to fix it; with
   `router.auth: none` it starts, warning that anyone may use it.
4. SIGTERM drains: /ready turns 503 at once and new requests get 503 while a stream in
   flight finishes whole ([DONE]); the router exits 0.
5. A drain that outlasts router.drain_ms: the stream still running gets one error event
   and [DONE], and the router exits 0.

usage: router_door.py BUILD_DIR MODEL_DIR (with tokenizer files)
"""
import json
import os
import signal
import subprocess
import time

from harness import E2E, SseStream

h = E2E("cpm-door-")
fail = h.fail
FILE_KEY, ENV_KEY = "sk-file-0123456789", "sk-env-abcdef"
ORIGIN = "https://app.example"


def config(ports, extra, name):
    stages = [{"layers": "[0, end]", "endpoint": "st0"}]
    return h.write_config(h.cluster_lines(ports, stages, router=extra), name)


def start(ports, cfg, tag, env=None):
    h.start("router-" + tag, [h.bin("router"), "--config", cfg], env=env)
    for role, label in (("tokenizer", "tok"), ("sampler", "smp"), ("stage", "st")):
        h.start_service(cfg, role, 0, "%s-%s" % (label, tag))
    deadline = time.time() + 60
    while h.ready(ports["http"]) != 200:
        if time.time() > deadline or h.procs["router-" + tag].poll() is not None:
            fail("%s: not ready" % tag)
        time.sleep(0.05)


def call(port, path, key=None, method="POST", body=None, origin=None):
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = "Bearer " + key
    if origin:
        headers["Origin"] = origin
    import http.client
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    c.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
    r = c.getresponse()
    text = r.read().decode()
    c.close()
    return r.status, dict((k.lower(), v) for k, v in r.getheaders()), text


def part1(port):
    body = {"prompt": [1, 2, 3], "max_tokens": 2}
    for key, what in ((None, "no key"), ("sk-wrong", "a wrong key")):
        st, hd, text = call(port, "/v1/completions", key, body=body)
        err = json.loads(text).get("error", {})
        if st != 401 or err.get("code") != "invalid_api_key" or hd.get("www-authenticate") != "Bearer":
            fail("%s: %s %s %s" % (what, st, hd, text))
    for key in (FILE_KEY, ENV_KEY):
        st, _, text = call(port, "/v1/completions", key, body=body)
        if st != 200:
            fail("key %s: %s %s" % (key, st, text))
    for path in ("/health", "/live", "/ready"):
        if call(port, path, method="GET")[0] != 200:
            fail("%s is not open" % path)
    if call(port, "/metrics", method="GET")[0] != 401 or call(port, "/metrics", FILE_KEY, "GET")[0] != 200:
        fail("/metrics: open without a key, or closed with one")
    print("ok 1 - no key / a wrong key: 401 invalid_api_key + WWW-Authenticate; the file's key and "
          "$CPM_API_KEYS' are served; /health /live /ready open; /metrics needs a key")


def part2(port):
    st, hd, _ = call(port, "/v1/chat/completions", method="OPTIONS", origin=ORIGIN)
    if st != 204 or hd.get("access-control-allow-origin") != ORIGIN or \
            "POST" not in hd.get("access-control-allow-methods", "") or \
            "authorization" not in hd.get("access-control-allow-headers", "").lower():
        fail("preflight: %s %s" % (st, hd))
    st, hd, _ = call(port, "/v1/completions", FILE_KEY, body={"prompt": [1], "max_tokens": 1},
                     origin=ORIGIN)
    if st != 200 or hd.get("access-control-allow-origin") != ORIGIN or hd.get("vary") != "Origin":
        fail("allowed origin: %s %s" % (st, hd))
    st, hd, _ = call(port, "/health", method="GET", origin="https://evil.example")
    if "access-control-allow-origin" in hd:
        fail("another origin got CORS headers: %s" % hd)
    print("ok 2 - CORS: preflight 204 with the allow lines (no key needed), the allowed origin's "
          "answers carry Allow-Origin, another origin's nothing")


def part3():
    ports = h.ports("http", "rpc", "results", "tok", "smp", "st0")
    stages = [{"layers": "[0, end]", "endpoint": "st0"}]
    lines = h.cluster_lines(ports, stages)
    lines[3] = "  http: 0.0.0.0:%d" % ports["http"]
    cfg = h.write_config(lines, "open.yaml")
    env = dict(os.environ)
    env.pop("CPM_API_KEYS", None)
    r = subprocess.run([h.bin("router"), "--config", cfg], env=env, capture_output=True, text=True,
                       timeout=30)
    if r.returncode == 0 or "without API keys" not in r.stderr or "CPM_API_KEYS" not in r.stderr:
        fail("open on 0.0.0.0: rc %s %r" % (r.returncode, r.stderr[-500:]))
    cfg = h.write_config(lines[:6] + ["  auth: none"] + lines[6:], "none.yaml")
    p = subprocess.Popen([h.bin("router"), "--config", cfg], env=env, stderr=subprocess.PIPE, text=True)
    line = ""
    deadline = time.time() + 20
    while "auth: none" not in line and time.time() < deadline and p.poll() is None:
        line = p.stderr.readline()
    p.send_signal(signal.SIGINT)
    p.wait(20)
    if "auth: none" not in line:
        fail("auth: none: no warning (%r)" % line)
    print("ok 3 - on 0.0.0.0 without keys the router refuses to start, naming router.api_keys and "
          "CPM_API_KEYS; with auth: none it starts and warns")


def part4(ports, tag, n, want_done):
    """A stream in flight, then SIGTERM: (the stream, seconds until the router exited)."""
    router = h.procs["router-" + tag]
    s = SseStream(ports["http"], [1, 2, 3, 4], n, headers={"Authorization": "Bearer " + FILE_KEY})
    s.start()
    t0 = time.time()
    while len(s.pieces) < 4 and time.time() - t0 < 30:
        time.sleep(0.005)
    router.send_signal(signal.SIGTERM)
    t_term = time.time()
    time.sleep(0.2)
    if want_done:
        st = call(ports["http"], "/ready", method="GET")[0]
        st2, _, text = call(ports["http"], "/v1/completions", FILE_KEY, body={"prompt": [1], "max_tokens": 1})
        if st != 503 or st2 != 503 or "shutting down" not in text:
            fail("draining: /ready %s, a new request %s %s" % (st, st2, text))
    s.join(120)
    rc = router.wait(60)
    if rc != 0:
        fail("router exit %s after SIGTERM" % rc)
    return s, time.time() - t_term


def main():
    with open(h.path("api-keys.txt"), "w") as f:
        f.write("# the door's keys\n%s\n\n" % FILE_KEY)
    os.environ["CPM_API_KEYS"] = ENV_KEY + ", "
    ports = h.ports("http", "rpc", "results", "tok", "smp", "st0")
    door = ["api_keys: api-keys.txt", "cors_origins: %s, https://other.example" % ORIGIN,
            "drain_ms: 60000"]
    start(ports, config(ports, door, "door.yaml"), "a")
    part1(ports["http"])
    part2(ports["http"])
    s, took = part4(ports, "a", 1500, True)
    if s.blocks[-1] != "data: [DONE]" or '"finish_reason":"length"' not in s.blocks[-2] or \
            any('"error"' in b for b in s.blocks):
        fail("drained stream: %d pieces, last %r" % (len(s.pieces), s.blocks[-2:]))
    print("ok 4 - SIGTERM: /ready 503 and new requests 503 at once; the stream in flight finished "
          "whole (1500 tokens, [DONE]); the router exited 0 (%.1f s after the signal)" % took)
    h.stop_all()
    part3()
    ports = h.ports("http", "rpc", "results", "tok", "smp", "st0")
    start(ports, config(ports, door[:1] + ["drain_ms: 300"], "short.yaml"), "b")
    s, took = part4(ports, "b", 16000, False)
    errors = [b for b in s.blocks if '"error"' in b]
    if s.blocks[-1] != "data: [DONE]" or len(errors) != 1 or took > 10:
        fail("drain deadline: %d error events, last %r, %.1f s" % (len(errors), s.blocks[-2:], took))
    print("ok 5 - a stream still running when drain_ms (300) ran out got one error event and [DONE]; "
          "the router exited 0 %.1f s after SIGTERM" % took)
    h.stop_cleanly()


h.run(main)
