"""A minimal GGUF reader/writer for building broken files on purpose (tests and the fuzzer).

It keeps every value as the file has it (strings as bytes, so that invalid UTF-8 survives) and
writes the header back with the same alignment, so the tensor data section stays valid after a
metadata or tensor-info edit. It reads well-formed files only: the fuzzer breaks them afterwards.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

# GGUF value types
U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
_SCALAR = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<?",
           U64: "<Q", I64: "<q", F64: "<d"}


@dataclass
class Tensor:
    name: bytes
    dims: list
    type: int
    offset: int


@dataclass
class Gguf:
    version: int
    kvs: list = field(default_factory=list)       # [key bytes, type, value]; arrays: (elem type, [values])
    tensors: list = field(default_factory=list)   # [Tensor]
    alignment: int = 32
    data: bytes = b""

    def index(self, key: str) -> int:
        k = key.encode()
        for i, kv in enumerate(self.kvs):
            if kv[0] == k:
                return i
        raise KeyError(key)

    def get(self, key: str):
        return self.kvs[self.index(key)][2]

    def set(self, key: str, typ: int, value) -> None:
        """Sets key to value of GGUF type typ (added when absent)."""
        try:
            self.kvs[self.index(key)] = [key.encode(), typ, value]
        except KeyError:
            self.kvs.append([key.encode(), typ, value])

    def remove(self, key: str) -> None:
        del self.kvs[self.index(key)]

    def tensor(self, name: str) -> Tensor:
        n = name.encode()
        return next(t for t in self.tensors if t.name == n)


class _Reader:
    def __init__(self, data: bytes):
        self.d, self.o = data, 0

    def take(self, fmt: str):
        v = struct.unpack_from(fmt, self.d, self.o)[0]
        self.o += struct.calcsize(fmt)
        return v

    def string(self) -> bytes:
        n = self.take("<Q")
        s = self.d[self.o:self.o + n]
        self.o += n
        return s

    def value(self, typ: int):
        if typ == STRING:
            return self.string()
        if typ == ARRAY:
            et, n = self.take("<I"), self.take("<Q")
            return (et, [self.value(et) for _ in range(n)])
        return self.take(_SCALAR[typ])


def parse(data: bytes) -> Gguf:
    r = _Reader(data)
    if r.take("<4s") != b"GGUF":
        raise ValueError("not a GGUF file")
    g = Gguf(version=r.take("<I"))
    n_tensors, n_kv = r.take("<Q"), r.take("<Q")
    for _ in range(n_kv):
        key = r.string()
        typ = r.take("<I")
        g.kvs.append([key, typ, r.value(typ)])
    for kv in g.kvs:
        if kv[0] == b"general.alignment":
            g.alignment = kv[2]
    for _ in range(n_tensors):
        name = r.string()
        nd = r.take("<I")
        dims = [r.take("<Q") for _ in range(nd)]
        g.tensors.append(Tensor(name, dims, r.take("<I"), r.take("<Q")))
    start = (r.o + g.alignment - 1) // g.alignment * g.alignment
    g.data = data[start:]
    return g


def _value(typ: int, v) -> bytes:
    if typ == STRING:
        return struct.pack("<Q", len(v)) + v
    if typ == ARRAY:
        et, items = v
        return struct.pack("<IQ", et, len(items)) + b"".join(_value(et, x) for x in items)
    return struct.pack(_SCALAR[typ], v)


def header(g: Gguf) -> bytes:
    out = [b"GGUF", struct.pack("<IQQ", g.version, len(g.tensors), len(g.kvs))]
    for key, typ, v in g.kvs:
        out += [struct.pack("<Q", len(key)), key, struct.pack("<I", typ), _value(typ, v)]
    for t in g.tensors:
        out += [struct.pack("<Q", len(t.name)), t.name, struct.pack("<I", len(t.dims)),
                b"".join(struct.pack("<Q", d) for d in t.dims), struct.pack("<IQ", t.type, t.offset)]
    return b"".join(out)


def serialize(g: Gguf) -> bytes:
    h = header(g)
    pad = (-len(h)) % g.alignment
    return h + b"\0" * pad + g.data
