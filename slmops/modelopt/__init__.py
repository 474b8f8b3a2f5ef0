"""Model optimization: quantization of GGUF (llama.cpp) and ONNX (onnxruntime) models."""

from __future__ import annotations

from slmops.modelopt.quantize import (
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
