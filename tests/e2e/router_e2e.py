#!/usr/bin/python3
"""router_e2e.py - the whole cluster through the router's front doors.

Starts real processes on loopback (N cpm-shard stages, a cpm-sampler, a cpm-tokenizer when the
model has tokenizer files, else `tokenize: off`, and cpm-router) from a cluster file written
here with free ports. The router starts first, alone: /health is 200 and /ready 503 (naming
the services it waits for) until the back ends are up. Then it checks through the HTTP API:
  * greedy output equals cpm-run token for token, for several prompts;
  * streaming and non-streaming give the same tokens (and text, when the model has a
    tokenizer; then a chat completion, stop strings and logprob token texts are checked too,
    all through the tokenizer service);
  * 16 concurrent requests give the same outputs as when run one at a time;
  * bad input (malformed HTTP and JSON, unknown fields, oversize bodies, bad token ids,
    limits) gets a clear JSON error, and the router keeps serving;
  * a client that disconnects mid-stream is cancelled (metrics say so, nothing leaks);
and through the internal RPC (python3-zmq + python3-protobuf, module generated from
proto/cpm.proto at test time): generate (streamed and not), cancel, bad frames.

With --node, runs instead the official `openai` npm client (tests/e2e/node, installed by
`npm ci` there; the test is skipped, exit 77, when it is not installed) for a streaming and a
non-streaming chat completion.

With --overload, runs instead a cluster that admits two sequences (router max_seqs 1,
max_queue 1) and sends 8 requests at once: the ones beyond get 429 with an OpenAI-shaped
JSON error, the others complete with the same output as when run alone. Then the tokenizer
is stopped (SIGSTOP): a text request fails after the call timeout with a 503 naming it, while
an RPC generate (token ids only) completes; once it is resumed, text requests work again.

usage: router_e2e.py BUILD_DIR MODEL_DIR [N_STAGES] [--node | --overload]
"""
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import zmq

from harness import E2E, metric_value, secure

ARGS = [a for a in sys.argv[1:] if a not in ("--node", "--overload")]
NODE = "--node" in sys.argv
OVERLOAD = "--overload" in sys.argv
N_STAGES = int(ARGS[2]) if len(ARGS) > 2 else 2
NODE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "node")
if NODE and not os.path.isdir(os.path.join(NODE_DIR, "node_modules", "openai")):
    print("openai npm client not installed (run `npm ci` in tests/e2e/node): skipped")
    sys.exit(77)
h = E2E("cpm-router-e2e-", ARGS[0], ARGS[1])
BUILD, MODEL, pb, TMP = h.build, h.model, h.pb, h.tmp
MAX_BODY = 65536
procs = []
failures = []


def check(cond, what):
    if not cond:
        failures.append(what)
        print("FAIL:", what, flush=True)


STALL_TIMEOUT_MS = 3000
HAS_TOKENIZER = any(os.path.exists(os.path.join(MODEL, n))
                    for n in ["tokenizer.json", "tokenizer.model"])


