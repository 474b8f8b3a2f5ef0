"""Recognise an uploaded artifact and read its header: GGUF via `gguf`, ONNX via `onnx`.

An ONNX model folder with external data arrives as a tar (see `slmops.onnx_bundle`): it is checked
member by member and its graph read without loading the external data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from control_plane.errors import DomainError
from shared.desired import BUNDLE_FORMAT
from slmops.onnx_bundle import MAX_GRAPH_BYTES, BundleError, inspect_bundle, is_tar

GGUF_MAGIC = b"GGUF"


def sniff_artifact(path: Path) -> tuple[str, dict[str, Any]]:
    """Return (format, metadata) or raise `unrecognized_artifact`."""
    with path.open("rb") as fh:
        head = fh.read(512)
    if head[:4] == GGUF_MAGIC:
        return _gguf_metadata(path)
    if is_tar(head):
        return BUNDLE_FORMAT, _bundle_metadata(path)
    if head[:1] == b"\x08":  # ModelProto field 1 (ir_version, varint) is written first
        return "onnx", _onnx_metadata(path)
    raise DomainError("unrecognized_artifact", "the file is neither a GGUF, an ONNX model nor an ONNX model folder")


def _field_value(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return None
    try:
        return field.contents()
    except Exception:  # noqa: BLE001  (older gguf versions lack contents(); metadata is best effort)
        return None


def _gguf_metadata(path: Path) -> tuple[str, dict[str, Any]]:
    import gguf

    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as exc:  # gguf raises ValueError/struct errors on truncated headers
        raise DomainError("unrecognized_artifact", f"GGUF header could not be parsed: {exc}") from exc
    general_type = _field_value(reader, "general.type") or "model"
    arch = _field_value(reader, "general.architecture")
    file_type = _field_value(reader, "general.file_type")
    meta: dict[str, Any] = {
        "architecture": arch,
        "general_type": general_type,
        "name": _field_value(reader, "general.name"),
        "context_length": _field_value(reader, f"{arch}.context_length") if arch else None,
        "file_type": file_type,
        "quantization": _gguf_quant_label(file_type, reader),
        "tensor_count": len(reader.tensors),
        "chat_template": _field_value(reader, "tokenizer.chat_template"),
    }
    fmt = "gguf-lora" if general_type == "adapter" else "gguf"
    return fmt, meta


def _gguf_quant_label(file_type: Any, reader: Any) -> str | None:
    import gguf

    if isinstance(file_type, int):
        try:
            return gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            pass
    # No general.file_type: name the most common tensor type instead.
    counts: dict[str, int] = {}
    for tensor in reader.tensors:
        counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
    return max(counts, key=lambda k: counts[k]) if counts else None


def _onnx_metadata(path: Path) -> dict[str, Any]:
    import onnx

    if path.stat().st_size > MAX_GRAPH_BYTES:
        raise DomainError("unrecognized_artifact", "ONNX files over 2 GB must use external data")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends
        raise DomainError("unrecognized_artifact", f"not a valid ONNX model: {exc}") from exc
    if not model.graph.node and not model.graph.output:
        raise DomainError("unrecognized_artifact", "the ONNX graph is empty")
    return _graph_metadata(model)


def _bundle_metadata(path: Path) -> dict[str, Any]:
    try:
        model, contents = inspect_bundle(path)
    except BundleError as exc:
        raise DomainError("unrecognized_artifact", f"not a valid ONNX model folder: {exc}") from exc
    return _graph_metadata(model) | {
        "graph": contents.graph,
        "files": contents.files,
        "external_data": sorted(contents.external_data),
        "unpacked_bytes": contents.unpacked_bytes,
    }


def _graph_metadata(model: Any) -> dict[str, Any]:
    return {
        "ir_version": model.ir_version,
        "opset": {op.domain or "ai.onnx": op.version for op in model.opset_import},
        "producer": model.producer_name,
        "inputs": [_value_info(v) for v in model.graph.input],
        "outputs": [_value_info(v) for v in model.graph.output],
        "node_count": len(model.graph.node),
    }


def _value_info(value: Any) -> dict[str, Any]:
    import onnx

    tensor = value.type.tensor_type
    dims = [d.dim_param or d.dim_value for d in tensor.shape.dim]
    return {"name": value.name, "elem_type": onnx.TensorProto.DataType.Name(tensor.elem_type), "shape": dims}
