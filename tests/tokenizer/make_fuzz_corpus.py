#!/usr/bin/python3
"""make_fuzz_corpus.py - writes the seed corpus of tests/fuzz/fuzz_tokenizer.c into
tests/fuzz/corpus/tokenizer/ (first byte = mode, see the fuzz target). Deterministic;
needs python3-sentencepiece (for the protobuf classes of the tiny tokenizer.model)."""
import json
import os
import struct

from sentencepiece import sentencepiece_model_pb2 as mp

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "fuzz", "corpus", "tokenizer")

TEXTS = ["Hello, world! 你好，MiniCPM。", "<|im_start|>user\nhi<|im_end|>\n", "<s></s><unk>", "  \t\n",
         "😀👨‍👩‍👧 🇨🇳", "\U0010ffff\x00\x7f", "a" * 300, "<|im_start", "...---+++", "e\u0301\u3000\u2581"]

TINY_JSON = {
    "version": "1.0", "truncation": None, "padding": None,
    "added_tokens": [{"id": 0, "content": "<unk>", "single_word": False, "lstrip": False, "rstrip": False,
                      "normalized": False, "special": True},
                     {"id": 1, "content": "<s>", "single_word": False, "lstrip": False, "rstrip": False,
                      "normalized": False, "special": True}],
    "normalizer": {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u2581"},
                                                       {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]},
    "pre_tokenizer": None,
    "post_processor": {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                                                {"Sequence": {"id": "A", "type_id": 0}}],
                       "pair": [], "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
    "decoder": {"type": "Sequence", "decoders": [{"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
                                                 {"type": "ByteFallback"}, {"type": "Fuse"},
                                                 {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
    "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
              "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
              "vocab": dict([("<unk>", 0), ("<s>", 1), ("</s>", 2)] +
                            [("<0x%02X>" % b, 3 + b) for b in range(256)] +
                            [(p, 259 + i) for i, p in enumerate(["\u2581", "h", "e", "l", "o", "\u2581h", "ll", "\u2581hell", "\u2581he"])]),
              "merges": ["\u2581 h", "l l", "\u2581h e", "\u2581he ll"]},
}


def tiny_model():
    m = mp.ModelProto()
    pieces = [("<unk>", 0, 2), ("<s>", 0, 3), ("</s>", 0, 3), ("\n", 0, 4), ("...", 0, 4)]
    pieces += [("<0x%02X>" % b, 0, 6) for b in range(256)]
    pieces += [(p, -float(i), 1) for i, p in enumerate(["\u2581", "h", "e", "l", "o", "\u2581h", "ll", "\u2581he", "\u2581hell"])]
    for piece, score, typ in pieces:
        sp = m.pieces.add()
        sp.piece, sp.score, sp.type = piece, score, typ
    m.trainer_spec.model_type = 2
    m.trainer_spec.byte_fallback = True
    m.normalizer_spec.name = "identity"
    m.normalizer_spec.add_dummy_prefix = False
    m.normalizer_spec.remove_extra_whitespaces = False
    return m.SerializeToString()


def main():
    os.makedirs(OUT, exist_ok=True)
    seeds = {}
    for i, t in enumerate(TEXTS):
        seeds["text-%02d" % i] = b"\x00" + t.encode("utf-8")
    seeds["text-invalid"] = b"\x00ab\xff\xc0\xaf\xed\xa0\x80"
    seeds["ids-mixed"] = b"\x01" + struct.pack("<8I", 1, 73441, 3060, 5, 0x80000000 | 0xE4, 0x80000000 | 0xBD, 15934, 0xFFFFFFFF)
    seeds["ids-bytes"] = b"\x01" + struct.pack("<6I", *[0x80000000 | b for b in (0xF0, 0x9F, 0x98, 0x80, 0xE4, 0x41)])
    seeds["json-tiny"] = b"\x02" + json.dumps(TINY_JSON).encode("utf-8")
    seeds["model-tiny"] = b"\x03" + tiny_model()
    seeds["chat-tools"] = b"\x04" + json.dumps([{"type": "function", "function": {
        "name": "f", "description": "d", "parameters": {"type": "object", "properties": {
            "a": {"type": "string", "enum": ["x"]}, "b": {"type": ["integer", "null"], "default": 3},
            "c": {"type": "array", "items": {"type": "object", "properties": {"d": {"type": "number"}}}}},
            "required": ["a"]}}}]).encode("utf-8")
    for name, data in seeds.items():
        with open(os.path.join(OUT, name), "wb") as f:
            f.write(data)


if __name__ == "__main__":
    main()