def config():
    with open(os.path.join(MODEL, "config.json")) as f:
        n_layers = json.load(f)["num_hidden_layers"]
    cuts = [n_layers * i // N_STAGES for i in range(N_STAGES)] + ["end"]
    ports = h.ports("http", "rpc", "results", "tok", "sampler", *["st%d" % i for i in range(N_STAGES)])
    router = ["micro_batches: %d" % N_STAGES, "max_body_bytes: %d" % MAX_BODY, "max_tokens: 256"]
    if not HAS_TOKENIZER:
        router += ["tokenize: off"]  # token ids only: no cpm-tokenizer can load this model
    if OVERLOAD:
        router += ["max_seqs: 1", "max_queue: 1", "timeout_ms: %d" % STALL_TIMEOUT_MS]
    stages = [{"layers": "[%d, %s]" % (cuts[i], cuts[i + 1]), "endpoint": "st%d" % i}
              for i in range(N_STAGES)]
    if N_STAGES == 3:
        stages[1]["isa"] = "avx2"  # a stage pinned to other kernels: same tokens still
    return h.write_config(h.cluster_lines(ports, stages, router=router, samplers=["sampler"])), ports


def start(args, name):
    procs.append(h.start(name, args))


def stop_all():
    h.stop_all(10)


# ---------------------------------------------------------------- HTTP helpers

def request(method, path, body=None, raw=None, timeout=60):
    c = http.client.HTTPConnection("127.0.0.1", HTTP_PORT, timeout=timeout)
    data = raw if raw is not None else (json.dumps(body) if body is not None else None)
    c.request(method, path, body=data, headers={"Content-Type": "application/json"})
    r = c.getresponse()
    text = r.read().decode()
    c.close()
    return r.status, text


def post(path, body):
    status, text = request("POST", path, body)
    return status, json.loads(text) if text else None


def stream(path, body):
    """Returns (list of chunk objects, saw_done) from an SSE response."""
    c = http.client.HTTPConnection("127.0.0.1", HTTP_PORT, timeout=60)
    c.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
    r = c.getresponse()
    assert r.status == 200, (r.status, r.read())
    assert r.getheader("Content-Type") == "text/event-stream"
    chunks, done = [], False
    for block in r.read().decode().split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        payload = block[6:]
        if payload == "[DONE]":
            done = True
            continue
        assert not done, "data after [DONE]"
        chunks.append(json.loads(payload))
    c.close()
    return chunks, done


def raw_exchange(data, read_timeout=5):
    """Sends raw bytes, returns (status, body) of the answer, read until close."""
    s = socket.create_connection(("127.0.0.1", HTTP_PORT))
    s.sendall(data)
    s.settimeout(read_timeout)
    out = b""
    try:
        while True:
            b = s.recv(65536)
            if not b:
                break
            out += b
    except socket.timeout:
        pass
    s.close()
    head, _, body = out.partition(b"\r\n\r\n")
    status = int(head.split(b" ")[1]) if head.startswith(b"HTTP/1.1 ") else 0
    return status, body.decode(errors="replace")


def cpm_run(ids, n):
    return h.cpm_run_ids(ids, n)


def greedy_body(ids, n, **extra):
    b = {"model": MODEL_NAME, "prompt": ids, "max_tokens": n, "temperature": 0,
         "ignore_eos": True, "return_token_ids": True}
    b.update(extra)
    return b


def completion_ids(ids, n):
    status, r = post("/v1/completions", greedy_body(ids, n))
    assert status == 200, r
    return r["choices"][0]["token_ids"]


def metric(name, **labels):
    return metric_value(request("GET", "/metrics")[1], name, **labels)


# ---------------------------------------------------------------- the checks

def test_greedy_matches_cpm_run(prompts):
    for ids in prompts:
        want = cpm_run(ids, 24)
        got = completion_ids(ids, 24)
        check(got == want, "greedy via HTTP != cpm-run for prompt of %d ids: %s vs %s"
              % (len(ids), got, want))


def test_stream_equals_non_stream(ids):
    status, full = post("/v1/completions", greedy_body(ids, 20))
    chunks, done = stream("/v1/completions",
                          greedy_body(ids, 20, stream=True, stream_options={"include_usage": True}))
    check(done, "stream did not end with [DONE]")
    ids_s = [t for c in chunks for ch in c["choices"] for t in ch.get("token_ids", [])]
    text_s = "".join(ch["text"] for c in chunks for ch in c["choices"])
    check(ids_s == full["choices"][0]["token_ids"], "streamed ids differ from non-streamed")
    check(text_s == full["choices"][0]["text"], "streamed text differs from non-streamed")
    finals = [ch["finish_reason"] for c in chunks for ch in c["choices"] if ch["finish_reason"]]
    check(finals == ["length"], "stream finish reasons: %s" % finals)
    check(chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 20,
          "usage chunk missing or wrong: %s" % chunks[-1])
    cached = full["usage"].get("prompt_tokens_details", {}).get("cached_tokens", -1)
    check(full["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 20,
                            "total_tokens": len(ids) + 20,
                            "prompt_tokens_details": {"cached_tokens": cached}}
          and 0 <= cached < len(ids) and cached % 16 == 0, "usage: %s" % full["usage"])


def test_json_mode():
    """response_format json_object: whatever the (random) weights, the answer is one JSON
    object that ended with a stop, streamed or not, greedy or sampled, any max_tokens."""
    for i, (max_tokens, temperature) in enumerate([(8, 0), (12, 1.0), (30, 0.8), (64, 1.5), (20, 0)]):
        body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Give me JSON %d" % i}],
                "max_tokens": max_tokens, "temperature": temperature, "seed": i,
                "response_format": {"type": "json_object"}}
        status, a = post("/v1/chat/completions", body)
        check(status == 200, "json mode: %s %s" % (status, a))
        text = a["choices"][0]["message"]["content"]
        try:
            ok = isinstance(json.loads(text), dict)
        except ValueError:
            ok = False
        check(ok and a["choices"][0]["finish_reason"] == "stop",
              "json mode %d: %r (%s)" % (i, text, a["choices"][0]["finish_reason"]))
        chunks, done = stream("/v1/chat/completions", dict(body, stream=True))
        text_s = "".join(c["choices"][0]["delta"].get("content", "") or "" for c in chunks if c["choices"])
        check(done and text_s == text, "json mode %d streamed %r != %r" % (i, text_s, text))


def test_chat(ids):
    """Only with a tokenizer: chat, text equality streamed vs not."""
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hello, who are you?"}],
            "max_tokens": 16, "temperature": 0}
    status, full = post("/v1/chat/completions", body)
    check(status == 200, "chat: %s %s" % (status, full))
    text = full["choices"][0]["message"]["content"]
    chunks, done = stream("/v1/chat/completions", dict(body, stream=True))
    check(chunks[0]["choices"][0]["delta"].get("role") == "assistant", "first chunk has no role")
    text_s = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    check(done and text_s == text, "chat streamed text %r != %r" % (text_s, text))
    check(full["object"] == "chat.completion" and chunks[0]["object"] == "chat.completion.chunk",
          "chat object types")


def test_text_prompt(ids):
    """A text prompt is tokenized by the tokenizer service exactly as the golden ids."""
    with open(os.path.join(MODEL, "prompt.txt")) as f:
        text = f.read()
    body = greedy_body(text, 12)
    status, r = post("/v1/completions", body)
    check(status == 200 and r["usage"]["prompt_tokens"] == len(ids),
          "text prompt: %s %s (want %d prompt tokens)" % (status, r, len(ids)))
    check(status == 200 and r["choices"][0]["token_ids"] == completion_ids(ids, 12),
          "text prompt and its ids give different tokens")


