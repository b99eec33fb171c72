#!/usr/bin/python3
"""chat_parity.py - renders chat_cases.json with the official templates (render_official.mjs,
HF's Jinja in Node) and with the C renderer (chat_render), and requires identical text.
  chat_parity.py CHAT_RENDER_BIN ASSETS_DIR
"""
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def lines(cmd):
    p = subprocess.run(cmd, capture_output=True)
    sys.stderr.write(p.stderr.decode(errors="replace"))
    if p.returncode != 0:
        raise SystemExit("failed: %s (exit %d)" % (" ".join(cmd), p.returncode))
    return [json.loads(l) for l in p.stdout.decode("utf-8").split("\n") if l]


def main():
    render_bin, assets = sys.argv[1], sys.argv[2]
    if not os.path.isdir(os.path.join(HERE, "node_modules", "@huggingface", "jinja")):
        raise SystemExit("tests/tokenizer/node_modules missing: run `npm ci` in tests/tokenizer")
    cases_path = os.path.join(HERE, "chat_cases.json")
    with open(cases_path, encoding="utf-8") as f:
        cases = json.load(f)
    want = lines(["node", os.path.join(HERE, "render_official.mjs"), cases_path, assets])
    got = lines([render_bin, cases_path, os.path.join(assets, "minicpm3")])
    failed = 0
    for c, w, g in zip(cases, want, got):
        if w != g:
            failed += 1
            print("MISMATCH %s\n  official: %r\n  ours:     %r" % (c["name"], w, g))
    failed += abs(len(cases) - len(got)) + abs(len(cases) - len(want))
    print("%d passed, %d failed" % (len(cases) - failed, failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
