"""Hand-built GGUF files for the sniff tests: well-formed ones and hostile headers, byte by byte."""

from __future__ import annotations

import struct

U8, U32, F32, STRING, ARRAY, U64 = 0, 4, 6, 8, 9, 10
GGML_F32 = 0


def gguf_string(text: str | bytes, *, declared: int | None = None) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(data) if declared is None else declared) + data


def kv_string(key: str, value: str | bytes, *, declared: int | None = None) -> bytes:
    return gguf_string(key) + struct.pack("<I", STRING) + gguf_string(value, declared=declared)


def kv_u32(key: str, value: int) -> bytes:
    return gguf_string(key) + struct.pack("<II", U32, value)


def kv_f32(key: str, value: float) -> bytes:
    return gguf_string(key) + struct.pack("<If", F32, value)


def kv_array(key: str, item_type: int, count: int, items: bytes = b"") -> bytes:
    return gguf_string(key) + struct.pack("<IIQ", ARRAY, item_type, count) + items


def tensor_info(name: str, dims: list[int], ggml_type: int = GGML_F32, offset: int = 0) -> bytes:
    return gguf_string(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, ggml_type, offset)


def gguf_file(
    kvs: list[bytes],
    tensors: list[bytes] | None = None,
    *,
    data: bytes | None = None,
    tensor_count: int | None = None,
    kv_count: int | None = None,
    version: int = 3,
    alignment: int = 32,
) -> bytes:
    """A GGUF with `kvs` and `tensors` (default: one F32 tensor of 8 values, its data included)."""
    tensors = [tensor_info("w", [8])] if tensors is None else tensors
    data = bytes(32) if data is None and tensors else (data or b"")
    head = b"GGUF" + struct.pack(
        "<IQQ",
        version,
        len(tensors) if tensor_count is None else tensor_count,
        len(kvs) if kv_count is None else kv_count,
    )
    head += b"".join(kvs) + b"".join(tensors)
    padding = b"\0" * (-len(head) % alignment) if data else b""
    return head + padding + data


def llama_kvs(*extra: bytes) -> list[bytes]:
    return [kv_string("general.architecture", "llama"), kv_u32("llama.context_length", 256), *extra]


# The 61-byte file of issue 19: one metadata array declaring 2**63 uint8 values, no tensors.
DECLARES_2_63_BYTES = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + kv_array("general.array", U8, 2**63)