def test_stop_strings(ids):
    """Stop strings on text that comes back from the tokenizer service, streamed or not."""
    status, full = post("/v1/completions", greedy_body(ids, 40))
    text = full["choices"][0]["text"]
    # a stop string from the middle of the text (at least 2 characters, not at the start)
    k = len(text) // 2
    while k < len(text) - 2 and not text[k:k + 2].strip():
        k += 1
    stop = text[k:k + 2]
    if k == 0 or len(stop) < 2 or not stop.strip():
        check(False, "cannot pick a stop string from %r" % text)
        return
    want = text[:text.index(stop)]
    status, r = post("/v1/completions", greedy_body(ids, 40, stop=[stop]))
    ch = r["choices"][0]
    check(status == 200 and ch["text"] == want and ch["finish_reason"] == "stop",
          "stop %r: got %r (%s), want %r" % (stop, ch.get("text"), ch.get("finish_reason"), want))
    n = len(ch["token_ids"])
    check(ch["token_ids"] == full["choices"][0]["token_ids"][:n] and n < 40
          and r["usage"]["completion_tokens"] == n, "stop: token ids not cut at the stop")
    chunks, done = stream("/v1/completions", greedy_body(ids, 40, stop=[stop], stream=True))
    text_s = "".join(ch["text"] for c in chunks for ch in c["choices"])
    ids_s = [t for c in chunks for ch in c["choices"] for t in ch.get("token_ids", [])]
    check(done and text_s == want and ids_s == ch["token_ids"],
          "streamed stop %r: %r %s vs %r %s" % (stop, text_s, ids_s, want, ch["token_ids"]))
    # include_stop_str_in_output (vLLM): the same cut, with the stop string kept
    status, r = post("/v1/completions", greedy_body(ids, 40, stop=[stop],
                                                    include_stop_str_in_output=True))
    got = r["choices"][0]["text"] if status == 200 else None
    check(got == want + stop, "include_stop_str_in_output %r: got %r, want %r" % (stop, got, want + stop))
    chunks, done = stream("/v1/completions", greedy_body(ids, 40, stop=[stop], stream=True,
                                                         include_stop_str_in_output=True))
    text_s = "".join(ch["text"] for c in chunks for ch in c["choices"])
    check(done and text_s == want + stop, "streamed include_stop_str_in_output: %r" % text_s)


def test_special_tokens(ids):
    """skip_special_tokens (vLLM, default true): a special token the model is made to
    generate (logit_bias) is left out of the text, or spelled out when false."""
    tok = json.load(open(os.path.join(MODEL, "tokenizer.json")))
    cfg = json.load(open(os.path.join(MODEL, "config.json")))
    eos = cfg.get("eos_token_id")
    eos = set(eos if isinstance(eos, list) else [eos])
    special = [t for t in tok.get("added_tokens", []) if t.get("special") and t["id"] not in eos
               and t["id"] < cfg["vocab_size"] and t["content"].strip()]
    if not special:
        check(False, "the test model's tokenizer has no special token to force")
        return
    sp = special[0]

    def text(**extra):
        body = dict({"prompt": ids[:6], "max_tokens": 3, "temperature": 0, "ignore_eos": True,
                     "return_token_ids": True, "logit_bias": {str(sp["id"]): 100}}, **extra)
        status, a = post("/v1/completions", body)
        check(status == 200 and a["choices"][0]["token_ids"] == [sp["id"]] * 3,
              "forcing %r: %s %s" % (sp["content"], status, a))
        return a["choices"][0]["text"]
    check(sp["content"] not in text(), "skip_special_tokens by default: %r shown" % sp["content"])
    got = text(skip_special_tokens=False)
    check(got == sp["content"] * 3, "skip_special_tokens false: %r, want %r" % (got, sp["content"] * 3))


def test_logprob_texts(ids):
    """Logprob tokens are texts from the tokenizer, streamed or not."""
    body = greedy_body(ids, 8, logprobs=2)
    status, r = post("/v1/completions", body)
    lp = r["choices"][0]["logprobs"] if status == 200 else None
    check(lp and len(lp["tokens"]) == 8 and all(isinstance(t, str) for t in lp["tokens"])
          and not any(t.startswith("token_id:") for t in lp["tokens"])
          and all(len(t) >= 1 for t in lp["top_logprobs"]), "logprob texts: %s %s" % (status, lp))
    chunks, done = stream("/v1/completions", dict(body, stream=True))
    toks = [t for c in chunks for ch in c["choices"] if ch.get("logprobs")
            for t in ch["logprobs"]["tokens"]]
    check(done and lp and toks == lp["tokens"], "streamed logprob tokens %s != %s"
          % (toks, lp and lp["tokens"]))


def test_no_tokenizer():
    """`tokenize: off`: a text prompt is refused with a clear error; ids still work."""
    status, r = post("/v1/completions", {"prompt": "hello", "max_tokens": 2})
    check(status == 400 and r["error"]["code"] == "no_tokenizer", "text prompt with tokenize: off:"
          " %s %s" % (status, r))


