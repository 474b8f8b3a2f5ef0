"""Hand-edited ONNX models for the sniff tests."""

from __future__ import annotations

from pathlib import Path

import onnx


def with_external_data(source: Path, entries: dict[str, str]) -> bytes:
    """`source`'s model with its first initializer moved to external data described by `entries`."""
    model = onnx.load(str(source))
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in entries.items():
        tensor.external_data.add(key=key, value=value)
    return model.SerializeToString()
