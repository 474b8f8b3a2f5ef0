"""A bounded GGUF header reader for the upload sniff: it walks the header without materialising it.

Layout (GGUF v2 and v3): magic `GGUF`, version u32, tensor count u64, key-value count u64, the
key-value pairs (key string, value type u32, value), the tensor infos (name string, n_dims u32,
dims u64[n_dims], ggml type u32, data offset u64), padding to `general.alignment`, tensor data.
A string is a u64 byte length and its bytes; an array is an item type u32, a u64 count and items.

Every count and length is checked against the bytes the file still holds and a fixed limit before
it is used, arrays are skipped (numeric ones in one step), only the scalar values a caller asks
for are kept, and the walk has a deadline: a hostile header costs at most `MAX_HEADER_BYTES` of
walking and the memory of what is kept. The rules follow ggml's own loader (gguf.cpp), so a file
accepted here is one llama.cpp can open.
"""

from __future__ import annotations

import math
import mmap
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from shared.errors import SharedError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
MAX_HEADER_BYTES = 64 * 1024**2  # key-values and tensor infos together; real models need a few MB
MAX_KV_COUNT = 1 << 16
MAX_TENSOR_COUNT = 1 << 16
MAX_ARRAY_ITEMS = 1 << 21  # a tokenizer's vocabulary or merges; ggml models reach about 300k
MAX_STRING_BYTES = 1 << 20  # one key, value or array item; chat templates are the longest
MAX_KEY_BYTES = 65535  # the GGUF spec's limit
MAX_TENSOR_NAME_BYTES = 63  # GGML_MAX_NAME - 1
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_PARSE_SECONDS = 20.0  # a safety net: the limits above keep a walk far shorter
DEFAULT_ALIGNMENT = 32
_DEADLINE_EVERY = 1 << 14  # array items between deadline checks

# GGUF value types (gguf.GGUFValueType) with a fixed size: struct code per type.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9

Scalar = str | int | float | bool


class GGUFHeaderError(SharedError, ValueError):
    """The file is not a well-formed GGUF within the reader's limits."""


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # ggml order: shape[0] is the row length
    type_name: str  # a GGMLQuantizationType name: F32, F16, Q8_0, ...


@dataclass
class GGUFHeader:
    version: int
    kv_count: int
    metadata: dict[str, Scalar] = field(default_factory=dict)  # only the scalar values asked for
    tensor_types: dict[str, int] = field(default_factory=dict)  # ggml type name -> tensor count
    tensors: list[GGUFTensor] | None = None  # each tensor's name, shape and type, when asked for

    @property
    def tensor_count(self) -> int:
        return sum(self.tensor_types.values())


class _Cursor:
    """Reads forward through the mapped header; every read is bounds-checked first."""

    def __init__(self, data: mmap.mmap, end: int, endian: str, deadline: float) -> None:
        self.data, self.end, self.endian, self.deadline, self.pos = data, end, endian, deadline, 0

    def take(self, size: int, what: str) -> int:
        """Advance over `size` bytes; return where they start."""
        if size < 0 or size > self.end - self.pos:
            raise GGUFHeaderError(f"{what} runs past the end of the header (truncated or over its limits)")
        start, self.pos = self.pos, self.pos + size
        return start

    def scalar(self, code: str, what: str) -> Scalar:
        fmt = self.endian + code
        value: Scalar = struct.unpack_from(fmt, self.data, self.take(struct.calcsize(fmt), what))[0]
        return value

    def count(self, what: str, limit: int, least_item_bytes: int) -> int:
        value = int(self.scalar("Q", what))
        if value > limit or value * least_item_bytes > self.end - self.pos:
            raise GGUFHeaderError(f"{what} of {value} is more than the file can hold or over the limit {limit}")
        return value

    def string(self, what: str, limit: int = MAX_STRING_BYTES, keep: bool = True) -> str:
        size = self.count(f"{what} length", limit, 1)
        start = self.take(size, what)
        return self.data[start : self.pos].decode("utf-8", errors="replace") if keep else ""

    def check_deadline(self) -> None:
        if time.monotonic() > self.deadline:
            raise GGUFHeaderError(f"the GGUF header took over {MAX_PARSE_SECONDS:g} s to read")


def read_gguf_header(path: Path, *, keep: Callable[[str], bool], tensors: bool = False) -> GGUFHeader:
    """Check `path`'s GGUF header and tensor table; keep the scalar values of the keys `keep` accepts
    (and, with `tensors`, every tensor's name, shape and type)."""
    size = path.stat().st_size
    if size < 24:
        raise GGUFHeaderError("the file is too short for a GGUF header")
    with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if data[:4] != GGUF_MAGIC:
            raise GGUFHeaderError("the file does not start with the GGUF magic")
        endian = _endianness(data)
        cursor = _Cursor(data, min(size, MAX_HEADER_BYTES), endian, time.monotonic() + MAX_PARSE_SECONDS)
        cursor.take(4, "magic")
        header = GGUFHeader(version=int(cursor.scalar("I", "version")), kv_count=0, tensors=[] if tensors else None)
        tensor_count = cursor.count("tensor count", MAX_TENSOR_COUNT, 24)
        header.kv_count = cursor.count("key-value count", MAX_KV_COUNT, 13)
        alignment = _read_key_values(cursor, header, keep)
        if tensor_count == 0:
            raise GGUFHeaderError("the GGUF holds no tensors")
        _read_tensor_infos(cursor, header, tensor_count, alignment, size)
    return header


def _endianness(data: mmap.mmap) -> str:
    for endian in "<>":
        if struct.unpack_from(endian + "I", data, 4)[0] in SUPPORTED_VERSIONS:
            return endian
    raise GGUFHeaderError(f"unsupported GGUF version (supported: {', '.join(map(str, SUPPORTED_VERSIONS))})")


