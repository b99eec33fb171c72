#!/usr/bin/env python3
"""Writes the tiny checkpoints that tests/unit/test_checkpoint.c loads.

Uses only the standard library (no torch here). The torch archives are made the
way torch.save makes them: the real `pickle.Pickler` at protocol 2 with torch's
persistent_id convention, over stand-in classes registered as `torch.*Storage`
and `torch._utils._rebuild_tensor_v2`, inside a zip whose entries are STORED and
64-byte aligned by an "FB" padding extra field, as PyTorchStreamWriter does.

Run from this directory: python3 make_fixtures.py
"""
import collections
import os
import pickle
import struct
import sys
import types
import zlib

# ---- stand-ins for the torch names that torch.save pickles by reference ----
torch = types.ModuleType("torch")
torch_utils = types.ModuleType("torch._utils")
sys.modules["torch"] = torch
sys.modules["torch._utils"] = torch_utils
torch._utils = torch_utils


def _rebuild_tensor_v2(*args):
    raise RuntimeError("never called: only pickled by name")


_rebuild_tensor_v2.__module__ = "torch._utils"
torch_utils._rebuild_tensor_v2 = _rebuild_tensor_v2

STORAGE_FORMATS = {  # class -> (struct format, element size)
    "FloatStorage": ("<f", 4),
    "HalfStorage": ("<e", 2),
    "BFloat16Storage": (None, 2),
    "LongStorage": ("<q", 8),
}
for _name in STORAGE_FORMATS:
    _cls = type(_name, (), {})
    _cls.__module__ = "torch"
    setattr(torch, _name, _cls)


def bf16_bytes(values):
    out = b""
    for v in values:
        bits = struct.unpack("<I", struct.pack("<f", v))[0]
        assert bits & 0xFFFF == 0, "fixture values must be exact in bf16"
        out += struct.pack("<H", bits >> 16)
    return out


class Storage:
    def __init__(self, cls, key, values):
        fmt, self.elsize = STORAGE_FORMATS[cls]
        self.cls = getattr(torch, cls)
        self.key = key
        self.numel = len(values)
        if fmt is None:
            self.data = bf16_bytes(values)
        else:
            self.data = b"".join(struct.pack(fmt, v) for v in values)


class Tensor:
    """Pickles like torch.Tensor.__reduce_ex__ for a plain CPU tensor."""

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset = storage, offset
        self.size, self.stride = tuple(size), tuple(stride)

    def __reduce_ex__(self, proto):
        return (_rebuild_tensor_v2,
                (self.storage, self.offset, self.size, self.stride, False,
                 collections.OrderedDict()))


class TorchPickler(pickle.Pickler):
    def persistent_id(self, obj):  # torch/serialization.py _save
        if isinstance(obj, Storage):
            return ("storage", obj.cls, obj.key, "cpu", obj.numel)
        return None


def state_dict(tensors):
    """An OrderedDict with the _metadata attribute nn.Module.state_dict sets."""
    sd = collections.OrderedDict(tensors)
    sd._metadata = collections.OrderedDict([("", {"version": 1}), ("model", {"version": 1})])
    return sd


# ---- zip, as miniz writes it for PyTorchStreamWriter ----
def dos_time():
    return 0, (0 << 9) | (1 << 5) | 1  # 1980-01-01 00:00


class ZipWriter:
    def __init__(self, zip64_end=False, zip64_extra=False):
        self.out = bytearray()
        self.central = bytearray()
        self.count = 0
        self.zip64_end = zip64_end      # ZIP64 end records even when not needed
        self.zip64_extra = zip64_extra  # sizes/offsets moved to ZIP64 extra fields

    def add(self, name, data, method=0):
        name_b = name.encode()
        crc = zlib.crc32(data) & 0xFFFFFFFF
        stored = data
        if method == 8:
            comp = zlib.compressobj(9, zlib.DEFLATED, -15)
            stored = comp.compress(data) + comp.flush()
        offset = len(self.out)
        start = offset + 30 + len(name_b) + 4
        pad = (64 - start % 64) % 64
        extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
        t, d = dos_time()
        self.out += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, method, t, d, crc,
                                len(stored), len(data), len(name_b), len(extra))
        self.out += name_b + extra
        assert method != 0 or len(self.out) % 64 == 0
        self.out += stored
        if self.zip64_extra:
            cextra = struct.pack("<HHQQQ", 1, 24, len(data), len(stored), offset)
            sizes = (0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF)
        else:
            cextra = b""
            sizes = (len(stored), len(data), offset)
        self.central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 0x031E, 20, 0, method,
                                    t, d, crc, sizes[0], sizes[1], len(name_b), len(cextra),
                                    0, 0, 0, 0, sizes[2])
        self.central += name_b + cextra
        self.count += 1

    def finish(self):
        cd_off = len(self.out)
        self.out += self.central
        cd_size = len(self.central)
        if self.zip64_end:
            z64 = len(self.out)
            self.out += struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 0x031E, 45, 0, 0,
                                    self.count, self.count, cd_size, cd_off)
            self.out += struct.pack("<IIQI", 0x07064B50, 0, z64, 1)
        self.out += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, self.count, self.count,
                                cd_size, cd_off, 0)
        return bytes(self.out)


