"""Inference engines the agent runs models with (GGUF via llama-cpp-python, ONNX via onnxruntime).

Importing this package imports neither runtime: `load_engine` imports the one a model needs, so an
agent without llama-cpp-python still serves ONNX models and the reverse.
"""

from __future__ import annotations

from pathlib import Path

from edge_agent.runtime.base import (
    FINISH_LENGTH,
    FINISH_STOP,
    ContextOverflowError,
    Engine,
    EngineError,
    InvalidInput,
    ModelLoadError,
    Sampling,
    TokenChunk,
    TokenLogprob,
    TokenStream,
    UnsupportedOperation,
    UnsupportedParameter,
)

FORMATS = ("gguf", "onnx", "onnx-tar")  # onnx-tar: the .onnx graph of an unpacked model folder

__all__ = [
    "FINISH_LENGTH",
    "FINISH_STOP",
    "FORMATS",
    "ContextOverflowError",
    "Engine",
    "EngineError",
    "InvalidInput",
    "ModelLoadError",
    "Sampling",
    "TokenChunk",
    "TokenLogprob",
    "TokenStream",
    "UnsupportedOperation",
    "UnsupportedParameter",
    "load_engine",
]


def load_engine(
    path: Path,
    fmt: str,
    *,
    n_ctx: int = 512,
    n_threads: int | None = None,
    lora_path: Path | None = None,
    chat_template: str | None = None,
) -> Engine:
    """Load a model file with the engine for its format; failures raise ModelLoadError.

    For "onnx-tar" `path` is the .onnx graph inside the unpacked folder, its external data beside it.
    """
    if fmt == "gguf":
        try:
            from edge_agent.runtime.llama_engine import LlamaEngine
        except (ImportError, OSError, RuntimeError) as exc:  # absent, or its shared library will not load
            raise ModelLoadError(f"GGUF models need llama-cpp-python: {exc}") from exc
        return LlamaEngine(
            Path(path), n_ctx=n_ctx, n_threads=n_threads, lora_path=lora_path, chat_template=chat_template
        )
    if fmt in ("onnx", "onnx-tar"):  # onnxruntime finds external data next to the graph
        if lora_path is not None:
            raise UnsupportedOperation("LoRA adapters apply to GGUF models only")
        try:
            from edge_agent.runtime.onnx_engine import OnnxEngine
        except (ImportError, OSError) as exc:
            raise ModelLoadError(f"ONNX models need onnxruntime: {exc}") from exc
        return OnnxEngine(Path(path), n_ctx=n_ctx, n_threads=n_threads, chat_template=chat_template)
    raise ModelLoadError(f"unknown model format {fmt!r}; expected one of {FORMATS}")
