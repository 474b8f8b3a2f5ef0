"""The GGUF upload sniff reads hostile headers within fixed limits and keeps what the registry extracts."""

from __future__ import annotations

import json
import struct
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import pytest

from control_plane.errors import DomainError
from control_plane.services.sniff import sniff_artifact
from shared.formats import gguf_header
from tests.support.gguf_craft import (
    DECLARES_2_63_BYTES,
    STRING,
    U8,
    U32,
    U64,
    gguf_file,
    gguf_string,
    kv_array,
    kv_f32,
    kv_string,
    kv_u32,
    llama_kvs,
    tensor_info,
)


def _write(tmp_path: Path, data: bytes, name: str = "model.gguf") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _peak_bytes(call: Callable[[], Any]) -> tuple[Any, int]:
    """`call()`'s result (or the exception it raised) and the most Python memory it held at once."""
    tracemalloc.start()
    try:
        try:
            result: Any = call()
        except Exception as exc:  # noqa: BLE001  (the caller asserts on it)
            result = exc
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _refusal(path: Path) -> str:
    with pytest.raises(DomainError) as refused:
        sniff_artifact(path)
    assert refused.value.code == "unrecognized_artifact"
    return str(refused.value)


def test_a_61_byte_header_declaring_2_63_values_is_refused_without_reading_them(tmp_path: Path) -> None:
    assert len(DECLARES_2_63_BYTES) == 61
    path = _write(tmp_path, DECLARES_2_63_BYTES)
    result, peak = _peak_bytes(lambda: sniff_artifact(path))
    assert isinstance(result, DomainError) and result.code == "unrecognized_artifact", result
    assert peak < 1024**2


def test_a_well_formed_two_million_item_array_costs_little(tmp_path: Path) -> None:
    items = 2_000_000
    data = gguf_file(llama_kvs(kv_array("tokenizer.ggml.token_type", U8, items, bytes(items))))
    path = _write(tmp_path, data)
    result, peak = _peak_bytes(lambda: sniff_artifact(path))
    assert not isinstance(result, Exception), result
    fmt, meta = result
    assert fmt == "gguf" and meta["architecture"] == "llama" and meta["context_length"] == 256
    assert peak < 4 * 1024**2  # the array is skipped, never materialised


