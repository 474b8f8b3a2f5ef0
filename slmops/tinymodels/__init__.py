"""Real, tiny, random-weight models (GGUF and ONNX) for tests, demos and benchmarks.

Their weights are random, so their text is gibberish; what they offer is real file formats that
real runtimes load, tokenize, generate with, quantize and time.
"""

from __future__ import annotations

from slmops.tinymodels.gguf_tiny import (
    TINY_CHAT_TEMPLATE,
    TinyLlamaShape,
    write_tiny_gguf,
    write_tiny_lora_gguf,
)
from slmops.tinymodels.onnx_tiny import write_tiny_onnx, write_tiny_onnx_folder

__all__ = [
    "TINY_CHAT_TEMPLATE",
    "TinyLlamaShape",
    "write_tiny_gguf",
    "write_tiny_lora_gguf",
    "write_tiny_onnx",
    "write_tiny_onnx_folder",
]
