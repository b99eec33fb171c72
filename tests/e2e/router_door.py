#!/usr/bin/python3
"""router_door.py - the HTTP door: API keys, CORS, where it may listen open, graceful drain.

1. Keys from router.api_keys (a file) and $CPM_API_KEYS: no key or a wrong one gets 401 in
   OpenAI's error shape with WWW-Authenticate; either right key is served (a completion and
   a chat completion); the probes (/health, /live, /ready) stay open; /metrics needs a key.
2. CORS (router.cors_origins): a preflight from an allowed origin gets 204 with the
   Allow-Origin/-Methods/-Headers lines and needs no key; answers to an allowed origin
   (a 401 and an SSE stream too) carry Access-Control-Allow-Origin, to any other origin
   nothing.
3. A router on 0.0.0.0 without keys refuses to start and says how to fix it; with
   `router.auth: none` it starts, warning that anyone may use it.
4. SIGTERM drains: /ready turns 503 at once and new requests get 503 shutting_down while
   an SSE stream and an RPC stream in flight finish whole; the router exits 0.
5. A drain that outlasts router.drain_ms: the streams still running get one final error
   each (SSE: one error event and [DONE]), and the router exits 0.
6. A second SIGTERM during a drain stops at once: one final error, exit 0.

usage: router_door.py BUILD_DIR MODEL_DIR (with tokenizer files)
"""
import json
import os
import signal
import subprocess
import time

from harness import E2E, RpcStream, SseStream

h = E2E("cpm-door-")
fail = h.fail
FILE_KEY, ENV_KEY = "sk-file-0123456789", "sk-env-abcdef"
ORIGIN = "https://app.example"
LONG = 6000  # tokens: far more than a drain of 300 ms lets run; two such fit the stage's KV cache


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
        if st != 401 or err.get("code") != "invalid_api_key" or hd.get("www-authenticate") != "Bearer" \
                or err.get("type") != "invalid_request_error" or "param" not in err or \
                err["param"] is not None or not err.get("message"):
            fail("%s: %s %s %s" % (what, st, hd, text))
    for key in (FILE_KEY, ENV_KEY):
        st, _, text = call(port, "/v1/completions", key, body=body)
        if st != 200:
            fail("key %s: %s %s" % (key, st, text))
    chat = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}
    st, _, text = call(port, "/v1/chat/completions", FILE_KEY, body=chat)
    if st != 200 or json.loads(text)["choices"][0]["message"]["role"] != "assistant":
        fail("chat with a key: %s %s" % (st, text))
    if call(port, "/v1/chat/completions", body=chat)[0] != 401:
        fail("chat without a key was served")
    for path in ("/health", "/live", "/ready"):
        if call(port, path, method="GET")[0] != 200:
            fail("%s is not open" % path)
    if call(port, "/metrics", method="GET")[0] != 401 or call(port, "/metrics", FILE_KEY, "GET")[0] != 200:
        fail("/metrics: open without a key, or closed with one")
    print("ok 1 - no key / a wrong key: 401 invalid_api_key (OpenAI's shape) + WWW-Authenticate; "
          "the file's key and $CPM_API_KEYS' are served, a chat completion too; /health /live /ready open; /metrics needs a key")


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
    st, hd, _ = call(port, "/v1/completions", body={"prompt": [1], "max_tokens": 1}, origin=ORIGIN)
    if st != 401 or hd.get("access-control-allow-origin") != ORIGIN:
        fail("a 401 to the allowed origin: %s %s" % (st, hd))
    st, hd, text = call(port, "/v1/completions", FILE_KEY, origin=ORIGIN,
                        body={"prompt": [1], "max_tokens": 3, "stream": True})
    if st != 200 or hd.get("access-control-allow-origin") != ORIGIN or \
            not text.rstrip().endswith("data: [DONE]"):
        fail("an SSE stream to the allowed origin: %s %s %r" % (st, hd, text[-200:]))
    for origin in ("https://evil.example", None):
        for path, method, key in (("/health", "GET", None), ("/v1/models", "GET", FILE_KEY),
                                  ("/v1/models", "OPTIONS", None)):
            st, hd, _ = call(port, path, key, method, origin=origin)
            if any(k.startswith("access-control-") for k in hd):
                fail("%s %s from %s got CORS headers: %s" % (method, path, origin, hd))
    print("ok 2 - CORS: preflight 204 with the allow lines (no key needed), the allowed origin's "
          "answers (a 401, an SSE stream) carry Allow-Origin, another origin's or none nothing")


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