def _read_key_values(cursor: _Cursor, header: GGUFHeader, keep: Callable[[str], bool]) -> int:
    """Walk the key-value pairs; return `general.alignment`."""
    seen: set[str] = set()
    alignment = DEFAULT_ALIGNMENT
    for _ in range(header.kv_count):
        cursor.check_deadline()
        key = _first_time(seen, cursor.string("key", MAX_KEY_BYTES), "key")
        value_type = int(cursor.scalar("I", f"type of {key!r}"))
        if key == "general.alignment":
            alignment = _read_alignment(cursor, value_type)
        elif value_type == _ARRAY:
            _skip_array(cursor, key)
        elif keep(key):
            header.metadata[key] = _read_scalar(cursor, value_type, key, keep=True)
        else:
            _read_scalar(cursor, value_type, key, keep=False)
    return alignment


def _first_time(seen: set[str], name: str, what: str) -> str:
    if name in seen:  # ggml refuses duplicate keys and tensor names
        raise GGUFHeaderError(f"{what} {name!r} appears twice")
    seen.add(name)
    return name


def _read_alignment(cursor: _Cursor, value_type: int) -> int:
    value = int(cursor.scalar("I", "general.alignment")) if value_type == 4 else 0
    if value <= 0 or value & (value - 1):
        raise GGUFHeaderError("general.alignment must be a u32 power of two")
    return value


def _read_scalar(cursor: _Cursor, value_type: int, key: str, keep: bool) -> Scalar:
    if value_type == _STRING:
        return cursor.string(f"value of {key!r}", keep=keep)
    if value_type not in _SCALARS:
        raise GGUFHeaderError(f"key {key!r} has unknown value type {value_type}")
    return cursor.scalar(_SCALARS[value_type], f"value of {key!r}")


def _skip_array(cursor: _Cursor, key: str) -> None:
    item_type = int(cursor.scalar("I", f"item type of {key!r}"))
    if item_type == _STRING:
        _skip_strings(cursor, key, cursor.count(f"item count of {key!r}", MAX_ARRAY_ITEMS, 8))
        return
    if item_type not in _SCALARS:  # nested arrays included: ggml refuses them too
        raise GGUFHeaderError(f"array {key!r} has unsupported item type {item_type}")
    item_bytes = struct.calcsize(_SCALARS[item_type])
    count = cursor.count(f"item count of {key!r}", MAX_ARRAY_ITEMS, item_bytes)
    cursor.take(count * item_bytes, f"items of {key!r}")


def _skip_strings(cursor: _Cursor, key: str, count: int) -> None:
    """Step over `count` strings: the hot loop of a tokenizer's vocabulary, so its checks are inlined."""
    unpack, data, pos, end = struct.Struct(cursor.endian + "Q").unpack_from, cursor.data, cursor.pos, cursor.end
    for index in range(count):
        if index % _DEADLINE_EVERY == 0:
            cursor.check_deadline()
        if end - pos < 8:
            raise GGUFHeaderError(f"array {key!r} runs past the end of the header")
        size = unpack(data, pos)[0]
        pos += 8
        if size > MAX_STRING_BYTES or size > end - pos:
            raise GGUFHeaderError(f"an item of {key!r} is longer than the file or {MAX_STRING_BYTES} bytes")
        pos += size
    cursor.pos = pos


def _read_tensor_infos(cursor: _Cursor, header: GGUFHeader, count: int, alignment: int, file_size: int) -> None:
    """Walk the tensor table: each tensor's type, shape and data must lie inside the file."""
    names: set[str] = set()
    extents: list[tuple[int, int]] = []
    for _ in range(count):
        cursor.check_deadline()
        name = _first_time(names, cursor.string("tensor name", MAX_TENSOR_NAME_BYTES), "tensor")
        n_dims = int(cursor.scalar("I", f"dimension count of {name!r}"))
        if n_dims > MAX_DIMS:
            raise GGUFHeaderError(f"tensor {name!r} has {n_dims} dimensions; ggml allows {MAX_DIMS}")
        dims = [int(cursor.scalar("Q", f"shape of {name!r}")) for _ in range(n_dims)]
        type_name, nbytes = _tensor_bytes(name, int(cursor.scalar("I", f"type of {name!r}")), dims)
        offset = int(cursor.scalar("Q", f"offset of {name!r}"))
        if offset % alignment:
            raise GGUFHeaderError(f"tensor {name!r} is not aligned to {alignment} bytes")
        header.tensor_types[type_name] = header.tensor_types.get(type_name, 0) + 1
        if header.tensors is not None:
            header.tensors.append(GGUFTensor(name, tuple(dims), type_name))
        extents.append((offset, nbytes))
    data_start = -(-cursor.pos // alignment) * alignment
    for offset, nbytes in extents:
        if data_start + offset + nbytes > file_size:
            raise GGUFHeaderError("a tensor's data lies past the end of the file (truncated?)")


def _tensor_bytes(name: str, ggml_type: int, dims: list[int]) -> tuple[str, int]:
    try:
        quant = GGMLQuantizationType(ggml_type)
        block_size, type_size = GGML_QUANT_SIZES[quant]
    except (ValueError, KeyError) as exc:
        raise GGUFHeaderError(f"tensor {name!r} has unknown ggml type {ggml_type}") from exc
    elements = math.prod(dims)
    if (dims[0] if dims else 1) % block_size:
        raise GGUFHeaderError(f"tensor {name!r}: its first dimension is not a multiple of {block_size}")
    return quant.name, elements // block_size * type_size
