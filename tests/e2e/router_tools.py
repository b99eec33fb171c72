#!/usr/bin/python3
"""router_tools.py - OpenAI function calling through the whole cluster.

Three random-weight clusters (router, tokenizer, one stage, a sampler), each on a tiny model
made here with cpm-gen-model:
  * MiniCPM3 family (the official tool-calling chat template), with a scripted sampler: a test
    double that answers every sample row with the next id of a script (the tokens of a
    MiniCPM tool-call answer), so the tool-call parser runs end to end without depending on
    weights. Checked: /tokenize renders tools, assistant tool_calls, reasoning and tool
    results; a scripted call comes back as message.tool_calls (+ reasoning_content, null
    content, finish_reason tool_calls), streamed deltas reassemble to the same, n = 2 works
    per choice, a call of an unknown function and tool_choice none come back as content;
    the sample rows of tool_choice named/required and response_format carry the constraint
    (kind, schema, single_call, tokens_left) with the history; the official openai npm client
    (when installed) reads the calls whole and through its stream helper.
  * MiniCPM4 family (ChatML) with the real sampler: tools, tool_choice auto/required/named
    and response_format are accepted and answer with a well-formed chat completion (the
    sampler side of constraints is not asserted here), streamed or not.
  * MiniCPM-2B family ("<用户>"): tools get a 400 naming them.

usage: router_tools.py BUILD_DIR
"""
import json
import os
import subprocess
import sys
import threading
import time

import zmq

from harness import E2E

h = E2E("cpm-router-tools-", sys.argv[1], None)
BUILD = h.build
NODE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "node")
TEMPLATES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tokenizer", "templates")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the weather of a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "the city"},
        "days": {"type": "integer"}}, "required": ["city"]}}}
SEARCH = {"type": "function", "function": {
    "name": "search", "description": "Search the web",
    "parameters": {"type": "object", "properties": {"query": {"type": "string"}}}}}
TOOLS = [WEATHER, SEARCH]
ANSWER = ("<|thought_start|>\nI will check the weather.\n<|thought_end|>\n<|tool_call_start|>\n"
          "```python\nget_weather(city=\"Paris\", days=3)\nsearch(query='Paris {events}')\n```\n"
          "<|tool_call_end|>\n")
UNKNOWN = "<|tool_call_start|>\n```python\nlaunch(x=1)\n```\n<|tool_call_end|>\nok"


def gen_model(name, variant, template=None):
    out = h.path(name)
    subprocess.run([h.bin("cluster").replace("cpm-cluster", "cpm-gen-model"), "--variant", variant,
                    "--out", out, "--layers", "2", "--hidden", "64", "--inter", "128",
                    "--heads", "2", "--kv-heads", "2", "--dtype", "f32"], check=True,
                   stdout=subprocess.DEVNULL)
    if template:
        path = os.path.join(out, "tokenizer_config.json")
        cfg = json.load(open(path))
        cfg["chat_template"] = open(os.path.join(TEMPLATES, template)).read()
        json.dump(cfg, open(path, "w"))
    return out


class ScriptedSampler:
    """A sampler double: row r gets script[r.step] (then EOS); every row is recorded."""

    def __init__(self, endpoint, eos):
        self.sock = h.socket(zmq.ROUTER, server=True)
        self.sock.bind(endpoint)
        self.script, self.eos, self.rows = [], eos, []
        self.lock = threading.Lock()
        self.stop = False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def answer(self, env):
        out = h.envelope(env.corr)
        body = env.WhichOneof("body")
        if body == "health_request":
            out.health.service, out.health.name = "sampler", "sampler0"
            out.health.ready, out.health.incarnation = True, 4242
        elif body == "sample":
            with self.lock:
                for r in env.sample.rows:
                    self.rows.append(r)
                    t = out.sampled.tokens.add()
                    t.id = self.script[r.step] if r.step < len(self.script) else self.eos
        elif body == "hello":
            out.hello.service, out.hello.name = "sampler", "sampler0"
        else:
            out.error.code, out.error.message = -22, "scripted sampler: " + str(body)
        return out

    def run(self):
        while not self.stop:
            if not self.sock.poll(100):
                continue
            frames = self.sock.recv_multipart()
            env = h.pb.Envelope.FromString(frames[1])
            self.sock.send_multipart([frames[0], self.answer(env).SerializeToString()])

    def set_script(self, ids):
        with self.lock:
            self.script, self.rows = list(ids), []

    def taken_rows(self):
        with self.lock:
            rows, self.rows = self.rows, []
        return rows


