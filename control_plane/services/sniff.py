"""Recognise an uploaded artifact and read its header: GGUF by a bounded header reader, ONNX via `onnx`.

An ONNX model folder with external data arrives as a tar (see `shared.formats.onnx_bundle`): it is checked
member by member and its graph read without loading the external data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from control_plane.errors import DomainError, ErrorCode
from shared.desired import BUNDLE_FORMAT
from shared.formats.gguf_header import GGUF_MAGIC, GGUFHeaderError, read_gguf_header
from shared.formats.onnx_bundle import MAX_GRAPH_BYTES, BundleError, external_data_needs, inspect_bundle, is_tar


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
    raise DomainError(
        ErrorCode.UNRECOGNIZED_ARTIFACT, "the file is neither a GGUF, an ONNX model nor an ONNX model folder"
    )


_KEPT_GGUF_KEYS = {
    "general.type",
    "general.architecture",
    "general.name",
    "general.file_type",
    "tokenizer.chat_template",
}


def _kept_gguf_key(key: str) -> bool:
    return key in _KEPT_GGUF_KEYS or key.endswith(".context_length")


def _gguf_metadata(path: Path) -> tuple[str, dict[str, Any]]:
    try:
        header = read_gguf_header(path, keep=_kept_gguf_key)
    except GGUFHeaderError as exc:
        raise DomainError(ErrorCode.UNRECOGNIZED_ARTIFACT, f"GGUF header could not be parsed: {exc}") from exc
    general_type = _text(header.metadata.get("general.type")) or "model"
    arch = _text(header.metadata.get("general.architecture"))
    file_type = _count(header.metadata.get("general.file_type"), least=0)
    meta: dict[str, Any] = {
        "architecture": arch,
        "general_type": general_type,
        "name": _text(header.metadata.get("general.name")),
        "context_length": _count(header.metadata.get(f"{arch}.context_length"), least=1) if arch else None,
        "file_type": file_type,
        "quantization": _gguf_quant_label(file_type, header.tensor_types),
        "tensor_count": header.tensor_count,
        "chat_template": _text(header.metadata.get("tokenizer.chat_template")),
    }
    fmt = "gguf-lora" if general_type == "adapter" else "gguf"
    return fmt, meta


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _count(value: object, *, least: int) -> int | None:
    """An integer metadata value, or None for another type (floats could be NaN, which JSON cannot hold)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= least else None


def _gguf_quant_label(file_type: int | None, tensor_types: dict[str, int]) -> str | None:
    import gguf

    if file_type is not None:
        try:
            return gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            pass
    # No general.file_type: name the most common tensor type instead.
    return max(tensor_types, key=lambda k: tensor_types[k]) if tensor_types else None


def _onnx_metadata(path: Path) -> dict[str, Any]:
    import onnx

    if path.stat().st_size > MAX_GRAPH_BYTES:
        raise DomainError(ErrorCode.UNRECOGNIZED_ARTIFACT, "ONNX files over 2 GB must use external data")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends
        raise DomainError(ErrorCode.UNRECOGNIZED_ARTIFACT, f"not a valid ONNX model: {exc}") from exc
    if not model.graph.node and not model.graph.output:
        raise DomainError(ErrorCode.UNRECOGNIZED_ARTIFACT, "the ONNX graph is empty")
    _refuse_external_data(model)
    return _graph_metadata(model)


def _refuse_external_data(model: Any) -> None:
    """A plain .onnx file has no folder: every external data reference points outside the model."""
    try:
        needs = external_data_needs(model)  # refuses absolute and '..' locations, as for bundles
    except BundleError as exc:
        raise DomainError(ErrorCode.UNRECOGNIZED_ARTIFACT, f"not a valid ONNX model: {exc}") from exc
    if needs:
        raise DomainError(
            ErrorCode.UNRECOGNIZED_ARTIFACT,
            f"the ONNX model needs external data file {min(needs)!r}; push its folder (an ONNX model bundle)",
        )


def _bundle_metadata(path: Path) -> dict[str, Any]:
    try:
        model, contents = inspect_bundle(path)
    except BundleError as exc:
        raise DomainError(ErrorCode.UNRECOGNIZED_ARTIFACT, f"not a valid ONNX model folder: {exc}") from exc
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
    try:
        elem_type = onnx.TensorProto.DataType.Name(tensor.elem_type)
    except ValueError:  # elem_type is a plain int32 on the wire: a newer or made-up type has no name
        elem_type = str(tensor.elem_type)
    return {"name": value.name, "elem_type": elem_type, "shape": dims}