def torch_save(tensors, archive, zip64=False, compress_storage=None):
    buf = __import__("io").BytesIO()
    TorchPickler(buf, protocol=2).dump(state_dict(tensors))
    storages = {}
    for t in tensors.values():
        storages[t.storage.key] = t.storage
    z = ZipWriter(zip64_end=zip64, zip64_extra=zip64)
    z.add(archive + "/data.pkl", buf.getvalue())
    z.add(archive + "/.format_version", b"1")
    z.add(archive + "/.storage_alignment", b"64")
    z.add(archive + "/byteorder", b"little")
    for key in sorted(storages, key=int):
        z.add(archive + "/data/" + key, storages[key].data,
              method=8 if key == compress_storage else 0)
    z.add(archive + "/version", b"3\n")
    z.add(archive + "/.data/serialization_id", b"1234567890123456789012345678901234567890")
    return z.finish()


# ---- the fixture tensors ----
def fixture_tensors():
    emb = Storage("BFloat16Storage", "0", [0.5 * i - 2.0 for i in range(12)])
    norm = Storage("FloatStorage", "1", [1.0, 1.5, -2.25])
    q = Storage("HalfStorage", "2", [0.25 * i for i in range(6)])
    # lm_head is the transpose of a 2x3 row-major storage: size (3,2), stride (1,3).
    head = Storage("FloatStorage", "3", [1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    # up and down share one storage; down starts at storage_offset 4.
    mlp = Storage("FloatStorage", "4", [10.0, 11.0, 12.0, 13.0, 20.0, 21.0, 22.0, 23.0])
    pos = Storage("LongStorage", "5", [0, 1, 2, 3, 4])
    return collections.OrderedDict([
        ("model.embed_tokens.weight", Tensor(emb, 0, (4, 3), (3, 1))),
        ("model.norm.weight", Tensor(norm, 0, (3,), (1,))),
        ("model.layers.0.self_attn.q_proj.weight", Tensor(q, 0, (2, 3), (3, 1))),
        ("lm_head.weight", Tensor(head, 0, (3, 2), (1, 3))),
        ("model.layers.0.mlp.up_proj.weight", Tensor(mlp, 0, (2, 2), (2, 1))),
        ("model.layers.0.mlp.down_proj.weight", Tensor(mlp, 4, (2, 2), (2, 1))),
        ("model.position_ids", Tensor(pos, 0, (1, 5), (5, 1))),
    ])


CONFIG = '{\n  "architectures": ["MiniCPMForCausalLM"],\n  "hidden_size": 3\n}\n'
TOKENIZER_CONFIG = '{\n  "tokenizer_class": "LlamaTokenizer"\n}\n'


def write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)


def main():
    ts = fixture_tensors()
    write("tiny-torch/pytorch_model.bin", torch_save(ts, "pytorch_model"))
    write("tiny-torch/config.json", CONFIG)
    write("tiny-torch/tokenizer_config.json", TOKENIZER_CONFIG)
    write("tiny-torch-zip64/pytorch_model.bin", torch_save(ts, "archive", zip64=True))
    write("tiny-torch-deflated/pytorch_model.bin",
          torch_save(ts, "pytorch_model", compress_storage="1"))
    # Two shards; the shared mlp storage stays whole in the second one.
    names = list(ts)
    parts = [collections.OrderedDict((n, ts[n]) for n in names[:3]),
             collections.OrderedDict((n, ts[n]) for n in names[3:])]
    weight_map = collections.OrderedDict()
    for i, part in enumerate(parts):
        fname = "pytorch_model-%05d-of-00002.bin" % (i + 1)
        write("tiny-torch-sharded/" + fname, torch_save(part, fname[:-4]))
        for n in part:
            weight_map[n] = fname
    import json
    write("tiny-torch-sharded/pytorch_model.bin.index.json",
          json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}, indent=2) + "\n")


if __name__ == "__main__":
    main()
