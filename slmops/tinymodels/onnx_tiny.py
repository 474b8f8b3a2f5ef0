"""Write a tiny random-weight decoder language model as ONNX (opset 17).

It is a decoder LM over bytes: `input_ids` int64 [batch, seq] -> `logits` float32 [batch, seq, 259],
where position t depends only on tokens 0..t (a per-position MLP plus a scaled causal running sum,
built from Gather, MatMul, Add, Tanh, CumSum, Sqrt and Div). Greedy generation re-runs the graph on
the growing sequence and takes the argmax of the last position. Vocabulary: 0 <unk>, 1 <s>, 2 </s>,
then byte b is token 3 + b (the same ids as the tiny GGUF's byte tokens). A bias favours printable
ASCII so greedy text is readable gibberish. MatMul weights are initializers, so `quantize_dynamic`
quantizes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from shared.formats.byte_vocab import BYTE_OFFSET
from shared.formats.byte_vocab import BYTE_VOCAB as VOCAB_SIZE

OPSET = 17
# IR version 8 pairs with opset 17 and loads in every onnxruntime that supports opset 17.
IR_VERSION = 8
_PRINTABLE_BIAS = 3.0


@dataclass(frozen=True)
class TinyOnnxShape:
    """Embedding width and hidden width of the tiny ONNX LM."""

    d_model: int
    d_hidden: int


ONNX_SHAPES: dict[str, TinyOnnxShape] = {
    "tiny": TinyOnnxShape(d_model=256, d_hidden=512),
    "small": TinyOnnxShape(d_model=512, d_hidden=1024),
}


def _weights(shape: TinyOnnxShape, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    d, h = shape.d_model, shape.d_hidden

    def matrix(n_in: int, n_out: int) -> np.ndarray:
        return (rng.standard_normal((n_in, n_out), dtype=np.float32) / np.sqrt(n_in)).astype(np.float32)

    out_bias = np.zeros(VOCAB_SIZE, dtype=np.float32)
    out_bias[BYTE_OFFSET + 0x20 : BYTE_OFFSET + 0x7F] = _PRINTABLE_BIAS
    return {
        "embed": rng.standard_normal((VOCAB_SIZE, d), dtype=np.float32),
        "w_in": matrix(d, h),
        "b_in": np.zeros(h, dtype=np.float32),
        "w_mid": matrix(h, d),
        "b_mid": np.zeros(d, dtype=np.float32),
        "w_out": matrix(d, VOCAB_SIZE),
        "b_out": out_bias,
    }


def _constants() -> list[onnx.TensorProto]:
    return [
        numpy_helper.from_array(np.array(1, dtype=np.int64), "one_i64"),
        numpy_helper.from_array(np.array(1, dtype=np.int64), "seq_axis_index"),
        numpy_helper.from_array(np.array(1, dtype=np.int64), "cumsum_axis"),
        numpy_helper.from_array(np.array([1, -1, 1], dtype=np.int64), "pos_shape"),
    ]


def _nodes() -> list[onnx.NodeProto]:
    node = helper.make_node
    return [
        node("Gather", ["embed", "input_ids"], ["emb"]),
        node("MatMul", ["emb", "w_in"], ["h1_mm"]),
        node("Add", ["h1_mm", "b_in"], ["h1_pre"]),
        node("Tanh", ["h1_pre"], ["h1"]),
        # Causal mixing: the running sum of h1 over positions 0..t divided by sqrt(t + 1), which keeps
        # its scale that of one position, so the whole prefix keeps steering the next token.
        node("CumSum", ["h1", "cumsum_axis"], ["h1_cum"]),
        node("Shape", ["input_ids"], ["ids_shape"]),
        node("Gather", ["ids_shape", "seq_axis_index"], ["seq_len"], axis=0),
        node("Add", ["seq_len", "one_i64"], ["seq_end"]),
        node("Range", ["one_i64", "seq_end", "one_i64"], ["positions"]),
        node("Cast", ["positions"], ["positions_f"], to=TensorProto.FLOAT),
        node("Sqrt", ["positions_f"], ["positions_sqrt"]),
        node("Reshape", ["positions_sqrt", "pos_shape"], ["scales"]),
        node("Div", ["h1_cum", "scales"], ["h1_mean"]),
        node("Add", ["h1", "h1_mean"], ["mixed"]),
        node("MatMul", ["mixed", "w_mid"], ["h2_mm"]),
        node("Add", ["h2_mm", "b_mid"], ["h2_pre"]),
        node("Tanh", ["h2_pre"], ["h2"]),
        node("MatMul", ["h2", "w_out"], ["logits_mm"]),
        node("Add", ["logits_mm", "b_out"], ["logits"]),
    ]


def build_tiny_onnx(*, seed: int = 0, size: Literal["tiny", "small"] = "tiny") -> onnx.ModelProto:
    """The tiny decoder LM as an in-memory ONNX model (checked with onnx.checker)."""
    if size not in ONNX_SHAPES:
        raise ValueError(f"unknown size {size!r}; expected one of {sorted(ONNX_SHAPES)}")
    weights = _weights(ONNX_SHAPES[size], seed)
    initializers = [numpy_helper.from_array(array, name) for name, array in weights.items()]
    graph = helper.make_graph(
        _nodes(),
        f"slmops-tiny-{size}-s{seed}",
        inputs=[helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        outputs=[helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", VOCAB_SIZE])],
        initializer=initializers + _constants(),
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="slmops.tinymodels",
        ir_version=IR_VERSION,
    )
    helper.set_model_props(model, {"slmops.vocab": "bytes+3", "slmops.kind": "decoder-lm"})
    onnx.checker.check_model(model)
    return model


def write_tiny_onnx(path: Path | str, *, seed: int = 0, size: Literal["tiny", "small"] = "tiny") -> Path:
    """Write the tiny decoder LM to `path`; the same seed and size always give the same bytes."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(build_tiny_onnx(seed=seed, size=size).SerializeToString())
    return out


def write_tiny_onnx_folder(
    folder: Path | str, *, seed: int = 0, size: Literal["tiny", "small"] = "tiny", one_file: bool = True
) -> Path:
    """Write the tiny LM as Olive and optimum write large models: `model.onnx` plus external data files.

    `one_file` keeps every weight in `model.onnx.data`; otherwise each tensor gets a file of its own.
    Returns the folder.
    """
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    model = build_tiny_onnx(seed=seed, size=size)
    for stale in ["model.onnx", "model.onnx.data", *(t.name for t in model.graph.initializer)]:
        (out / stale).unlink(missing_ok=True)  # onnx appends to an existing external data file
    onnx.save_model(
        model,
        str(out / "model.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=one_file,
        location="model.onnx.data" if one_file else None,
        size_threshold=1024,  # small shape constants stay inline: shape inference must read them
    )
    return out