def test_not_ready():
    """The router alone: alive (/health 200) but not ready (/ready 503) and refusing work."""
    deadline = time.time() + 20
    while True:
        try:
            status, _ = request("GET", "/health", timeout=2)
            break
        except OSError:
            if time.time() > deadline:
                check(False, "router never answered /health")
                return
            time.sleep(0.1)
    check(status == 200, "/health of a router without back ends: %s" % status)
    time.sleep(1.5)  # a health round has come back empty by now
    status, text = request("GET", "/ready")
    ready = json.loads(text)
    names = [sv["name"] for sv in ready["services"]]
    want = ["stage%d" % i for i in range(N_STAGES)] + ["sampler0"]
    if HAS_TOKENIZER:
        want.append("tokenizer0")
    check(status == 503 and ready["ready"] is False and sorted(names) == sorted(want)
          and not any(sv["ready"] for sv in ready["services"]),
          "/ready without back ends: %s %s" % (status, text))
    status, r = post("/v1/completions", {"prompt": [1, 2], "max_tokens": 2})
    check(status == 503 and r["error"]["code"] == "not_ready", "request before ready: %s %s"
          % (status, r))


def test_overload(ids):
    """8 requests at once against 2 places: 429s with an OpenAI error, the rest correct."""
    with open(os.path.join(MODEL, "prompt.txt")) as f:
        text = f.read()
    want = completion_ids(ids, 48)
    results = [None] * 8

    def run(i):
        prompt = text if i % 2 and HAS_TOKENIZER else ids
        results[i] = post("/v1/completions", greedy_body(prompt, 48))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    statuses = [st for st, _ in results]
    print("overload statuses:", statuses)
    check(statuses.count(429) >= 1 and statuses.count(200) >= 1 and
          all(st in (200, 429) for st in statuses), "overload statuses %s" % statuses)
    for st, r in results:
        if st == 429:
            e = r.get("error", {})
            check(e.get("type") == "rate_limit_error" and e.get("code") == "queue_full"
                  and e.get("message"), "429 body: %s" % r)
        elif st == 200:
            check(r["choices"][0]["token_ids"] == want, "an admitted request under overload "
                  "gave %s, alone %s" % (r["choices"][0]["token_ids"], want))
    check(completion_ids(ids, 48) == want, "not serving after the overload")
    check(metric("cpm_requests_total", endpoint="completions", outcome="overloaded")
          == statuses.count(429), "429s not counted as overload")


def test_tokenizer_stalled(ids):
    """A tokenizer that stops answering fails only the requests waiting on it, with an
    error naming it; token-in/token-out work (the RPC) goes on; then it serves again."""
    tok = [p for p in procs if p.args[0].endswith("cpm-tokenizer")][0]
    want = cpm_run(ids, 6)
    with open(os.path.join(MODEL, "prompt.txt")) as f:
        text = f.read()
    tok.send_signal(signal.SIGSTOP)
    try:
        result = {}

        def run():
            result["http"] = post("/v1/completions", greedy_body(text, 6))

        t = threading.Thread(target=run)
        t.start()
        sock = h.socket(zmq.DEALER, name="client-e2e")
        sock.connect(RPC_EP)
        env = pb.Envelope(corr=1)
        env.generate.request_id = "while-stalled"
        env.generate.prompt_ids.extend(ids)
        env.generate.max_tokens = 6
        env.generate.ignore_eos = True
        _, events = rpc_call(sock, env)
        sock.close()
        check(events and list(events[-1].ids) == want, "rpc while the tokenizer is stalled: %s"
              % events)
        t.join()
    finally:
        tok.send_signal(signal.SIGCONT)
    status, r = result["http"]
    err = (r or {}).get("error", {})
    check(status == 503 and err.get("code") == "tokenizer_unavailable"
          and "tokenizer0" in err.get("message", "") and "%d ms" % STALL_TIMEOUT_MS in err["message"],
          "request to a stalled tokenizer: %s %s" % (status, r))
    deadline = time.time() + 10
    while request("GET", "/ready")[0] != 200 and time.time() < deadline:
        time.sleep(0.1)
    status, r = post("/v1/completions", greedy_body(text, 6))
    check(status == 200 and r["choices"][0]["token_ids"] == want, "not serving text after the "
          "tokenizer came back: %s %s" % (status, r))


def test_concurrent(prompts):
    single = [completion_ids(p, 12) for p in prompts]
    results = [None] * len(prompts)

    def run(i):
        results[i] = completion_ids(prompts[i], 12)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    check(results == single, "16 concurrent requests differ from one at a time")


def test_n_and_seed(ids):
    body = {"model": MODEL_NAME, "prompt": ids, "max_tokens": 8, "temperature": 0.9, "seed": 5,
            "n": 3, "return_token_ids": True, "ignore_eos": True}
    status, a = post("/v1/completions", body)
    status2, b = post("/v1/completions", body)
    check(status == 200 and status2 == 200, "n=3 request failed")
    check([c["index"] for c in a["choices"]] == [0, 1, 2], "choice indexes")
    check([c["token_ids"] for c in a["choices"]] == [c["token_ids"] for c in b["choices"]],
          "same seed gave different samples")


