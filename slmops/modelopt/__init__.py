"""Model optimisation for operators: the server's quantizers, plus measuring and comparing variants."""

from __future__ import annotations

from control_plane.modelopt import (
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
