"""Quantize models: GGUF through llama.cpp's quantizer, ONNX through onnxruntime's dynamic int8.

Before any call into C, the GGUF source's header is read with the bounded reader of the upload sniff
(control_plane/services/gguf_header.py: metadata arrays are stepped over, never materialised) and
every tensor llama.cpp would quantize (2-D or more, name ending in "weight") is checked against the
target type's block size, so a bad request is a QuantizeError with the offending tensors named,
never a crash.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from control_plane.services.gguf_header import GGUFHeaderError, read_gguf_header


class QuantizeError(Exception):
    """The quantization was refused (unknown type, incompatible shapes, bad source) or failed."""


# Target name -> (llama_ftype constant suffix, block length its rows must be a multiple of).
GGUF_TYPES: dict[str, tuple[str, int]] = {
    "F16": ("F16", 1),
    "BF16": ("BF16", 1),
    "Q8_0": ("Q8_0", 32),
    "Q5_1": ("Q5_1", 32),
    "Q5_0": ("Q5_0", 32),
    "Q4_1": ("Q4_1", 32),
    "Q4_0": ("Q4_0", 32),
    "Q6_K": ("Q6_K", 256),
    "Q5_K_M": ("Q5_K_M", 256),
    "Q5_K_S": ("Q5_K_S", 256),
    "Q4_K_M": ("Q4_K_M", 256),
    "Q4_K_S": ("Q4_K_S", 256),
    "Q3_K_L": ("Q3_K_L", 256),
    "Q3_K_M": ("Q3_K_M", 256),
    "Q3_K_S": ("Q3_K_S", 256),
    "Q2_K": ("Q2_K", 256),
}
_FLOAT_TYPES = {"F32", "F16", "BF16"}


@dataclass(frozen=True)
class QuantizeResult:
    """What a quantization produced."""

    src: Path
    dst: Path
    quant_type: str
    size_before: int
    size_after: int
    sha256: str
    seconds: float

    @property
    def ratio(self) -> float:
        """size_after / size_before (smaller is better)."""
        return self.size_after / self.size_before


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_gguf_quantizable(src: Path, to: str, *, allow_requantize: bool = False) -> None:
    """Raise QuantizeError unless llama.cpp can quantize every weight of `src` to `to`."""
    if to not in GGUF_TYPES:
        raise QuantizeError(f"unknown GGUF quantization type {to!r}; expected one of {', '.join(GGUF_TYPES)}")
    try:
        tensors = read_gguf_header(src, keep=lambda _key: False, tensors=True).tensors or []
    except (OSError, GGUFHeaderError) as exc:
        raise QuantizeError(f"{src} is not a readable GGUF file: {exc}") from exc
    block = GGUF_TYPES[to][1]
    misfits, quantized = [], []
    for tensor in tensors:
        if not tensor.name.endswith("weight") or len(tensor.shape) < 2:
            continue  # llama.cpp keeps norms and biases in float
        if tensor.type_name not in _FLOAT_TYPES:
            quantized.append(tensor.name)
        row = tensor.shape[0]
        if row % block:
            misfits.append(f"{tensor.name} (row {row})")
    if quantized and not allow_requantize:
        raise QuantizeError(f"{src} is already quantized ({quantized[0]} ...); quantize from the float model")
    if misfits:
        shown = ", ".join(misfits[:5]) + (" ..." if len(misfits) > 5 else "")
        raise QuantizeError(f"{to} needs rows that are multiples of {block}; these are not: {shown}")


def _result(src: Path, dst: Path, to: str, started: float) -> QuantizeResult:
    return QuantizeResult(
        src=src,
        dst=dst,
        quant_type=to,
        size_before=src.stat().st_size,
        size_after=dst.stat().st_size,
        sha256=file_sha256(dst),
        seconds=time.perf_counter() - started,
    )


def _prepare_paths(src: Path | str, dst: Path | str) -> tuple[Path, Path, Path]:
    src_path, dst_path = Path(src), Path(dst)
    if not src_path.is_file():
        raise QuantizeError(f"source model not found: {src_path}")
    if src_path.resolve() == dst_path.resolve():
        raise QuantizeError("destination must differ from the source")
    dst_path.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the destination and renamed, so a failed run never leaves a half file at dst.
    return src_path, dst_path, dst_path.with_name(dst_path.name + ".partial")


def quantize_gguf(
    src: Path | str,
    dst: Path | str,
    to: str = "Q8_0",
    *,
    n_threads: int = 0,
    allow_requantize: bool = False,
) -> QuantizeResult:
    """Quantize a float GGUF model with llama.cpp (`n_threads` 0 lets llama.cpp choose)."""
    src_path, dst_path, partial = _prepare_paths(src, dst)
    check_gguf_quantizable(src_path, to, allow_requantize=allow_requantize)
    try:
        import llama_cpp
    except ImportError as exc:
        raise QuantizeError(f"GGUF quantization needs llama-cpp-python: {exc}") from exc
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{GGUF_TYPES[to][0]}")
    params.nthread = n_threads
    params.allow_requantize = allow_requantize
    started = time.perf_counter()
    # llama.cpp logs every tensor at INFO through llama-cpp-python's logger; keep errors only.
    llama_logger = logging.getLogger("llama-cpp-python")
    previous_level = llama_logger.level
    llama_logger.setLevel(logging.ERROR)
    try:
        rc = llama_cpp.llama_model_quantize(str(src_path).encode(), str(partial).encode(), ctypes.byref(params))
    finally:
        llama_logger.setLevel(previous_level)
    if rc != 0 or not partial.is_file():
        partial.unlink(missing_ok=True)
        raise QuantizeError(f"llama.cpp failed to quantize {src_path} to {to} (code {rc})")
    os.replace(partial, dst_path)
    return _result(src_path, dst_path, to, started)


def quantize_onnx_int8(src: Path | str, dst: Path | str) -> QuantizeResult:
    """Dynamic int8 quantization of an ONNX model's MatMul/Gemm weights (onnxruntime)."""
    src_path, dst_path, partial = _prepare_paths(src, dst)
    from onnxruntime.quantization import QuantType, quantize_dynamic

    started = time.perf_counter()
    try:
        quantize_dynamic(src_path, partial, weight_type=QuantType.QInt8)
    except Exception as exc:  # onnx/onnxruntime raise many unrelated types for a bad graph
        partial.unlink(missing_ok=True)
        raise QuantizeError(f"onnxruntime failed to quantize {src_path}: {exc}") from exc
    os.replace(partial, dst_path)
    return _result(src_path, dst_path, "QInt8", started)
