"""Reading a GGUF file, checked at every step: a bad file gives a clear error, never a hang.

GGUF (llama.cpp's file format, version 3) is one little-endian stream:

    magic "GGUF" | version u32 | n_tensors u64 | n_kv u64
    n_kv x      key: string | value type u32 | value          (metadata: shapes, tokenizer)
    n_tensors x name: string | n_dims u32 | dims u64[n_dims] | ggml type u32 | offset u64
    padding to `general.alignment` (default 32)
    tensor data: each tensor at data_start + offset (offsets aligned too)

    string = length u64 + UTF-8 bytes;  array = element type u32 + count u64 + elements

Dimensions are in ggml order (fastest first): a (rows, cols) matrix is stored as
dims [cols, rows]. Every count and length read from the file is checked against the
bytes that remain before anything is allocated or looped over, so a corrupted count
cannot make the reader allocate gigabytes or spin: it raises `GGUFFormatError` (a
ValueError) saying what is wrong and where. Tensors of types minillm cannot decode
are named in the error. Writing goes through the `gguf` package (`gguf_model`).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from minillm.quant.gguf import GGUFTensor
from minillm.quant.gguf_blocks import LAYOUTS, GGMLType

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
MAX_ARRAY_DEPTH = 2

# metadata value type id -> (name, struct format or None for string/array)
VALUE_TYPES: dict[int, tuple[str, str | None]] = {
    0: ("uint8", "<B"),
    1: ("int8", "<b"),
    2: ("uint16", "<H"),
    3: ("int16", "<h"),
    4: ("uint32", "<I"),
    5: ("int32", "<i"),
    6: ("float32", "<f"),
    7: ("bool", "<?"),
    8: ("string", None),
    9: ("array", None),
    10: ("uint64", "<Q"),
    11: ("int64", "<q"),
    12: ("float64", "<d"),
}


class GGUFFormatError(ValueError):
    """A file that is not a valid GGUF file (or uses what minillm does not support)."""


def _type_name(type_id: int) -> str:
    """A ggml type's name even when minillm does not support it (from the gguf package)."""
    try:
        from gguf import GGMLQuantizationType

        return f"{GGMLQuantizationType(type_id).name} ({type_id})"
    except (ImportError, ValueError):
        return f"unknown type id {type_id}"


@dataclass
class GGUFFile:
    """A parsed GGUF file: its metadata and its tensors (numpy order: (rows, cols))."""

    version: int
    metadata: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, GGUFTensor] = field(default_factory=dict)


