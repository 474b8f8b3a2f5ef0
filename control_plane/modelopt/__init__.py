"""Quantization of GGUF (llama.cpp) and ONNX (onnxruntime) models, run by the server's jobs."""

from __future__ import annotations

from control_plane.modelopt.quantize import (
    GGUF_TYPES,
    QuantizeError,
    QuantizeResult,
    check_gguf_quantizable,
    quantize_gguf,
    quantize_onnx_int8,
)

__all__ = [
    "GGUF_TYPES",
    "QuantizeError",
    "QuantizeResult",
    "check_gguf_quantizable",
    "quantize_gguf",
    "quantize_onnx_int8",
]