def test_sampling_extras(ids):
    """logit_bias, stop_token_ids and min_tokens change the output as asked."""
    def gen(**extra):
        body = dict({"prompt": ids[:6], "max_tokens": 6, "temperature": 0, "ignore_eos": True,
                     "return_token_ids": True}, **extra)
        status, a = post("/v1/completions", body)
        check(status == 200, "%s: %s %s" % (extra, status, a))
        return a["choices"][0]
    base = gen()["token_ids"]
    forced = next(t for t in range(5, 50) if t not in base)
    got = gen(logit_bias={str(forced): 100})["token_ids"]
    check(got == [forced] * 6, "logit_bias +100 on %d: %s" % (forced, got))
    got = gen(logit_bias={str(base[0]): -100})["token_ids"]
    check(got[0] != base[0], "logit_bias -100 on the greedy token %d: %s" % (base[0], got))
    c = gen(stop_token_ids=[base[2]])
    check(c["finish_reason"] == "stop" and c["token_ids"][:2] == base[:2] and len(c["token_ids"]) <= 3,
          "stop_token_ids [%d]: %s" % (base[2], c))
    c = gen(stop_token_ids=[base[0]], min_tokens=3)
    check(base[0] not in c["token_ids"][:3] and len(c["token_ids"]) >= 3,
          "min_tokens 3 with stop id %d: %s" % (base[0], c))
    # the model's generation_config.json fills what a request leaves out
    path = os.path.join(MODEL, "generation_config.json")
    g = json.load(open(path)) if os.path.exists(path) else {}
    if "temperature" in g and "top_p" in g and g.get("do_sample", True):
        def sampled(**extra):
            body = dict({"prompt": ids[:6], "max_tokens": 16, "seed": 7, "ignore_eos": True,
                         "return_token_ids": True}, **extra)
            status, a = post("/v1/completions", body)
            check(status == 200, "seeded: %s %s" % (status, a))
            return a["choices"][0]["token_ids"]
        left_out = sampled()
        check(left_out == sampled(temperature=g["temperature"], top_p=g["top_p"]),
              "a request without temperature/top_p did not get generation_config's %s/%s"
              % (g["temperature"], g["top_p"]))
        check(left_out != sampled(temperature=1.0, top_p=1.0),
              "generation_config's defaults made no difference (OpenAI's 1.0/1.0 gave the same)")


def test_bad_input(vocab):
    cases = [
        ("malformed JSON", "/v1/completions", '{"prompt": [1,2', 400, "invalid_json"),
        ("guided decoding by regex is refused, not ignored", "/v1/completions",
         '{"prompt": [1], "guided_regex": "a+"}', 400, "unsupported_parameter"),
        ("logit_bias outside the vocabulary", "/v1/completions",
         '{"prompt": [1], "logit_bias": {"%d": 5}}' % vocab, 400, "invalid_token_id"),
        ("wrong type", "/v1/completions", '{"prompt": [1], "max_tokens": "9"}', 400, None),
        ("token id out of vocab", "/v1/completions", '{"prompt": [1, %d]}' % vocab, 400,
         "invalid_token_id"),
        ("max_tokens over the context", "/v1/completions", '{"prompt": [1], "max_tokens": 100000}', 400,
         "context_length_exceeded"),
        ("max_tokens over the server's cap", "/v1/completions", '{"prompt": [1], "max_tokens": 257}',
         400, "max_tokens_too_large"),
        ("unknown model", "/v1/completions", '{"prompt": [1], "model": "gpt-17"}', 404,
         "model_not_found"),
        ("chat without messages", "/v1/chat/completions", '{"model": "x"}', 400, None),
    ]
    for name, path, raw, want_status, want_code in cases:
        status, text = request("POST", path, raw=raw)
        err = json.loads(text).get("error", {}) if text.startswith("{") else {}
        check(status == want_status and "message" in err and "type" in err,
              "%s: got %s %s" % (name, status, text))
        if want_code:
            check(err.get("code") == want_code, "%s: code %s" % (name, err.get("code")))
    # POST /tokenize (vLLM's shape): ids come back as they are; with a tokenizer, text and a
    # chat (whose template adds tokens) through the tokenizer service
    status, text = request("POST", "/tokenize", {"prompt": [5, 6, 7]})
    t = json.loads(text)
    check(status == 200 and t.get("tokens") == [5, 6, 7] and t.get("count") == 3 and
          t.get("max_model_len", 0) > 0, "/tokenize ids: %s %s" % (status, text))
    if HAS_TOKENIZER:
        status, text = request("POST", "/tokenize", {"prompt": "Hello world", "add_special_tokens": True})
        plain = json.loads(text)
        status2, text2 = request("POST", "/tokenize",
                                 {"messages": [{"role": "user", "content": "Hello world"}]})
        chat = json.loads(text2)
        check(status == 200 and status2 == 200 and plain["count"] == len(plain["tokens"]) > 1 and
              chat["count"] > plain["count"], "/tokenize text/chat: %s %s / %s %s"
              % (status, text, status2, text2))
    else:
        status, text = request("POST", "/tokenize", {"prompt": "Hello"})
        check(status == 400 and json.loads(text)["error"]["code"] == "no_tokenizer",
              "/tokenize text without a tokenizer: %s %s" % (status, text))
    # POST /detokenize (vLLM's shape): the ids' text, special tokens spelled out
    if HAS_TOKENIZER:
        status, text = request("POST", "/detokenize", {"tokens": plain["tokens"]})
        d = json.loads(text) if status == 200 else {}
        check(d.get("prompt", "").endswith("Hello world") and len(d["prompt"]) > len("Hello world"),
              "/detokenize of /tokenize's ids (BOS spelled out): %s %s" % (status, text))
        for body, why in (({"tokens": [vocab]}, "an id past the vocabulary"), ({"tokens": []}, "no ids"),
                          ({"tokens": "1 2"}, "not an array"), ({"tokens": [1, -1]}, "a negative id"),
                          ({"tokens": [1.5]}, "not an integer")):
            status, text = request("POST", "/detokenize", body)
            check(status == 400 and "tokens" in json.loads(text)["error"].get("param", ""),
                  "/detokenize with %s: %s %s" % (why, status, text))
    else:
        status, text = request("POST", "/detokenize", {"tokens": [5]})
        check(status == 400, "/detokenize without a tokenizer: %s %s" % (status, text))
    # GET /v1/models/{id} (with the context length), a wrong id 404, /version
    status, text = request("GET", "/v1/models/" + MODEL_NAME)
    m = json.loads(text)
    check(status == 200 and m.get("id") == MODEL_NAME and m.get("max_model_len", 0) > 0,
          "/v1/models/{id}: %s %s" % (status, text))
    status, text = request("GET", "/v1/models/gpt-17")
    check(status == 404 and json.loads(text)["error"]["code"] == "model_not_found",
          "/v1/models/gpt-17: %s %s" % (status, text))
    status, text = request("GET", "/version")
    check(status == 200 and json.loads(text).get("version"), "/version: %s %s" % (status, text))
    # fields this server does not know are accepted and ignored (as vLLM), logged; the
    # client's X-Request-Id comes back
    c = http.client.HTTPConnection("127.0.0.1", HTTP_PORT, timeout=60)
    c.request("POST", "/v1/completions", body='{"prompt": [1], "max_tokens": 1, "bogus_extra": 1}',
              headers={"Content-Type": "application/json", "X-Request-Id": "trace-42"})
    r = c.getresponse()
    r.read()
    c.close()
    check(r.status == 200 and r.getheader("X-Request-Id") == "trace-42",
          "unknown field / X-Request-Id: %s %s" % (r.status, r.getheader("X-Request-Id")))
    big = json.dumps({"prompt": "x" * (MAX_BODY + 10)})
    status, text = request("POST", "/v1/completions", raw=big)
    check(status == 413, "oversize body: %s" % status)
    status, text = raw_exchange(b"NONSENSE / HTTP/1.1\r\n\r\n")
    check(status == 400 and '"error"' in text, "malformed HTTP: %s %s" % (status, text))
    status, text = raw_exchange(b"GET /v1/models HTTP/1.1\r\nContent-Length: x\r\n\r\n")
    check(status == 400, "bad Content-Length: %s" % status)
    status, _ = request("GET", "/v1/completions")
    check(status == 405, "GET on a POST route: %s" % status)
    status, _ = request("GET", "/nope")
    check(status == 404, "unknown route: %s" % status)
    status, _ = request("GET", "/ready")
    check(status == 200, "router not ready after bad input")


