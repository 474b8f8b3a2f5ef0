"""Quantization with the real llama.cpp and onnxruntime quantizers, and the CLI around them."""

from __future__ import annotations

import shutil
from pathlib import Path

import gguf
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from typer.testing import CliRunner

from edge_agent.runtime import FINISH_LENGTH, load_engine
from slmops.cli import tiny  # noqa: F401  (registers the commands on model_app)
from slmops.cli.app import app
from slmops.modelopt import QuantizeError, quantize_gguf, quantize_onnx_int8
from slmops.modelopt.evaluate import default_prompts, greedy_agreement
from slmops.tinymodels import TinyLlamaShape, write_tiny_gguf, write_tiny_onnx

# Widths that are multiples of 32 but not of 256: fine for Q8_0, impossible for K-quants.
ODD_SHAPE = TinyLlamaShape(n_layer=1, n_embd=96, n_ff=160, n_head=2, n_head_kv=2)


@pytest.mark.llama
@pytest.mark.parametrize(
    ("quant_type", "tensor_type"),
    [
        ("Q8_0", gguf.GGMLQuantizationType.Q8_0),
        ("Q4_0", gguf.GGMLQuantizationType.Q4_0),
        ("Q4_K_M", gguf.GGMLQuantizationType.Q4_K),
    ],
)
def test_quantized_gguf_is_smaller_and_generates(
    tmp_path: Path, tiny_gguf: Path, quant_type: str, tensor_type: gguf.GGMLQuantizationType
) -> None:
    pytest.importorskip("llama_cpp")
    result = quantize_gguf(tiny_gguf, tmp_path / f"tiny-{quant_type}.gguf", quant_type)
    assert result.dst.is_file()
    assert result.size_after < result.size_before * 0.3
    assert result.size_after == result.dst.stat().st_size
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(result.dst).tensors}
    assert types["blk.0.attn_q.weight"] == tensor_type
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    # The quantized model loads and generates through the engine: the case native builds crash on.
    engine = load_engine(result.dst, "gguf", n_ctx=64)
    chunks = list(engine.complete("Hello", max_tokens=8))
    chat = list(engine.chat([{"role": "user", "content": "hi"}], max_tokens=4))
    engine.close()
    assert len(chunks) == 9 and chunks[-1].finish_reason == FINISH_LENGTH
    assert chat[-1].finish_reason == FINISH_LENGTH


@pytest.mark.llama
def test_quantizing_is_deterministic(tmp_path: Path, tiny_gguf: Path) -> None:
    pytest.importorskip("llama_cpp")
    first = quantize_gguf(tiny_gguf, tmp_path / "a.gguf", "Q4_0")
    second = quantize_gguf(tiny_gguf, tmp_path / "b.gguf", "Q4_0")
    assert first.sha256 == second.sha256


def test_unknown_type_is_refused(tmp_path: Path, tiny_gguf: Path) -> None:
    with pytest.raises(QuantizeError, match="unknown GGUF quantization type"):
        quantize_gguf(tiny_gguf, tmp_path / "x.gguf", "Q9_9")
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.llama
def test_rows_a_type_cannot_hold_are_refused_before_llama_cpp(tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp")
    odd = write_tiny_gguf(tmp_path / "odd.gguf", shape=ODD_SHAPE)
    with pytest.raises(QuantizeError, match="multiples of 256") as info:
        quantize_gguf(odd, tmp_path / "odd-q4k.gguf", "Q4_K_M")
    assert "row 96" in str(info.value)
    assert not (tmp_path / "odd-q4k.gguf").exists()
    # The same model quantizes to a 32-block type and still runs.
    result = quantize_gguf(odd, tmp_path / "odd-q8.gguf", "Q8_0")
    engine = load_engine(result.dst, "gguf", n_ctx=32)
    assert list(engine.complete("hi", max_tokens=2))[-1].finish_reason == FINISH_LENGTH
    engine.close()


@pytest.mark.llama
def test_already_quantized_source_is_refused(tmp_path: Path, tiny_gguf: Path) -> None:
    pytest.importorskip("llama_cpp")
    q8 = quantize_gguf(tiny_gguf, tmp_path / "q8.gguf", "Q8_0").dst
    with pytest.raises(QuantizeError, match="already quantized"):
        quantize_gguf(q8, tmp_path / "q4.gguf", "Q4_0")


def test_bad_sources_are_refused(tmp_path: Path, tiny_gguf: Path, tiny_onnx: Path) -> None:
    with pytest.raises(QuantizeError, match="not found"):
        quantize_gguf(tmp_path / "absent.gguf", tmp_path / "out.gguf", "Q8_0")
    with pytest.raises(QuantizeError, match="not a readable GGUF"):
        quantize_gguf(tiny_onnx, tmp_path / "out.gguf", "Q8_0")
    copy = shutil.copy(tiny_gguf, tmp_path / "same.gguf")
    with pytest.raises(QuantizeError, match="differ"):
        quantize_gguf(copy, copy, "Q8_0")


def _greedy_ids(session: ort.InferenceSession, prompt: list[int], steps: int) -> list[int]:
    ids = list(prompt)
    for _ in range(steps):
        logits = session.run(["logits"], {"input_ids": np.asarray([ids], dtype=np.int64)})[0]
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt) :]


