#!/usr/bin/python3
"""router_web.py - the web chat page (GET /) in a real browser.

A cluster on the tokenizer's random-weight model under `cpm-cluster up`; Debian's headless
Chromium, driven by puppeteer-core (tests/e2e/browser), loads http://127.0.0.1:PORT/, sends
a message with greedy sampling and reads the streamed answer from the page; then starts a
long answer and presses Stop. Checked:

1. the page is served with its security headers; the model line shows the model;
2. the answer the page shows was streamed (seen at several lengths as it came) and equals,
   character for character, the same request made to the API directly (no stream);
   no script error on the page; the glance shows a tokens/s figure;
3. Stop ends a long answer early, marked "stopped".
A screenshot is kept as chat-page.png in the build's meson-logs folder.

usage: router_web.py BUILD_DIR MODEL_DIR (skips, 77, without node, the npm modules or chromium)
"""
import json
import os
import shutil
import subprocess
import sys

from harness import E2E

MESSAGE = "Hello! Who are you?"
HERE = os.path.dirname(os.path.abspath(__file__))
BROWSER_DIR = os.path.join(HERE, "browser")

h = E2E("cpm-web-")
fail = h.fail


def main():
    chromium = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    if not shutil.which("node") or not os.path.isdir(os.path.join(BROWSER_DIR, "node_modules")) \
            or not os.path.exists(chromium):
        print("SKIP: needs node, tests/e2e/browser/node_modules (npm ci) and %s" % chromium)
        sys.exit(77)
    ports = h.ports("http", "rpc", "results", "tok", "smp", "st0")
    cfg = h.write_config(h.cluster_lines(ports, [{"layers": "[0, end]", "endpoint": "st0"}]))
    launcher, port = h.up(cfg, ports["http"])

    import http.client
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.request("GET", "/")
    r = c.getresponse()
    status, body, headers = r.status, r.read().decode(), dict(r.getheaders())
    c.close()
    csp = headers.get("Content-Security-Policy", "")
    if status != 200 or "<title>cpm-cluster chat</title>" not in body or "connect-src 'self'" not in csp \
            or headers.get("X-Content-Type-Options") != "nosniff":
        fail("GET /: %s %r %r" % (status, body[:80], headers))
    print("ok 1 - GET / serves the chat page with its security headers")

    shot = os.path.join(h.build, "meson-logs", "chat-page.png")
    run = subprocess.run(["node", os.path.join(BROWSER_DIR, "chat_page.mjs"),
                          "http://127.0.0.1:%d/" % port, shot, MESSAGE],
                         capture_output=True, text=True, timeout=240, cwd=BROWSER_DIR)
    try:
        page = json.loads(run.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        fail("the browser script: rc %s\n%s\n%s" % (run.returncode, run.stdout[-2000:], run.stderr[-2000:]))
    if page.get("failure"):
        fail("in the browser: %s\nconsole: %s" % (page["failure"], page.get("console")))
    errors = [c for c in page["console"] if c.startswith(("error", "pageerror"))]
    if errors:
        fail("script errors on the page: %s" % errors)
    if "minicpm4" not in page["model"]:
        fail("model line: %r" % page["model"])
    _, direct = h.http_json(port, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": MESSAGE}], "temperature": 0, "top_p": 0.8,
        "max_tokens": 48})
    want = direct["choices"][0]["message"]["content"]
    answer = page["answer"]
    if answer["error"] or answer["text"] != want or not want:
        fail("the page showed %r (%s), the API says %r" % (answer["text"], answer["meta"], want))
    if page["updates"] < 2 or "tok/s" not in page["glance"] or "finish:" not in answer["meta"]:
        fail("not streamed? %d updates, glance %r, meta %r" % (page["updates"], page["glance"], answer["meta"]))
    print("ok 2 - the page streamed an answer (seen at %d lengths; %s) equal to the API's own: %r"
          % (page["updates"], answer["meta"], want[:60]))
    if page.get("stopped") != "stopped":
        fail("Stop: %r" % page.get("stopped"))
    print("ok 3 - Stop ended a long answer early; screenshot %s" % shot)
    launcher.terminate()
    if launcher.wait(30) != 0:
        fail("launcher exit %s" % launcher.returncode)
    h.procs.clear()


h.run(main)
