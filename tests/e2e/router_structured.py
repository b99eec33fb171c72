#!/usr/bin/python3
"""router_structured.py - constrained decoding checked by clients nobody here wrote.

Two random-weight clusters (router, tokenizer, one stage, the real sampler):
  * MiniCPM4: the golden model with the real tokenizer (MODEL_DIR, ChatML; tools switch it
    to MiniCPM3's tool format);
  * MiniCPM3: a tiny model made here by cpm-gen-model with MiniCPM3's official tool-calling
    chat template.
On each, tests/e2e/node/structured.mjs drives the official `openai` npm client, LangChain.js
(@langchain/openai) and the Vercel AI SDK (ai + @ai-sdk/openai) through response_format
json_schema / json_object and forced tool calls, with ajv as the oracle: whatever the
random weights choose, every document must parse and validate against its schema, and every
forced call must name an allowed tool with arguments valid against its parameters. A schema
outside the subset must come back to each client as a 400.

Exits 77 (skipped) without node or tests/e2e/node/node_modules (`npm ci` there).

usage: router_structured.py BUILD_DIR MINICPM4_MODEL_DIR
  CPM_HOLD=1 keeps each cluster up (prints its URL) until Enter, to run structured.mjs by hand.
"""
import json
import os
import shutil
import subprocess
import sys
import time

NODE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "node")
TEMPLATES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tokenizer", "templates")
NEEDED = ["openai", "ajv", "ai", "@ai-sdk/openai", "@langchain/openai", "@langchain/core"]

if not shutil.which("node"):
    print("node not found: skipped")
    sys.exit(77)
missing = [p for p in NEEDED if not os.path.isdir(os.path.join(NODE_DIR, "node_modules", p))]
if missing:
    print("npm packages not installed (run `npm ci` in tests/e2e/node): %s: skipped" % missing)
    sys.exit(77)

from harness import E2E  # noqa: E402  (after the skip: it needs nothing, but says so first)

h = E2E("cpm-router-structured-", sys.argv[1], sys.argv[2])


def gen_minicpm3():
    """A tiny random MiniCPM3 (MLA) with the real 73448-token tokenizer and MiniCPM3's
    tool-calling template."""
    out = h.path("minicpm3")
    subprocess.run([os.path.join(h.build, "tools", "cpm-gen-model"), "--variant", "minicpm3-4b",
                    "--out", out, "--layers", "2", "--hidden", "64", "--inter", "128",
                    "--heads", "2", "--kv-heads", "2", "--dtype", "f32"], check=True,
                   stdout=subprocess.DEVNULL)
    path = os.path.join(out, "tokenizer_config.json")
    cfg = json.load(open(path))
    cfg["chat_template"] = open(os.path.join(TEMPLATES, "minicpm3_tool.jinja")).read()
    json.dump(cfg, open(path, "w"))
    return out


def start_cluster(model, label):
    ports = h.ports("http", "rpc", "results", "tok", "smp", "st0")
    cfg = h.write_config(h.cluster_lines(ports, [{"layers": "[0, end]", "endpoint": "st0"}],
                                         router=["max_tokens: 512"], model=model),
                         name=label + ".yaml")
    h.start_service(cfg, "router", 0, "router-" + label)
    h.start_service(cfg, "tokenizer", 0, "tok-" + label)
    h.start_service(cfg, "stage", 0, "stage-" + label)
    h.start_service(cfg, "sampler", 0, "sampler-" + label)
    h.wait_ready(ports["http"], limit=60)
    return ports["http"]


def run_clients(port, model, label):
    url = "http://127.0.0.1:%d/v1" % port
    name = os.path.basename(model)  # the router serves the model by its folder's name
    if os.environ.get("CPM_HOLD"):
        print("%s cluster up: node tests/e2e/node/structured.mjs %s %s   (Enter goes on)"
              % (label, url, name), flush=True)
        sys.stdin.readline()
    t0 = time.time()
    try:
        out = subprocess.run(["node", os.path.join(NODE_DIR, "structured.mjs"), url, name],
                             capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as e:
        h.fail("%s: structured.mjs ran past 240 s\n%s\n%s" % (label, e.stdout, e.stderr))
    print(out.stdout.rstrip())
    if out.stderr.strip():
        print(out.stderr.rstrip())
    print("%s: clients took %.1f s" % (label, time.time() - t0), flush=True)
    h.check(out.returncode == 0, "%s: third-party clients (structured.mjs) failed" % label)
    for name, p in h.procs.items():
        h.check(p.poll() is None, "%s exited (rc %s)" % (name, p.poll()))


def main():
    # CPM_STRUCTURED_MODELS=minicpm3 (or minicpm4): one cluster only, by hand
    which = os.environ.get("CPM_STRUCTURED_MODELS", "minicpm4,minicpm3").split(",")
    if "minicpm4" in which:
        port = start_cluster(h.model, "minicpm4")
        run_clients(port, h.model, "minicpm4")
        h.stop_cleanly("MiniCPM4 cluster")
    if "minicpm3" in which:
        model = gen_minicpm3()
        port = start_cluster(model, "minicpm3")
        run_clients(port, model, "minicpm3")
        h.stop_cleanly("MiniCPM3 cluster")


if __name__ == "__main__":
    h.run(main)
