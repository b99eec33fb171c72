#!/usr/bin/python3
"""parity.py - the tokenizer acceptance test: cpm-tokenize against the reference
tokenizers on the committed corpus (>= 2000 strings).

  --oracle hf : HF `tokenizers` (Rust, npm @anush008/tokenizers) on tokenizer.json:
                encode ids, and decode text of the same ids, must be identical.
  --oracle spm: Debian's SentencePiece with the HF Llama "▁" handling (oracle_spm.py)
                on tokenizer.model: encode ids identical; decode equals what the HF
                decoder yields ("<s>" + each special verbatim + " " + each segment).
Both: decode(encode(text), skip_special) == text for every text without special tokens
(with "▁" read as " ", which is what the references do too).
Exit 0 only with zero mismatches. Needs `npm ci` in tests/tokenizer for --oracle hf.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys

SPACE = "\u2581"
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import gen_corpus  # noqa: E402
import oracle_spm  # noqa: E402


def run(cmd, stdin_path=None):
    with open(stdin_path, "rb") if stdin_path else open(os.devnull, "rb") as f:
        p = subprocess.run(cmd, stdin=f, capture_output=True)
    if p.returncode != 0:
        sys.stderr.write(p.stderr.decode(errors="replace"))
        raise SystemExit("failed: %s (exit %d)" % (" ".join(cmd), p.returncode))
    return p.stdout.decode("utf-8").split("\n")[:-1]


def compare(name, got, want, texts):
    bad = [i for i in range(len(want)) if i >= len(got) or got[i] != want[i]]
    for i in bad[:5]:
        print("  %s mismatch #%d text=%r\n    want %r\n    got  %r" % (
            name, i, texts[i][:120], want[i][:200], got[i][:200] if i < len(got) else None))
    print("%-28s %d strings, %d mismatches" % (name, len(want), len(bad)))
    return len(bad) == 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenize", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--oracle", choices=["hf", "spm"], required=True)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--spm-only", action="store_true",
                    help="load the model directory's tokenizer.model, hiding its tokenizer.json")
    a = ap.parse_args()
    os.makedirs(a.workdir, exist_ok=True)
    if a.spm_only:
        only = os.path.join(a.workdir, "spm-only-" + os.path.basename(os.path.normpath(a.model)))
        os.makedirs(only, exist_ok=True)
        for name in ("tokenizer.model", "tokenizer_config.json", "added_tokens.json"):
            if os.path.exists(os.path.join(a.model, name)):
                shutil.copyfile(os.path.join(a.model, name), os.path.join(only, name))
        a.model = only
    corpus = os.path.join(HERE, "corpus.jsonl")
    with open(corpus, encoding="utf-8") as f:
        lines = f.read().split("\n")[:-1]
    texts = [json.loads(l) for l in lines]
    checks = [("corpus == gen_corpus.py output", texts == gen_corpus.generate())]
    print("%-28s %s" % ("corpus reproducible", "yes" if checks[0][1] else "NO"))

    ours = run([a.tokenize, "--model", a.model], corpus)
    if a.oracle == "hf":
        if not os.path.isdir(os.path.join(HERE, "node_modules", "@anush008")):
            raise SystemExit("tests/tokenizer/node_modules missing: run `npm ci` in tests/tokenizer")
        want = run(["node", os.path.join(HERE, "oracle_hf.js"), "encode",
                    os.path.join(a.model, "tokenizer.json"), corpus])
    else:
        import sentencepiece as spm
        sp = spm.SentencePieceProcessor(model_file=os.path.join(a.model, "tokenizer.model"))
        specials, add_bos = oracle_spm.load_specials(a.model)
        want = [" ".join(map(str, oracle_spm.encode(sp, t, specials, add_bos))) for t in texts]
    checks.append(("encode", compare("encode (%s)" % a.oracle, ours, want, texts)))

    ids_path = os.path.join(a.workdir, "ids-%s-%s.txt" % (a.oracle, os.path.basename(os.path.normpath(a.model))))
    with open(ids_path, "w") as f:
        f.write("\n".join(want) + "\n")
    our_dec = [json.loads(l) for l in run([a.tokenize, "--model", a.model, "--decode"], ids_path)]
    if a.oracle == "hf":
        want_dec = [json.loads(l) for l in run(["node", os.path.join(HERE, "oracle_hf.js"), "decode",
                                                os.path.join(a.model, "tokenizer.json"), ids_path])]
    else:
        want_dec = []
        special_text = {i: t for t, i in specials.items()}
        for t in texts:
            parts = ["<s>"] if add_bos else []
            for seg, sid in oracle_spm.split_specials(t, specials):
                parts.append(special_text[sid] if seg is None else " " + seg.replace(SPACE, " "))
            want_dec.append("".join(parts))
    checks.append(("decode", compare("decode (%s)" % a.oracle, our_dec, want_dec, texts)))

    # A literal "▁" in the text comes back as " ": the reference decoders do the same.
    plain = [i for i, t in enumerate(texts) if not any(s in t for s in ("<s>", "</s>", "<unk>", "<|"))]
    skip = [json.loads(l) for l in run([a.tokenize, "--model", a.model, "--decode", "--skip-special"], ids_path)]
    rt_want = [texts[i].replace(SPACE, " ") for i in plain]
    checks.append(("round trip", compare("round trip (no specials)", [skip[i] for i in plain], rt_want,
                                         [texts[i] for i in plain])))

    failed = sum(1 for _, ok in checks if not ok)
    print("%d passed, %d failed" % (len(checks) - failed, failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
