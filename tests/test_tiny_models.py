"""The tiny model writers produce deterministic, real GGUF and ONNX files."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import onnxruntime as ort
import pytest

from slmops.tinymodels import TINY_CHAT_TEMPLATE, write_tiny_gguf, write_tiny_lora_gguf, write_tiny_onnx
from slmops.tinymodels.gguf_tiny import SHAPES, SLOW_LAYER_FACTOR
from slmops.tinymodels.onnx_tiny import VOCAB_SIZE


def _field(reader: gguf.GGUFReader, key: str) -> object:
    return reader.fields[key].contents()


def test_gguf_bytes_depend_only_on_the_seed(tmp_path: Path) -> None:
    first = write_tiny_gguf(tmp_path / "a.gguf", seed=7).read_bytes()
    again = write_tiny_gguf(tmp_path / "b.gguf", seed=7).read_bytes()
    other = write_tiny_gguf(tmp_path / "c.gguf", seed=8).read_bytes()
    assert first == again
    assert first != other
    assert len(first) == len(other)


def test_gguf_is_a_llama_model_with_a_byte_fallback_vocabulary(tiny_gguf: Path) -> None:
    reader = gguf.GGUFReader(tiny_gguf)
    assert _field(reader, "general.architecture") == "llama"
    assert _field(reader, "tokenizer.ggml.model") == "llama"
    assert _field(reader, "tokenizer.chat_template") == TINY_CHAT_TEMPLATE
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert isinstance(tokens, list)
    assert {f"<0x{b:02X}>" for b in range(256)} <= set(tokens)
    assert tokens[:3] == ["<unk>", "<s>", "</s>"]
    assert _field(reader, "llama.block_count") == SHAPES["tiny"].n_layer


def test_gguf_weight_rows_suit_k_quants(tiny_gguf: Path) -> None:
    reader = gguf.GGUFReader(tiny_gguf)
    matrices = [t for t in reader.tensors if len(t.shape) >= 2]
    assert matrices
    assert all(int(t.shape[0]) % 256 == 0 for t in matrices)
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in reader.tensors)


def test_slow_and_small_variants_are_bigger(tmp_path: Path, tiny_gguf: Path) -> None:
    slow = gguf.GGUFReader(write_tiny_gguf(tmp_path / "slow.gguf", slow=True))
    assert _field(slow, "llama.block_count") == SHAPES["tiny"].n_layer * SLOW_LAYER_FACTOR
    layered = gguf.GGUFReader(write_tiny_gguf(tmp_path / "l3.gguf", layers=3))
    assert _field(layered, "llama.block_count") == 3
    small = write_tiny_gguf(tmp_path / "small.gguf", size="small")
    assert _field(gguf.GGUFReader(small), "llama.embedding_length") == SHAPES["small"].n_embd
    assert small.stat().st_size > tiny_gguf.stat().st_size


def test_unknown_size_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown size"):
        write_tiny_gguf(tmp_path / "x.gguf", size="huge")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown size"):
        write_tiny_onnx(tmp_path / "x.onnx", size="huge")  # type: ignore[arg-type]


def test_lora_adapter_matches_the_base_shapes(tmp_path: Path, tiny_gguf: Path) -> None:
    adapter = gguf.GGUFReader(write_tiny_lora_gguf(tiny_gguf, tmp_path / "lora.gguf", seed=1, rank=4))
    assert _field(adapter, "general.type") == "adapter"
    assert _field(adapter, "adapter.type") == "lora"
    shapes = {t.name: [int(d) for d in t.shape] for t in adapter.tensors}
    n_embd = SHAPES["tiny"].n_embd
    # ne order: lora_a is [n_in, rank], lora_b is [rank, n_out].
    assert shapes["blk.0.attn_q.weight.lora_a"] == [n_embd, 4]
    assert shapes["blk.0.attn_q.weight.lora_b"] == [4, n_embd]
    assert len(shapes) == 2 * 2 * SHAPES["tiny"].n_layer


def test_onnx_bytes_depend_only_on_the_seed(tmp_path: Path) -> None:
    first = write_tiny_onnx(tmp_path / "a.onnx", seed=3).read_bytes()
    assert first == write_tiny_onnx(tmp_path / "b.onnx", seed=3).read_bytes()
    assert first != write_tiny_onnx(tmp_path / "c.onnx", seed=4).read_bytes()


def _logits(session: ort.InferenceSession, ids: list[list[int]]) -> np.ndarray:
    return session.run(["logits"], {"input_ids": np.asarray(ids, dtype=np.int64)})[0]


def test_onnx_runs_in_onnxruntime_as_a_causal_lm(tiny_onnx: Path) -> None:
    session = ort.InferenceSession(str(tiny_onnx), providers=["CPUExecutionProvider"])
    prefix = [1, 3 + ord("H"), 3 + ord("i")]
    short = _logits(session, [prefix])
    longer = _logits(session, [[*prefix, 3 + ord("!"), 3 + ord("?")]])
    assert short.shape == (1, 3, VOCAB_SIZE)
    assert longer.shape == (1, 5, VOCAB_SIZE)
    # Causal: later tokens do not change earlier positions' logits; earlier tokens do change later ones.
    np.testing.assert_allclose(longer[:, :3], short, rtol=1e-5, atol=1e-5)
    other_start = _logits(session, [[1, 3 + ord("h"), 3 + ord("i")]])
    assert not np.allclose(other_start[0, 2], short[0, 2])


def test_onnx_handles_a_batch(tiny_onnx: Path) -> None:
    session = ort.InferenceSession(str(tiny_onnx), providers=["CPUExecutionProvider"])
    batch = _logits(session, [[1, 10, 11], [1, 12, 13]])
    single = _logits(session, [[1, 12, 13]])
    np.testing.assert_allclose(batch[1], single[0], rtol=1e-5, atol=1e-5)
