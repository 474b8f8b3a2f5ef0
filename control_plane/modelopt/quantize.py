"""Quantize models: GGUF through llama.cpp's quantizer, ONNX through onnxruntime's dynamic int8.

Published GGUFs are already quantized: those are dequantized to F32 first (a lossless upcast,
checked value by value), and the variants are made from that float parent.

Before any call into C, the GGUF source's header is read with the bounded reader of the upload sniff
(shared/formats/gguf_header.py: metadata arrays are stepped over, never materialised) and
every tensor llama.cpp would quantize (2-D or more, name ending in "weight") is checked against the
target type's block size, so a bad request is a QuantizeError with the offending tensors named,
never a crash.
"""

from __future__ import annotations

import ctypes
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import gguf
import gguf.quants
import numpy as np

from control_plane.errors import ControlPlaneError
from shared.formats.gguf_header import GGUFHeaderError, GGUFTensor, read_gguf_header
from shared.hashing import file_sha256


class QuantizeError(ControlPlaneError):
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
# Float targets that dequantize a quantized model -> llama_ftype constant suffix.
DEQUANTIZE_TYPES = {"F32": "ALL_F32", "F16": "MOSTLY_F16"}
FALLBACK_BLOCK = 32  # the block of the types llama.cpp falls back to for K-quant misfits
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


def _is_weight(name: str, shape: Sequence[int]) -> bool:
    # llama.cpp keeps norms and biases (1-D) in float; it converts the 2-D weights.
    return name.endswith("weight") and len(shape) >= 2


def _weights(src: Path) -> list[GGUFTensor]:
    try:
        tensors = read_gguf_header(src, keep=lambda _key: False, tensors=True).tensors or []
    except (OSError, GGUFHeaderError) as exc:
        raise QuantizeError(f"{src} is not a readable GGUF file: {exc}") from exc
    return [t for t in tensors if _is_weight(t.name, t.shape)]


def _weight_data(src: Path) -> list[gguf.ReaderTensor]:
    """The weights with their values; only for files the header reader accepted or llama.cpp wrote."""
    return [t for t in gguf.GGUFReader(src).tensors if _is_weight(t.name, tuple(t.shape))]


def check_gguf_quantizable(src: Path, to: str, *, allow_requantize: bool = False) -> None:
    """Raise QuantizeError unless llama.cpp can quantize the weights of `src` to `to`."""
    if to not in GGUF_TYPES:
        raise QuantizeError(f"unknown GGUF quantization type {to!r}; expected one of {', '.join(GGUF_TYPES)}")
    weights = _weights(src)
    quantized = [t.name for t in weights if t.type_name not in _FLOAT_TYPES]
    if quantized and not allow_requantize:
        raise QuantizeError(
            f"{src} is already quantized ({quantized[0]} ...); requantizing compounds the error: dequantize it "
            "first (quantize --to F32, a lossless upcast) and make the variants from that float parent"
        )
    block = GGUF_TYPES[to][1]
    # GGUF shapes are ne order: ne[0] is the row length.
    misfits = [(t.name, int(t.shape[0])) for t in weights if int(t.shape[0]) % block]
    # llama.cpp stores a K-quant tensor whose rows do not fit in a 32-block type instead ("fallback
    # quantization"); the type is refused only when no weight fits it, or a row fits no block at all.
    fallback_ok = block == FALLBACK_BLOCK * 8 and len(misfits) < len(weights)
    if misfits and not (fallback_ok and all(row % FALLBACK_BLOCK == 0 for _, row in misfits)):
        shown = ", ".join(f"{name} (row {row})" for name, row in misfits[:5]) + (" ..." if len(misfits) > 5 else "")
        raise QuantizeError(f"{to} needs rows that are multiples of {block}; these are not: {shown}")


def is_quantized_gguf(src: Path) -> bool:
    """Whether any weight of `src` is stored in a quantized type."""
    return any(t.type_name not in _FLOAT_TYPES for t in _weights(src))


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
    """Quantize a float GGUF model with llama.cpp (`n_threads` 0 lets llama.cpp choose). F32/F16 of a
    quantized model is a dequantization (`dequantize_gguf`): exact, or refused."""
    if to in DEQUANTIZE_TYPES and Path(src).is_file() and is_quantized_gguf(Path(src)):
        return dequantize_gguf(src, dst, to, n_threads=n_threads)
    src_path, dst_path, partial = _prepare_paths(src, dst)
    check_gguf_quantizable(src_path, to, allow_requantize=allow_requantize)
    started = time.perf_counter()
    _llama_quantize(src_path, partial, f"MOSTLY_{GGUF_TYPES[to][0]}", n_threads, allow_requantize=allow_requantize)
    os.replace(partial, dst_path)
    return _result(src_path, dst_path, to, started)


def _llama_quantize(src: Path, partial: Path, ftype: str, n_threads: int, *, allow_requantize: bool) -> None:
    """llama.cpp's quantizer writing `partial` (removed again on failure)."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise QuantizeError(f"GGUF quantization needs llama-cpp-python: {exc}") from exc
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_{ftype}")
    params.nthread = n_threads
    params.allow_requantize = allow_requantize
    # llama.cpp logs every tensor at INFO through llama-cpp-python's logger; keep errors only.
    llama_logger = logging.getLogger("llama-cpp-python")
    previous_level = llama_logger.level
    llama_logger.setLevel(logging.ERROR)
    try:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(partial).encode(), ctypes.byref(params))
    finally:
        llama_logger.setLevel(previous_level)
    if rc != 0 or not partial.is_file():
        partial.unlink(missing_ok=True)
        raise QuantizeError(f"llama.cpp failed to quantize {src} to {ftype} (code {rc})")


def dequantize_gguf(src: Path | str, dst: Path | str, to: str = "F32", *, n_threads: int = 0) -> QuantizeResult:
    """Upcast a quantized GGUF to float with llama.cpp, and prove it exact: every written weight
    equals the source's dequantized value (gguf's reference dequantizer). F16 is refused where it
    cannot hold those values; F32 always can."""
    if to not in DEQUANTIZE_TYPES:
        raise QuantizeError(f"dequantization writes one of {', '.join(DEQUANTIZE_TYPES)}, not {to!r}")
    src_path, dst_path, partial = _prepare_paths(src, dst)
    _weights(src_path)  # bounded header check before gguf's reader maps the values
    weights = _weight_data(src_path)
    if to == "F16":
        lossy = next((t.name for t in weights if not _exact_in(t, np.float16)), None)
        if lossy is not None:
            raise QuantizeError(f"F16 cannot hold every value of {lossy} exactly; dequantize to F32 (lossless)")
    started = time.perf_counter()
    _llama_quantize(src_path, partial, DEQUANTIZE_TYPES[to], n_threads, allow_requantize=True)
    written = {t.name: t for t in _weight_data(partial)}
    differing = [t.name for t in weights if not np.array_equal(_values(t), _values(written[t.name]))]
    if differing:
        partial.unlink(missing_ok=True)
        raise QuantizeError(f"llama.cpp's {to} values differ from the dequantized source in {differing[0]} ...")
    os.replace(partial, dst_path)
    return _result(src_path, dst_path, to, started)


def _values(tensor: gguf.ReaderTensor) -> np.ndarray:
    return gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32).reshape(-1)


def _exact_in(tensor: gguf.ReaderTensor, dtype: type[np.floating]) -> bool:
    values = _values(tensor)
    return bool(np.array_equal(values.astype(dtype).astype(np.float32), values))


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