class _Cursor:
    """Reads little-endian values from a bytes buffer; every read is bounds-checked."""

    def __init__(self, data: memoryview, where: str):
        self.data, self.pos, self.where = data, 0, where

    def fail(self, what: str) -> GGUFFormatError:
        return GGUFFormatError(f"{self.where}: {what} (at byte {self.pos} of {len(self.data)})")

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            raise self.fail(f"truncated file: {what} needs {n} bytes")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def scalar(self, fmt: str, what: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def count(self, what: str, min_item_bytes: int) -> int:
        """A u64 count of items that each take at least `min_item_bytes` of the file."""
        n = self.scalar("<Q", what)
        if n * min_item_bytes > len(self.data) - self.pos:
            raise self.fail(
                f"{what} = {n} cannot fit in the {len(self.data) - self.pos} bytes left"
            )
        return n

    def string(self, what: str) -> str:
        n = self.count(f"length of {what}", 1)
        try:
            return bytes(self.take(n, what)).decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not valid UTF-8") from None

    def value(self, type_id: int, what: str, depth: int = 0):
        if type_id not in VALUE_TYPES:
            raise self.fail(f"{what} has unknown value type {type_id}")
        name, fmt = VALUE_TYPES[type_id]
        if fmt is not None:
            return self.scalar(fmt, what)
        if name == "string":
            return self.string(what)
        if depth >= MAX_ARRAY_DEPTH:
            raise self.fail(f"{what} nests arrays deeper than {MAX_ARRAY_DEPTH}")
        item_type = self.scalar("<I", f"element type of {what}")
        if item_type not in VALUE_TYPES:
            raise self.fail(f"{what} has unknown element type {item_type}")
        item_fmt = VALUE_TYPES[item_type][1]
        size = struct.calcsize(item_fmt) if item_fmt else 8  # string / array: >= 8 bytes
        n = self.count(f"length of {what}", size)
        if item_fmt is not None:  # numeric array: one copy, no Python loop
            arr = np.frombuffer(self.take(n * size, what), dtype=np.dtype(item_fmt)).copy()
            return arr.tolist()
        return [self.value(item_type, f"{what}[{i}]", depth + 1) for i in range(n)]


def parse_gguf(data: bytes | memoryview, where: str = "GGUF data") -> GGUFFile:
    """Parse and validate a whole GGUF file held in memory."""
    cur = _Cursor(memoryview(data).cast("B"), where)
    if bytes(cur.take(4, "the magic")) != GGUF_MAGIC:
        raise GGUFFormatError(f"{where}: not a GGUF file (it does not start with b'GGUF')")
    version = cur.scalar("<I", "the version")
    if version not in SUPPORTED_VERSIONS:
        raise cur.fail(f"GGUF version {version} is not supported; supported: {SUPPORTED_VERSIONS}")
    n_tensors = cur.count("the tensor count", 8 + 4 + 4 + 8)
    n_kv = cur.count("the metadata count", 8 + 4)
    out = GGUFFile(version)
    for i in range(n_kv):
        key = cur.string(f"metadata key #{i}")
        if key in out.metadata:
            raise cur.fail(f"metadata key {key!r} appears twice")
        out.metadata[key] = cur.value(cur.scalar("<I", f"type of {key!r}"), repr(key))

    alignment = out.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment < 1 or alignment & (alignment - 1):
        raise cur.fail(f"general.alignment must be a power of two, got {alignment!r}")
    infos = []
    for i in range(n_tensors):
        name = cur.string(f"name of tensor #{i}")
        n_dims = cur.scalar("<I", f"n_dims of {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise cur.fail(f"tensor {name!r} has {n_dims} dimensions; allowed: 1 to {MAX_DIMS}")
        dims = [cur.scalar("<Q", f"dims of {name!r}") for _ in range(n_dims)]
        type_id = cur.scalar("<I", f"type of {name!r}")
        offset = cur.scalar("<Q", f"data offset of {name!r}")
        infos.append((name, dims, type_id, offset))

    data_start = -(-cur.pos // alignment) * alignment
    blob = cur.data[data_start:] if data_start <= len(cur.data) else memoryview(b"")
    for name, dims, type_id, offset in infos:
        if name in out.tensors:
            raise GGUFFormatError(f"{where}: tensor {name!r} appears twice")
        try:
            qtype = GGMLType(type_id)
        except ValueError:
            supported = ", ".join(t.name for t in GGMLType)
            raise GGUFFormatError(
                f"{where}: tensor {name!r} has type {_type_name(type_id)}, which minillm cannot "
                f"decode; supported: {supported}"
            ) from None
        layout = LAYOUTS[qtype]
        if dims[0] % layout.block_size or any(d == 0 for d in dims):
            raise GGUFFormatError(
                f"{where}: tensor {name!r} of type {qtype.name} has dims {dims}: each must be "
                f"> 0 and the first a multiple of {layout.block_size}"
            )
        n_rows = math.prod(dims[1:])
        nbytes = dims[0] // layout.block_size * layout.type_size * n_rows
        if offset % alignment or offset + nbytes > len(blob):
            raise GGUFFormatError(
                f"{where}: tensor {name!r} needs bytes [{offset}, {offset + nbytes}) of the "
                f"data section, which has {len(blob)} bytes (offsets aligned to {alignment}): "
                "the file is truncated or corrupted"
            )
        raw = np.frombuffer(blob[offset : offset + nbytes], dtype=np.uint8)
        shape = tuple(reversed(dims))  # numpy order
        out.tensors[name] = GGUFTensor(qtype, shape, raw.reshape(n_rows, -1))
    return out


def read_gguf(path: str | Path) -> GGUFFile:
    """Read and validate a .gguf file (the tensors' raw blocks are copied into memory)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such GGUF file: {path}")
    return parse_gguf(bytearray(path.read_bytes()), where=str(path))