def start_cluster(model, fake_sampler=False):
    ports = h.ports("http", "rpc", "results", "tok", "smp", "st0")
    cfg = h.write_config(h.cluster_lines(ports, [{"layers": "[0, end]", "endpoint": "st0"}],
                                         router=["max_tokens: 96"], model=model),
                         name=os.path.basename(model) + ".yaml")
    h.start_service(cfg, "router", 0, "router-" + os.path.basename(model))
    h.start_service(cfg, "tokenizer", 0, "tok-" + os.path.basename(model))
    h.start_service(cfg, "stage", 0, "stage-" + os.path.basename(model))
    sampler = None
    if fake_sampler:
        sampler = ScriptedSampler("tcp://127.0.0.1:%d" % ports["smp"], 73440)
    else:
        h.start_service(cfg, "sampler", 0, "sampler-" + os.path.basename(model))
    h.wait_ready(ports["http"], limit=60)
    return ports["http"], sampler


def post(port, path, body):
    st, text = h.req(port, "POST", path, body)
    return st, json.loads(text) if text else None


def stream(port, body):
    """The chunks of a streamed chat completion."""
    st, text = h.req(port, "POST", "/v1/chat/completions", dict(body, stream=True))
    h.check(st == 200, "stream status %s: %s" % (st, text[:300]))
    chunks = []
    for block in text.split("\n\n"):
        if block.strip() and block != "data: [DONE]":
            h.check(block.startswith("data: "), "SSE block: " + block[:100])
            chunks.append(json.loads(block[6:]))
    return chunks


def reassemble(chunks, n=1):
    """Per choice: (content, reasoning, tool calls, finish_reason) from deltas, as OpenAI's
    clients rebuild them (a call's first delta has id/type/name, arguments accumulate)."""
    out = [{"content": "", "reasoning": "", "calls": {}, "finish": None} for _ in range(n)]
    for c in chunks:
        for ch in c["choices"]:
            o, d = out[ch["index"]], ch["delta"]
            o["content"] += d.get("content") or ""
            o["reasoning"] += d.get("reasoning_content") or ""
            for tc in d.get("tool_calls") or []:
                call = o["calls"].setdefault(tc["index"], {"id": None, "name": None, "arguments": ""})
                if "id" in tc:
                    h.check(call["id"] is None and tc.get("type") == "function",
                            "a call's id and type come once, in its first delta")
                    call["id"] = tc["id"]
                if tc["function"].get("name"):
                    call["name"] = tc["function"]["name"]
                call["arguments"] += tc["function"].get("arguments") or ""
            if ch.get("finish_reason"):
                o["finish"] = ch["finish_reason"]
    return out


def text_ids(port, text):
    """The ids the model would write for text as an assistant turn (after the ChatML header)."""
    q = [{"role": "user", "content": "q"}]
    st, head = post(port, "/tokenize", {"messages": q})
    st2, full = post(port, "/tokenize", {"messages": q + [{"role": "assistant", "content": text}]})
    h.check(st == 200 and st2 == 200, "tokenize for the script")
    # the full prompt repeats the head's assistant header as its 4th-last segment: find it
    ids = full["tokens"]
    start = head["count"]
    h.check(ids[:start] == head["tokens"], "the script's prefix tokenizes alike")
    end = ids.index(73440, start)  # <|im_end|>
    return ids[start:end]


# ---------------------------------------------------------------- MiniCPM3: parser and wire