def test_disconnect_cancels(ids):
    before = metric("cpm_requests_total", endpoint="completions", outcome="cancelled")
    s = socket.create_connection(("127.0.0.1", HTTP_PORT))
    body = json.dumps(greedy_body(ids, 200, stream=True)).encode()
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n" % len(body) + body)
    got = b""
    while b"data: " not in got:
        got += s.recv(4096)
    s.close()
    for _ in range(100):
        after = metric("cpm_requests_total", endpoint="completions", outcome="cancelled")
        if after > before and metric("cpm_running_sequences") == 0:
            break
        time.sleep(0.05)
    check(after == before + 1, "disconnect was not counted as a cancel (%s -> %s)" % (before, after))
    check(metric("cpm_running_sequences") == 0, "a cancelled sequence is still running")


def test_metrics():
    """What a dashboard made for vLLM needs: a model_name label on every series, finish
    reasons, length and phase histograms with buckets up to an hour, services' health."""
    _, text = request("GET", "/metrics")
    for name in ["cpm_requests_total", "cpm_time_to_first_token_seconds_bucket",
                 "cpm_inter_token_latency_seconds_count", "cpm_queue_depth", "cpm_kv_usage_ratio",
                 "cpm_generation_tokens_total"]:
        check(name in text, "metric %s missing" % name)
    check(metric("cpm_generation_tokens_total") > 0, "no generated tokens counted")
    series = [line for line in text.splitlines() if line and not line.startswith("#")]
    check(all('model_name="' in line for line in series),
          "a series without model_name: %s" % [s for s in series if "model_name" not in s][:3])
    finished = metric("cpm_request_finished_total")
    check(finished > 0 and metric("cpm_request_finished_total", finished_reason="length") > 0,
          "finish reasons not counted (%s)" % finished)
    for name in ["cpm_request_queue_time_seconds", "cpm_request_prefill_time_seconds",
                 "cpm_request_decode_time_seconds", "cpm_request_prompt_tokens",
                 "cpm_request_generation_tokens"]:
        check(metric(name + "_count") > 0, "%s observed nothing" % name)
    check(metric("cpm_request_duration_seconds_bucket", le="3600") > 0, "no bucket up to an hour")
    check(metric("cpm_request_prompt_tokens_bucket", le="262144") > 0, "no length bucket of 256k")
    check(metric("cpm_service_up", kind="stage") >= 1 and metric("cpm_service_up", kind="sampler") >= 1,
          "services' up gauges missing")
    check(metric("cpm_service_health_seconds", kind="sampler") > 0, "no health round trip measured")
    # docker/grafana-dashboard.json asks only for series this router serves
    dash = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "docker",
                        "grafana-dashboard.json")
    exprs = [t["expr"] for p in json.load(open(dash))["panels"] for t in p["targets"]]
    used = set(re.findall(r"\b(cpm_[a-z_]+)", " ".join(exprs)))
    served = set(re.findall(r"^([a-z_]+)[{ ]", text, re.M))
    check(used and used <= served, "the dashboard uses series /metrics lacks: %s" % sorted(used - served))


