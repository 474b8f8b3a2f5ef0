"""Evaluation of real quantized tiny models against their real parents (llama.cpp, onnxruntime)."""

from __future__ import annotations

from pathlib import Path

import pytest

from slmops.modelopt import quantize_gguf, quantize_onnx_int8
from slmops.modelopt.compare import evaluate_files, format_table, metrics_against
from slmops.modelopt.measure import eval_texts, measure_here


def test_the_text_set_is_shipped_and_non_trivial() -> None:
    texts = eval_texts()
    assert len(texts) >= 4
    assert all(not t.startswith("#") for t in texts)
    assert sum(len(t) for t in texts) > 800


@pytest.mark.llama
def test_gguf_quantized_variants_are_measured_against_their_parent(tmp_path: Path, tiny_gguf: Path) -> None:
    pytest.importorskip("llama_cpp")
    q8 = quantize_gguf(tiny_gguf, tmp_path / "q8.gguf", "Q8_0").dst
    q4 = quantize_gguf(tiny_gguf, tmp_path / "q4.gguf", "Q4_0").dst
    parent = measure_here(tiny_gguf, "gguf")
    m8 = metrics_against(parent, measure_here(q8, "gguf"))
    m4 = metrics_against(parent, measure_here(q4, "gguf"))
    # The parent against itself agrees everywhere: the metric measures differences, not noise.
    assert metrics_against(parent, measure_here(tiny_gguf, "gguf"))["quality_retention"] == 1.0
    assert 0.0 < m4["quality_retention"] < m8["quality_retention"] < 1.0
    assert m8["size_reduction"] > 0.7 and m4["size_reduction"] > m8["size_reduction"]
    assert m8["perplexity"] > 1.0 and m8["parent_perplexity"] == round(parent.perplexity or 0, 4)
    for key in ("load_s", "ms_per_token", "tokens_per_s", "peak_rss_mb"):
        assert m8[key] > 0 and m8["parent_" + key] > 0
    table = format_table(m8, "Q8_0", "F32")
    assert "perplexity" in table and "quality_retention" in table and "Q8_0" in table


def test_onnx_int8_is_compared_by_argmax_and_max_abs_diff(tmp_path: Path, tiny_onnx: Path) -> None:
    int8 = quantize_onnx_int8(tiny_onnx, tmp_path / "int8.onnx").dst
    # Measured in spawned processes, as the CLI does: peak RSS is each model's own.
    metrics = evaluate_files(str(int8), str(tiny_onnx), "onnx")
    assert 0.5 < metrics["argmax_agreement"] < 1.0
    assert metrics["quality_retention"] == metrics["argmax_agreement"]
    assert 0.0 < metrics["max_abs_diff"] < 1.0
    assert metrics["size_reduction"] > 0.6
    assert metrics["peak_rss_mb"] > 10 and metrics["tokens_per_s"] > 0


def test_models_of_different_shapes_are_not_compared(tmp_path: Path, tiny_gguf: Path, tiny_onnx: Path) -> None:
    pytest.importorskip("llama_cpp")
    with pytest.raises(ValueError, match="not comparable"):
        metrics_against(measure_here(tiny_onnx, "onnx"), measure_here(tiny_gguf, "gguf"))


@pytest.mark.llama
def test_an_adapter_is_measured_on_its_base_and_judged_by_perplexity(tiny_gguf: Path, tiny_lora_gguf: Path) -> None:
    pytest.importorskip("llama_cpp")
    base = measure_here(tiny_gguf, "gguf")
    adapted = measure_here(tiny_gguf, "gguf", lora_path=tiny_lora_gguf)
    assert adapted.size_bytes == tiny_lora_gguf.stat().st_size
    metrics = metrics_against(base, adapted, relation="adapter_of")
    # The adapter changes predictions (that is its job), so it is judged by perplexity instead.
    assert metrics["next_token_agreement"] < 1.0
    assert metrics["retention_basis"] == "perplexity_ratio"
    assert metrics["quality_retention"] == pytest.approx(base.perplexity / adapted.perplexity, abs=1e-3)  # type: ignore[operator]
    assert metrics["size_reduction"] > 0.9
    quantized_view = metrics_against(base, adapted)
    assert quantized_view["retention_basis"] == "next_token_agreement"


def test_onnx_static_int8_is_calibrated_and_compared(tmp_path: Path, tiny_onnx: Path) -> None:
    import onnx

    from control_plane.modelopt.onnx_static import quantize_onnx_int8_static

    result = quantize_onnx_int8_static(tiny_onnx, tmp_path / "static.onnx")
    ops = {node.op_type for node in onnx.load(str(result.dst)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # activations quantized too (QDQ)
    metrics = metrics_against(measure_here(tiny_onnx, "onnx"), measure_here(result.dst, "onnx"))
    assert 0.5 < metrics["argmax_agreement"] < 1.0 and metrics["size_reduction"] > 0.6
    assert not list(tmp_path.glob("*augmented*"))  # calibration leaves no intermediate model behind
