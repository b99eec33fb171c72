#!/usr/bin/env python3
"""Writes the seed corpora of the checkpoint fuzz targets (standard library only).

corpus/safetensors: small valid files and one file per kind of header defect.
corpus/torch_pickle: the data.pkl of every archive in tests/data/checkpoints
(made by make_fixtures.py the way torch.save does) plus hand-written hostile
pickles. Run from this directory: python3 make_corpus.py
"""
import json
import os
import struct
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "..", "data", "checkpoints")


def st_file(header, data=b""):
    text = json.dumps(header, separators=(",", ":")) if not isinstance(header, str) else header
    raw = text.encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def safetensors_seeds():
    f32 = struct.pack("<4f", 1.0, 2.0, 3.0, 4.0)
    ok = {"__metadata__": {"format": "pt"},
          "a.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
          "b.weight": {"dtype": "BF16", "shape": [4], "data_offsets": [16, 24]},
          "e.weight": {"dtype": "F16", "shape": [0, 3], "data_offsets": [24, 24]},
          "ids": {"dtype": "I64", "shape": [1], "data_offsets": [24, 32]}}
    yield "valid", st_file(ok, f32 + b"\x80\x3f" * 4 + b"\0" * 8)
    yield "valid_one", st_file({"x": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}},
                               f32[:4])
    yield "overlap", st_file({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                              "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}},
                             b"\0" * 24)
    yield "past_end", st_file({"a": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]}},
                              f32)
    yield "bad_size", st_file({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}},
                              f32)
    yield "begin_after_end", st_file({"a": {"dtype": "U8", "shape": [1],
                                            "data_offsets": [4, 3]}}, f32)
    yield "overflow", st_file({"a": {"dtype": "F32", "shape": [2**62, 8],
                                     "data_offsets": [0, 16]}}, f32)
    yield "duplicate", st_file('{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},'
                               '"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}', b"ab")
    yield "bad_json", st_file('{"a":{"dtype":"F32","shape":[1],', f32)
    yield "header_past_end", struct.pack("<Q", 4096) + b"{}"
    yield "short", b"\x02\0\0"


def pickle_seeds():
    for root, _, files in os.walk(FIXTURES):
        for name in sorted(files):
            if not name.endswith(".bin"):
                continue
            path = os.path.join(root, name)
            with zipfile.ZipFile(path) as z:
                for info in z.infolist():
                    if info.filename.endswith("/data.pkl"):
                        tag = os.path.basename(root) + "_" + name.replace(".bin", "")
                        yield tag, z.read(info)
    yield "evil_global", b"\x80\x02cos\nsystem\nX\x02\x00\x00\x00ls\x85R."
    yield "stack_global", b"\x80\x04\x8c\x02os\x8c\x06system\x93."
    yield "deep_lists", b"\x80\x02" + b"]" * 5000 + b"."
    yield "marks", b"\x80\x02" + b"(" * 5000 + b"."
    yield "memo_far", b"\x80\x02}r\x00\x00\x00\x40."
    yield "long1", b"\x80\x02\x8a\x05\x00\x00\x00\x00\x01."


def write(dirname, seeds):
    out = os.path.join(HERE, "corpus", dirname)
    os.makedirs(out, exist_ok=True)
    for name, data in seeds:
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)


if __name__ == "__main__":
    write("safetensors", safetensors_seeds())
    write("torch_pickle", pickle_seeds())