def test_access_log(ids):
    """One access line per exchange with the request id the client got back (its own
    X-Request-Id echoed, or the generated one), tokens, time to first token, finish."""
    body = json.dumps({"prompt": ids[:4], "max_tokens": 3, "temperature": 0, "ignore_eos": True})
    got = {}
    for xid in ("e2e-access-1", None):
        c = http.client.HTTPConnection("127.0.0.1", HTTP_PORT, timeout=60)
        headers = {"Content-Type": "application/json"}
        if xid:
            headers["X-Request-Id"] = xid
        c.request("POST", "/v1/completions", body=body, headers=headers)
        r = c.getresponse()
        answer = json.loads(r.read().decode())
        c.close()
        rid = r.getheader("X-Request-Id")
        check(r.status == 200 and rid == (xid or answer["id"]),
              "X-Request-Id %r for %r (answer id %s)" % (rid, xid, answer.get("id")))
        got[xid] = answer["id"]
    request("GET", "/nowhere")
    deadline = time.time() + 5
    want = [r'access method=POST path=/v1/completions status=200 client=127\.0\.0\.1:\d+ duration_ms=[\d.]+ '
            r'request_id=%s prompt_tokens=4 completion_tokens=3 finish_reason=length ttft_ms=[\d.]+ '
            r'x_request_id=e2e-access-1' % re.escape(got["e2e-access-1"]),
            r'access method=POST path=/v1/completions status=200 .* request_id=%s ' % re.escape(got[None]),
            r'access method=GET path=/nowhere status=404 ',
            r'access method=RPC path=generate duration_ms=[\d.]+ request_id=\S+ prompt_tokens=\d+ '
            r'completion_tokens=\d+ finish_reason=\w+']  # test_rpc's calls
    while True:
        log = open(h.path("router.log"), errors="replace").read()
        missing = [w for w in want if not re.search(w, log)]
        if not missing or time.time() > deadline:
            break
        time.sleep(0.1)
    check(not missing, "access log lines missing: %s" % missing)


# ---------------------------------------------------------------- internal RPC

def rpc_call(sock, env, frames=(), timeout_ms=30000):
    env.version = pb.PROTOCOL_VERSION_CURRENT
    sock.send_multipart([env.SerializeToString(), *frames])
    events = []
    while True:
        if not sock.poll(timeout_ms):
            raise TimeoutError("no answer from the router rpc")
        out = pb.Envelope()
        out.ParseFromString(sock.recv_multipart()[0])
        if out.WhichOneof("body") != "token_event":
            return out, events
        events.append(out.token_event)
        if out.token_event.final:
            return out, events