def test_a_real_sized_vocabulary_is_accepted(tmp_path: Path) -> None:
    tokens = b"".join(gguf_string(f"tok{i}") for i in range(300_000))
    data = gguf_file(llama_kvs(gguf_string("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, STRING, 300_000) + tokens))
    fmt, meta = sniff_artifact(_write(tmp_path, data))
    assert fmt == "gguf" and meta["tensor_count"] == 1 and meta["quantization"] == "F32"


def test_zero_tensors_are_refused(tmp_path: Path) -> None:
    assert "no tensors" in _refusal(_write(tmp_path, gguf_file(llama_kvs(), tensors=[])))


def test_a_string_longer_than_the_file_is_refused(tmp_path: Path) -> None:
    declared_2_62 = kv_string("general.name", b"x" * 16, declared=2**62)
    for tensors in ([], None):  # as the last thing in the file, and with a tensor table after it
        data = gguf_file(llama_kvs(declared_2_62), tensors=tensors)
        assert "general.name" in _refusal(_write(tmp_path, data))


HOSTILE = {
    "kv count 2**64-1": gguf_file(llama_kvs(), kv_count=2**64 - 1),
    "tensor count 2**40": gguf_file(llama_kvs(), tensor_count=2**40),
    "kv count past the end": gguf_file(llama_kvs(), kv_count=100),
    "array over the item limit": gguf_file(
        llama_kvs(kv_array("a", U8, gguf_header.MAX_ARRAY_ITEMS + 1, bytes(gguf_header.MAX_ARRAY_ITEMS + 1)))
    ),
    "u64 array past the end": gguf_file(llama_kvs(kv_array("a", U64, 1000, bytes(16)))),
    "string items past the end": gguf_file(llama_kvs(kv_array("a", STRING, 3, gguf_string("x")))),
    "string item of 2**63": gguf_file(llama_kvs(kv_array("a", STRING, 1, struct.pack("<Q", 2**63)))),
    "nested array": gguf_file(llama_kvs(kv_array("a", 9, 1, struct.pack("<IQ", U8, 1) + b"\0"))),
    "unknown value type": gguf_file(llama_kvs(gguf_string("k") + struct.pack("<II", 13, 0))),
    "duplicate key": gguf_file(llama_kvs(kv_u32("llama.context_length", 512))),
    "version 1": gguf_file(llama_kvs(), version=1),
    "version 2**31": gguf_file(llama_kvs(), version=2**31),
    "truncated tensor data": gguf_file(llama_kvs(), data=bytes(16)),
    "tensor data past the end": gguf_file(llama_kvs(), tensors=[tensor_info("w", [8], offset=2**62)]),
    "huge tensor shape": gguf_file(llama_kvs(), tensors=[tensor_info("w", [2**63, 2**63, 2**63, 2**63])]),
    "five dimensions": gguf_file(llama_kvs(), tensors=[tensor_info("w", [1, 1, 1, 1, 8])]),
    "unknown ggml type": gguf_file(llama_kvs(), tensors=[tensor_info("w", [8], ggml_type=9999)]),
    "misaligned tensor": gguf_file(llama_kvs(), tensors=[tensor_info("w", [8], offset=4)], data=bytes(64)),
    "Q4_0 shape not a multiple of its block": gguf_file(llama_kvs(), tensors=[tensor_info("w", [8], ggml_type=2)]),
    "duplicate tensor": gguf_file(llama_kvs(), tensors=[tensor_info("w", [8]), tensor_info("w", [8])]),
    "tensor name of 64 bytes": gguf_file(llama_kvs(), tensors=[tensor_info("w" * 64, [8])]),
    "alignment not a power of two": gguf_file(llama_kvs(kv_u32("general.alignment", 48))),
    "alignment of another type": gguf_file(llama_kvs(kv_f32("general.alignment", 32.0))),
    "only the magic": b"GGUF" + bytes(20),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_headers_are_refused(tmp_path: Path, case: str) -> None:
    _refusal(_write(tmp_path, HOSTILE[case]))


def test_metadata_is_json_safe_whatever_the_types(tmp_path: Path) -> None:
    kvs = [
        kv_string("general.architecture", "llama"),
        kv_f32("llama.context_length", float("nan")),
        kv_string("general.file_type", "Q4_K"),
        kv_array("general.name", U32, 1, bytes(4)),
        kv_string("tokenizer.chat_template", b"\xff{{ bad utf-8 }}"),
    ]
    fmt, meta = sniff_artifact(_write(tmp_path, gguf_file(kvs)))
    json.dumps(meta, allow_nan=False)
    assert meta["context_length"] is None and meta["file_type"] is None and meta["name"] is None
    assert meta["quantization"] == "F32" and meta["chat_template"].endswith("{{ bad utf-8 }}")


def _metadata_by_gguf_py(path: Path) -> dict[str, Any]:
    """What the registry extracted with gguf-py's reader before: the bounded reader must agree."""
    reader = gguf.GGUFReader(path, "r")

    def value(key: str) -> Any:
        field = reader.fields.get(key)
        return field.contents() if field is not None else None

    arch = value("general.architecture")
    return {
        "architecture": arch,
        "general_type": value("general.type") or "model",
        "name": value("general.name"),
        "context_length": value(f"{arch}.context_length"),
        "file_type": value("general.file_type"),
        "tensor_count": len(reader.tensors),
        "chat_template": value("tokenizer.chat_template"),
    }


def test_tiny_models_keep_the_metadata_the_registry_extracted(tiny_gguf: Path, tiny_lora_gguf: Path) -> None:
    for path, fmt in ((tiny_gguf, "gguf"), (tiny_lora_gguf, "gguf-lora")):
        sniffed_fmt, meta = sniff_artifact(path)
        assert sniffed_fmt == fmt
        assert {k: v for k, v in meta.items() if k != "quantization"} == _metadata_by_gguf_py(path)
        assert meta["quantization"] == "F32"
