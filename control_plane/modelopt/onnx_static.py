"""Static int8 quantization of ONNX models (QDQ), calibrated on a small deterministic input set.

Calibration uses the packaged prompt set (byte LMs) or seeded random inputs (other graphs), never
the evaluation text, so evaluating the result is not evaluating on its own calibration data.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from control_plane.modelopt.quantize import QuantizeError, QuantizeResult, _prepare_paths, _result

CALIBRATION_SEED = 1


def calibration_feeds(src: Path) -> list[dict[str, np.ndarray]]:
    """One feed per calibration sample: prompts as bytes for byte LMs, seeded random otherwise."""
    import onnxruntime as ort

    from control_plane.modelopt.prompts import default_prompts
    from shared.formats.byte_vocab import encode_bytes

    specs = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).get_inputs()
    if [s.name for s in specs] == ["input_ids"]:
        return [{"input_ids": np.asarray([encode_bytes(p)], dtype=np.int64)} for p in default_prompts()]
    rng = np.random.default_rng(CALIBRATION_SEED)
    feeds = []
    for _ in range(8):
        feed: dict[str, np.ndarray] = {}
        for spec in specs:
            shape = [d if isinstance(d, int) and d > 0 else 1 for d in spec.shape]
            if "int" in spec.type:
                feed[spec.name] = rng.integers(0, 2, size=shape, dtype=np.int64)
            else:
                feed[spec.name] = rng.standard_normal(shape).astype(np.float32)
        feeds.append(feed)
    return feeds


def quantize_onnx_int8_static(src: Path | str, dst: Path | str) -> QuantizeResult:
    """Static int8 (weights and activations, QDQ format) with onnxruntime's MinMax calibration."""
    src_path, dst_path, partial = _prepare_paths(src, dst)
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Feeds(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self, feeds: list[dict[str, Any]]) -> None:
            self._feeds = iter(feeds)

        def get_next(self) -> dict[str, Any] | None:
            return next(self._feeds, None)

    started = time.perf_counter()
    try:
        reader = Feeds(calibration_feeds(src_path))
        quantize_static(
            src_path,
            partial,
            reader,
            quant_format=QuantFormat.QDQ,
            weight_type=QuantType.QInt8,
            activation_type=QuantType.QInt8,
        )
    except Exception as exc:  # onnx/onnxruntime raise many unrelated types for a bad graph
        partial.unlink(missing_ok=True)
        raise QuantizeError(f"onnxruntime failed to quantize {src_path} statically: {exc}") from exc
    os.replace(partial, dst_path)
    return _result(src_path, dst_path, "QInt8-static", started)