def test_onnx_int8_is_smaller_and_runs(tmp_path: Path, tiny_onnx: Path) -> None:
    result = quantize_onnx_int8(tiny_onnx, tmp_path / "tiny-int8.onnx")
    assert result.size_after < result.size_before * 0.4
    float_session = ort.InferenceSession(str(tiny_onnx), providers=["CPUExecutionProvider"])
    int8_session = ort.InferenceSession(str(result.dst), providers=["CPUExecutionProvider"])
    ops = {node.op_type for node in onnx.load(str(result.dst)).graph.node}
    assert ops & {"MatMulInteger", "DynamicQuantizeLinear", "DynamicQuantizeMatMul"}
    prompt = [1] + [3 + b for b in b"Hello"]
    float_ids, int8_ids = _greedy_ids(float_session, prompt, 8), _greedy_ids(int8_session, prompt, 8)
    assert len(int8_ids) == 8 and all(0 <= t < 259 for t in int8_ids)
    # Quantization noise may flip some argmaxes, but not the first one of a random model this size.
    assert float_ids[0] == int8_ids[0]
    engine = load_engine(result.dst, "onnx")
    assert list(engine.complete("Hello", max_tokens=3))[-1].finish_reason == FINISH_LENGTH


def test_onnx_quantize_refuses_a_non_onnx_file(tmp_path: Path, tiny_gguf: Path) -> None:
    with pytest.raises(QuantizeError, match="onnxruntime failed"):
        quantize_onnx_int8(tiny_gguf, tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()
    assert not (tmp_path / "x.onnx.partial").exists()


def test_cli_make_tiny_writes_reproducible_models(tmp_path: Path) -> None:
    runner = CliRunner()
    outputs = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.gguf"
        result = runner.invoke(
            app, ["model", "make-tiny", "--format", "gguf", "--out", str(out), "--seed", "5"]
        )
        assert result.exit_code == 0, result.output
        assert str(out) in result.output and "sha256" in result.output
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]
    onnx_out = tmp_path / "m.onnx"
    result = runner.invoke(app, ["model", "make-tiny", "--format", "onnx", "--out", str(onnx_out)])
    assert result.exit_code == 0 and onnx_out.stat().st_size > 0
    refused = runner.invoke(app, ["model", "make-tiny", "--format", "onnx", "--slow", "--out", str(onnx_out)])
    assert refused.exit_code != 0


@pytest.mark.llama
def test_cli_quantize_and_lora(tmp_path: Path, tiny_gguf: Path) -> None:
    pytest.importorskip("llama_cpp")
    runner = CliRunner()
    out = tmp_path / "q.gguf"
    result = runner.invoke(app, ["model", "quantize", str(tiny_gguf), str(out), "--to", "q4_k_m"])
    assert result.exit_code == 0, result.output
    assert "Q4_K_M" in result.output and out.stat().st_size < tiny_gguf.stat().st_size
    bad = runner.invoke(app, ["model", "quantize", str(tiny_gguf), str(out), "--to", "Q9"])
    assert bad.exit_code == 2
    lora = tmp_path / "lora.gguf"
    result = runner.invoke(app, ["model", "make-tiny", "--out", str(lora), "--lora-of", str(tiny_gguf)])
    assert result.exit_code == 0, result.output
    engine = load_engine(tiny_gguf, "gguf", n_ctx=32, lora_path=lora)
    assert list(engine.complete("hi", max_tokens=2))[-1].finish_reason == FINISH_LENGTH
    engine.close()


@pytest.mark.llama
def test_greedy_agreement_ranks_quantization_quality(tmp_path: Path, tiny_gguf: Path) -> None:
    pytest.importorskip("llama_cpp")
    reference = load_engine(tiny_gguf, "gguf", n_ctx=256)
    agreement = {}
    for quant_type in ("Q8_0", "Q2_K"):
        candidate = load_engine(
            quantize_gguf(tiny_gguf, tmp_path / f"{quant_type}.gguf", quant_type).dst, "gguf"
        )
        agreement[quant_type] = greedy_agreement(reference, candidate, max_tokens=12).token_agreement
        candidate.close()
    assert greedy_agreement(reference, reference, max_tokens=12).exact_match_rate == 1.0
    assert 1.0 >= agreement["Q8_0"] > agreement["Q2_K"] >= 0.0
    reference.close()


def test_greedy_agreement_separates_different_models(tmp_path: Path) -> None:
    prompts = default_prompts()[:4]
    assert len(prompts) == 4 and all(p.strip() for p in prompts)
    reference = load_engine(write_tiny_onnx(tmp_path / "a.onnx", seed=10), "onnx")
    other = load_engine(write_tiny_onnx(tmp_path / "b.onnx", seed=11), "onnx")
    same = greedy_agreement(reference, reference, prompts, max_tokens=8)
    different = greedy_agreement(reference, other, prompts, max_tokens=8)
    assert same.token_agreement == 1.0 and same.prompts[0].exact
    assert different.token_agreement < 0.5


def test_cli_compare_reports_agreement(tiny_onnx: Path) -> None:
    result = CliRunner().invoke(
        app, ["model", "compare", str(tiny_onnx), str(tiny_onnx), "--max-tokens", "4"]
    )
    assert result.exit_code == 0, result.output
    assert "token agreement 100.0%" in result.output