def check_tokenize(port):
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "reasoning_content": "Look it up.",
             "tool_calls": [{"id": "call_1", "type": "function", "function": {
                 "name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
    st, r = post(port, "/tokenize", {"messages": msgs, "tools": TOOLS})
    h.check(st == 200, "tokenize with tools: %s %s" % (st, r))
    p = r.get("prompt", "")
    if os.environ.get("CPM_TOOLS_DEBUG"):
        print(p)
    for want in ["def get_weather(city, days=None):", "days: Optional[int] = None", "def search(",
                 "<|thought_start|>\nLook it up.\n<|thought_end|>",
                 "<|tool_call_start|>\n```python\nget_weather(city=\"Paris\")\n```\n<|tool_call_end|>",
                 "<|im_start|>tool\nsunny, 21 C<|im_end|>", "<|im_start|>assistant\n"]:
        h.check(want in p, "rendered prompt has %r" % want)
    h.check(r["count"] == len(r["tokens"]) > 100, "tokenize count")
    st, r2 = post(port, "/tokenize", {"messages": msgs[:2]})
    h.check(st == 200 and "def get_weather" not in r2["prompt"], "no tools: no tool prompt")


def check_calls_message(m, what):
    calls = m.get("tool_calls") or []
    h.check(len(calls) == 2, "%s: two calls, got %s" % (what, m))
    if len(calls) != 2:
        return
    h.check(m["content"] is None, "%s: content null" % what)
    h.check(m.get("reasoning_content") == "I will check the weather.", "%s: reasoning" % what)
    h.check(calls[0]["type"] == "function" and calls[0]["id"].startswith("call_"), what + ": id")
    h.check(calls[0]["id"] != calls[1]["id"], what + ": ids differ")
    h.check(calls[0]["function"]["name"] == "get_weather", what + ": name")
    h.check(json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris", "days": 3},
            what + ": arguments")
    h.check(json.loads(calls[1]["function"]["arguments"]) == {"query": "Paris {events}"},
            what + ": arguments 2")


def finished(port, reason):
    """cpm_request_finished_total for one finish reason."""
    return h.metric(port, "cpm_request_finished_total", finished_reason=reason)


def check_parsed_calls(port, sampler):
    sampler.set_script(text_ids(port, ANSWER))
    body = {"messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": TOOLS,
            "max_tokens": 96, "temperature": 0}
    calls0, stops0 = finished(port, "tool_calls"), finished(port, "stop")
    st, r = post(port, "/v1/chat/completions", body)
    h.check(st == 200, "tool call: %s %s" % (st, r))
    ch = r["choices"][0]
    h.check(ch["finish_reason"] == "tool_calls", "finish_reason tool_calls: %s" % ch)
    check_calls_message(ch["message"], "whole")
    # streamed: the same, from deltas
    s = reassemble(stream(port, body))[0]
    h.check(s["finish"] == "tool_calls", "streamed finish_reason")
    # the metrics count both answers as tool_calls, not stop (whole and streamed)
    calls, stops = finished(port, "tool_calls") - calls0, finished(port, "stop") - stops0
    h.check(calls == 2 and stops == 0, "metrics: %s tool_calls and %s stop finishes for two "
            "tool-call answers" % (calls, stops))
    h.check(s["reasoning"] == "I will check the weather." and s["content"] == "",
            "streamed reasoning/content: %s" % s)
    calls = [s["calls"][k] for k in sorted(s["calls"])]
    h.check([c["name"] for c in calls] == ["get_weather", "search"], "streamed names")
    h.check([json.loads(c["arguments"]) for c in calls] ==
            [json.loads(c["function"]["arguments"]) for c in ch["message"]["tool_calls"]],
            "streamed arguments equal the whole answer's")
    # n = 2: each choice parsed on its own, ids unique across choices
    st, r = post(port, "/v1/chat/completions", dict(body, n=2))
    h.check(st == 200 and len(r["choices"]) == 2, "n=2")
    ids = [c["id"] for ch in r["choices"] for c in ch["message"].get("tool_calls") or []]
    h.check(len(ids) == 4 and len(set(ids)) == 4, "n=2: 2 calls each, unique ids: %s" % ids)
    s2 = reassemble(stream(port, dict(body, n=2)), 2)
    h.check(all(len(x["calls"]) == 2 and x["finish"] == "tool_calls" for x in s2), "n=2 streamed")
    # tool_choice none: rendered, not parsed: the text as it is
    st, r = post(port, "/v1/chat/completions", dict(body, tool_choice="none"))
    h.check(st == 200 and r["choices"][0]["message"]["content"] == ANSWER, "tool_choice none: text")
    # an unknown function: content, byte for byte
    sampler.set_script(text_ids(port, UNKNOWN))
    st, r = post(port, "/v1/chat/completions", body)
    m = r["choices"][0]["message"]
    h.check(st == 200 and m["content"] == UNKNOWN and not m.get("tool_calls") and
            r["choices"][0]["finish_reason"] == "stop", "unknown function as content: %s" % m)
    s = reassemble(stream(port, body))[0]
    h.check(s["content"] == UNKNOWN and not s["calls"], "unknown function streamed as content")


def check_constraints(port, sampler):
    """What reaches the sampler: the constraint on every row, with the history."""
    sampler.set_script([])  # EOS at once
    base = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "temperature": 0}
    cases = [
        (dict(base, tools=TOOLS, tool_choice="required"), 3, False, ["get_weather", "search"]),
        (dict(base, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "search"}}),
         3, True, ["search"]),
        (dict(base, response_format={"type": "json_object"}), 1, False, None),
        (dict(base, response_format={"type": "json_schema", "json_schema": {
            "name": "city", "schema": {"type": "object"}, "strict": True}}), 2, False, None),
        (dict(base, tools=TOOLS), 0, False, None),
    ]
    for body, kind, single, names in cases:
        st, r = post(port, "/v1/chat/completions", body)
        h.check(st == 200, "constrained request: %s %s" % (st, r))
        rows = sampler.taken_rows()
        h.check(len(rows) == 1, "one sample row, got %d" % len(rows))
        if not rows:
            continue
        c = rows[0].constraint
        h.check(c.kind == kind, "constraint kind %d, expected %d" % (c.kind, kind))
        if kind:
            h.check(c.tokens_left == 8 and len(rows[0].history) > 0, "tokens_left and history")
        if kind == 3:
            h.check(c.single_call == single, "single_call")
            h.check([t["function"]["name"] for t in json.loads(c.schema)] == names, "allowed tools")
        if kind == 2:
            h.check(json.loads(c.schema) == {"type": "object"}, "json_schema schema")


