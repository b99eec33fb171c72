#!/usr/bin/python3
"""oracle_spm.py - the reference side of the tokenizer.model parity test: Debian's
SentencePiece (python3-sentencepiece) encodes each text segment, with what the HF
Llama tokenizer (legacy=True) adds around it: the text is split on the special
tokens of tokenizer_config.json (leftmost, longest first), every non-empty segment
gets the "▁" prefix (spaces become "▁"), special tokens map to their ids, and bos
leads when add_bos_token is true.

  oracle_spm.py MODEL_DIR corpus.jsonl   -> one line of ids per string
"""
import json
import sys

import sentencepiece as spm

SPACE = "\u2581"


def load_specials(model_dir):
    with open(model_dir + "/tokenizer_config.json", encoding="utf-8") as f:
        cfg = json.load(f)
    specials = {t["content"]: int(i) for i, t in cfg.get("added_tokens_decoder", {}).items()}
    return specials, cfg.get("add_bos_token", True)


def split_specials(text, specials):
    """Yields (segment, None) and (None, id) in text order; leftmost-longest match."""
    tokens = sorted(specials, key=len, reverse=True)
    pos = start = 0
    while pos < len(text):
        hit = next((t for t in tokens if text.startswith(t, pos)), None)
        if hit is None:
            pos += 1
            continue
        if pos > start:
            yield text[start:pos], None
        yield None, specials[hit]
        pos = start = pos + len(hit)
    if start < len(text):
        yield text[start:], None


def encode(sp, text, specials, add_bos):
    ids = [sp.bos_id()] if add_bos else []
    for seg, sid in split_specials(text, specials):
        if sid is not None:
            ids.append(sid)
        else:
            ids += sp.encode(SPACE + seg.replace(" ", SPACE))
    return ids


def main():
    model_dir, corpus = sys.argv[1], sys.argv[2]
    sp = spm.SentencePieceProcessor(model_file=model_dir + "/tokenizer.model")
    specials, add_bos = load_specials(model_dir)
    out = []
    with open(corpus, encoding="utf-8") as f:
        for line in f:
            out.append(" ".join(map(str, encode(sp, json.loads(line), specials, add_bos))))
    sys.stdout.write("\n".join(out) + ("\n" if out else ""))


if __name__ == "__main__":
    main()