def part4(ports, tag, n, want_done, again=False):
    """An SSE and an RPC stream in flight, then SIGTERM (twice with again): (the SSE
    stream, the RPC stream, seconds until the router exited)."""
    router = h.procs["router-" + tag]
    s = SseStream(ports["http"], [1, 2, 3, 4], n, headers={"Authorization": "Bearer " + FILE_KEY})
    rpc = RpcStream(h, "tcp://127.0.0.1:%d" % ports["rpc"], [1, 2, 3, 4], n, "drain-" + tag)
    s.start()
    rpc.start()
    t0 = time.time()
    while (len(s.pieces) < 4 or len(rpc.ids) < 4) and time.time() - t0 < 30:
        time.sleep(0.005)
    if len(s.pieces) < 4 or len(rpc.ids) < 4:
        fail("%s: the streams did not start (SSE %d pieces, RPC %d ids)" % (tag, len(s.pieces), len(rpc.ids)))
    router.send_signal(signal.SIGTERM)
    t_term = time.time()
    time.sleep(0.2)
    if want_done:
        st = call(ports["http"], "/ready", method="GET")[0]
        st2, _, text = call(ports["http"], "/v1/completions", FILE_KEY, body={"prompt": [1], "max_tokens": 1})
        if st != 503 or st2 != 503 or json.loads(text)["error"].get("code") != "shutting_down":
            fail("draining: /ready %s, a new request %s %s" % (st, st2, text))
    if again:
        router.send_signal(signal.SIGTERM)
    s.join(120)
    rpc.join(120)
    rc = router.wait(60)
    if rc != 0:
        fail("router exit %s after SIGTERM" % rc)
    return s, rpc, time.time() - t_term


def one_error_each(s, rpc, what):
    """The streams a drain ended: one error event then [DONE]; one final RPC error."""
    errors = [b for b in s.blocks if '"error"' in b]
    fin = rpc.final.token_event if rpc.final is not None and \
        rpc.final.WhichOneof("body") == "token_event" else None
    if s.blocks[-1] != "data: [DONE]" or len(errors) != 1 or s.blocks[-2] != errors[0] or \
            '"shutting_down"' not in errors[0]:
        fail("%s: SSE: %d error events, last %r" % (what, len(errors), s.blocks[-2:]))
    if fin is None or not fin.final or not fin.HasField("error") or rpc.extra:
        fail("%s: RPC: final %s, %d after it" % (what, rpc.final, rpc.extra))


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
    s, rpc, took = part4(ports, "a", 1500, True)
    if s.blocks[-1] != "data: [DONE]" or '"finish_reason":"length"' not in s.blocks[-2] or \
            any('"error"' in b for b in s.blocks):
        fail("drained stream: %d pieces, last %r" % (len(s.pieces), s.blocks[-2:]))
    if len(rpc.ids) != 1500 or rpc.final is None or rpc.final.token_event.HasField("error"):
        fail("drained RPC stream: %d ids, final %s" % (len(rpc.ids), rpc.final))
    print("ok 4 - SIGTERM: /ready 503 and new requests 503 shutting_down at once; the SSE and RPC "
          "streams in flight finished whole (1500 tokens each); the router exited 0 (%.1f s after "
          "the signal)" % took)
    h.stop_all()
    part3()
    ports = h.ports("http", "rpc", "results", "tok", "smp", "st0")
    start(ports, config(ports, door[:1] + ["drain_ms: 300"], "short.yaml"), "b")
    s, rpc, took = part4(ports, "b", LONG, False)
    one_error_each(s, rpc, "drain deadline")
    if took > 10:
        fail("drain deadline: the router exited %.1f s after SIGTERM" % took)
    print("ok 5 - streams still running when drain_ms (300) ran out got one final error each (SSE: "
          "then [DONE]); the router exited 0 %.1f s after SIGTERM" % took)
    h.stop_cleanly()
    ports = h.ports("http", "rpc", "results", "tok", "smp", "st0")
    start(ports, config(ports, door, "again.yaml"), "c")
    s, rpc, took = part4(ports, "c", LONG, False, again=True)
    one_error_each(s, rpc, "a second SIGTERM")
    if took > 10:
        fail("a second SIGTERM: the router exited %.1f s after the first (drain_ms 60000)" % took)
    print("ok 6 - a second SIGTERM during a 60 s drain stopped at once: one final error each, exit 0 "
          "(%.1f s)" % took)
    h.stop_cleanly()


h.run(main)