def check_bad_requests(port):
    base = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    bad = [
        (dict(base, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}),
         "tool_choice"),
        (dict(base, tool_choice="required"), "tool_choice"),
        (dict(base, tools=[{"type": "function", "function": {"name": "bad name"}}]),
         "tools[0].function"),
        (dict(base, functions=[{"name": "f"}]), "functions"),
        (dict(base, messages=[{"role": "tool", "content": "x"}]), "messages[0]"),
    ]
    for body, param in bad:
        st, r = post(port, "/v1/chat/completions", body)
        h.check(st == 400 and r["error"]["param"] == param, "400 naming %s: %s %s" % (param, st, r))


def check_node_client(port, sampler):
    if not os.path.isdir(os.path.join(NODE_DIR, "node_modules", "openai")):
        print("openai npm client not installed (npm ci in tests/e2e/node): its check skipped")
        return
    sampler.set_script(text_ids(port, ANSWER))
    out = subprocess.run(["node", os.path.join(NODE_DIR, "openai_tools.mjs"),
                          "http://127.0.0.1:%d/v1" % port, "m3"],
                         capture_output=True, text=True, timeout=120)
    print(out.stdout, out.stderr)
    h.check(out.returncode == 0, "openai npm client: tool calls")


# ---------------------------------------------------------------- MiniCPM4 and 2B: real sampler

def check_shapes(port):
    base = {"messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": TOOLS,
            "max_tokens": 12, "temperature": 0}
    for extra in [{}, {"tool_choice": "auto"}, {"tool_choice": "required"},
                  {"tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
                  {"tool_choice": "none"}, {"parallel_tool_calls": False},
                  {"tools": None, "response_format": {"type": "json_object"}}]:
        body = {k: v for k, v in dict(base, **extra).items() if v is not None}
        st, r = post(port, "/v1/chat/completions", body)
        h.check(st == 200, "MiniCPM4 %s: %s %s" % (extra, st, r))
        if st != 200:
            continue
        ch = r["choices"][0]
        h.check(ch["finish_reason"] in ("tool_calls", "stop", "length"), "finish %s" % ch)
        for c in ch["message"].get("tool_calls") or []:
            json.loads(c["function"]["arguments"])
        s = reassemble(stream(port, body))[0]
        h.check(s["finish"] == ch["finish_reason"], "MiniCPM4 streamed finish %s" % extra)
        h.check(s["content"] == (ch["message"]["content"] or ""), "MiniCPM4 streamed content")


def check_no_tool_format(port):
    st, r = post(port, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                 "tools": TOOLS, "max_tokens": 4})
    h.check(st == 400 and "tools" in r["error"]["message"], "MiniCPM-2B tools: 400 %s" % r)
    st, r = post(port, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                 "max_tokens": 4})
    h.check(st == 200, "MiniCPM-2B plain chat still works")


def main():
    m3 = gen_model("m3", "minicpm3-4b", "minicpm3_tool.jinja")
    port, sampler = start_cluster(m3, fake_sampler=True)
    check_tokenize(port)
    check_parsed_calls(port, sampler)
    check_constraints(port, sampler)
    check_bad_requests(port)
    check_node_client(port, sampler)
    sampler.stop = True
    h.stop_cleanly("MiniCPM3 cluster")
    m4 = gen_model("m4", "minicpm4-tiny")
    port, _ = start_cluster(m4)
    check_tokenize_chatml(port)
    check_shapes(port)
    h.stop_cleanly("MiniCPM4 cluster")
    m2 = gen_model("m2", "minicpm-2b")
    port, _ = start_cluster(m2)
    check_no_tool_format(port)
    h.stop_cleanly("MiniCPM-2B cluster")


def check_tokenize_chatml(port):
    """MiniCPM4's template is plain ChatML: tools switch it to MiniCPM3's tool format."""
    st, r = post(port, "/tokenize", {"messages": [{"role": "user", "content": "hi"}], "tools": TOOLS})
    h.check(st == 200 and "def get_weather(" in r.get("prompt", ""), "MiniCPM4 renders tools")


if __name__ == "__main__":
    h.run(main)