def test_rpc(ctx, ids, want):
    sock = secure(ctx.socket(zmq.DEALER), h.keys, name="client-e2e")  # an outside caller's key
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(RPC_EP)
    env = pb.Envelope()
    env.corr = 1
    g = env.generate
    g.request_id = "rpc-1"
    g.prompt_ids.extend(ids)
    g.max_tokens = len(want)
    g.ignore_eos = True
    g.params.temperature = 0
    _, events = rpc_call(sock, env)
    check(len(events) == 1 and events[0].final and list(events[0].ids) == want,
          "rpc non-streamed: %s" % events)
    check(events and events[0].finish == pb.FINISH_LENGTH and events[0].completion_tokens == len(want),
          "rpc finish/usage")
    g.request_id = "rpc-2"
    g.stream = True
    _, events = rpc_call(sock, env)
    streamed = [t for e in events for t in e.ids]
    check(streamed == want and events[-1].final and all(not e.final for e in events[:-1]),
          "rpc streamed: %s" % streamed)
    # cancel: a long request, cancelled after its first token
    g.request_id = "rpc-3"
    g.max_tokens = 200
    env.version = pb.PROTOCOL_VERSION_CURRENT
    sock.send_multipart([env.SerializeToString()])
    assert sock.poll(30000)
    cancel = pb.Envelope()
    cancel.version = pb.PROTOCOL_VERSION_CURRENT
    cancel.cancel.request_id = "rpc-3"
    sock.send_multipart([cancel.SerializeToString()])
    final = None
    while final is None and sock.poll(30000):
        out = pb.Envelope()
        out.ParseFromString(sock.recv_multipart()[0])
        if out.token_event.final:
            final = out.token_event
    check(final is not None and final.finish == pb.FINISH_CANCELLED, "rpc cancel: %s" % final)
    # bad frames: garbage, wrong version, no body, an extra frame; each gets an error
    bad = [b"\xff\xff\xff garbage"]
    e = pb.Envelope(version=99, corr=5)
    e.health_request.SetInParent()
    bad.append(e.SerializeToString())
    bad.append(pb.Envelope(version=pb.PROTOCOL_VERSION_CURRENT, corr=6).SerializeToString())
    for frame in bad:
        sock.send_multipart([frame])
        ok = sock.poll(5000)
        reply = pb.Envelope()
        if ok:
            reply.ParseFromString(sock.recv_multipart()[0])
        check(ok and reply.WhichOneof("body") == "error", "bad rpc frame not answered with error")
    e = pb.Envelope(version=pb.PROTOCOL_VERSION_CURRENT, corr=7)
    e.generate.request_id = "x"
    sock.send_multipart([e.SerializeToString(), b"unexpected tensor"])
    ok = sock.poll(5000)
    reply = pb.Envelope()
    if ok:
        reply.ParseFromString(sock.recv_multipart()[0])
    check(ok and reply.WhichOneof("body") == "error", "generate with an extra frame accepted")
    # invalid generate requests get a final error event
    env = pb.Envelope(corr=8)
    env.generate.request_id = "rpc-bad"
    env.generate.prompt_ids.extend([1, 10 ** 6])
    _, events = rpc_call(sock, env)
    check(events and events[-1].final and events[-1].finish == pb.FINISH_ERROR,
          "rpc out-of-vocab id not rejected")
    # and it still serves
    env = pb.Envelope(corr=9)
    env.generate.request_id = "rpc-4"
    env.generate.prompt_ids.extend(ids)
    env.generate.max_tokens = len(want)
    env.generate.ignore_eos = True
    _, events = rpc_call(sock, env)
    check(events and list(events[-1].ids) == want, "rpc after bad frames")
    sock.close()


def main():
    global HTTP_PORT, RPC_EP, MODEL_NAME
    cfg, ports = config()
    HTTP_PORT = ports["http"]
    RPC_EP = "tcp://127.0.0.1:%d" % ports["rpc"]
    MODEL_NAME = os.path.basename(os.path.abspath(MODEL))
    start([os.path.join(BUILD, "router/cpm-router"), "--config", cfg], "router")
    if not NODE and not OVERLOAD:
        test_not_ready()
    if HAS_TOKENIZER:
        start([os.path.join(BUILD, "services/tokenizer/cpm-tokenizer"), "--config", cfg, "--index",
               "0"], "tokenizer")
    for i in range(N_STAGES):
        start([os.path.join(BUILD, "shard/cpm-shard"), "--config", cfg, "--index", str(i)],
              "stage%d" % i)
    start([os.path.join(BUILD, "services/sampler/cpm-sampler"), "--config", cfg, "--index", "0"],
          "sampler")
    deadline = time.time() + 60
    while True:
        try:
            if request("GET", "/ready", timeout=2)[0] == 200:
                break
        except OSError:
            pass
        if time.time() > deadline or any(p.poll() is not None for p in procs):
            print("cluster did not become ready; logs in", TMP)
            return 1
        time.sleep(0.2)
    if NODE:
        out = subprocess.run(["node", os.path.join(NODE_DIR, "openai_chat.mjs"),
                              "http://127.0.0.1:%d/v1" % HTTP_PORT, MODEL_NAME],
                             capture_output=True, text=True, timeout=120)
        print(out.stdout, out.stderr)
        check(out.returncode == 0, "openai npm client failed")
        return 1 if failures else 0
    with open(os.path.join(MODEL, "ids.txt")) as f:
        ids = [int(t) for t in f.read().split()]
    if OVERLOAD:
        test_overload(ids)
        if HAS_TOKENIZER:
            test_tokenizer_stalled(ids)
        return 1 if failures else 0
    with open(os.path.join(MODEL, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    prompts = [ids, ids[:5], ids[3:14], [1]]
    test_greedy_matches_cpm_run(prompts)
    test_stream_equals_non_stream(ids)
    if HAS_TOKENIZER:
        test_chat(ids)
        test_json_mode()
        test_text_prompt(ids)
        test_stop_strings(ids)
        test_special_tokens(ids)
        test_logprob_texts(ids)
    else:
        test_no_tokenizer()
    test_concurrent([ids[: 2 + (i * 7) % (len(ids) - 1)] for i in range(16)])
    test_n_and_seed(ids[:6])
    test_sampling_extras(ids)
    test_bad_input(vocab)
    test_disconnect_cancels(ids)
    test_rpc(zmq.Context(), ids, cpm_run(ids, 10))
    test_metrics()
    test_access_log(ids)
    for p in procs:
        check(p.poll() is None, "%s exited (rc %s)" % (p.args[0], p.poll()))
    return 1 if failures else 0


if __name__ == "__main__":
    try:
        rc = main()
    finally:
        stop_all()
    router_rc = procs[0].returncode if procs else None
    if rc == 0 and router_rc not in (0, None):
        print("router exited with", router_rc)
        rc = 1
    print("router e2e:", "ok" if rc == 0 else "FAILED (logs in %s)" % TMP)
    if rc == 0:
        shutil.rmtree(TMP, ignore_errors=True)  # logs are kept only when something failed
    sys.exit(rc)
