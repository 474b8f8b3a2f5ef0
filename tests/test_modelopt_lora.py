"""Adapters are checked against their base before llama.cpp sees them (a mismatch would crash it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.runtime import FINISH_LENGTH, ModelLoadError, load_engine
from shared.formats.lora import lora_mismatches
from slmops.tinymodels import write_tiny_gguf, write_tiny_lora_gguf


@pytest.fixture(scope="module")
def other_base_lora(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("other-base")
    small = write_tiny_gguf(folder / "small.gguf", seed=3, size="small")
    return write_tiny_lora_gguf(small, folder / "small-lora.gguf")


def test_an_adapter_fits_its_own_base_only(tiny_gguf: Path, tiny_lora_gguf: Path, other_base_lora: Path) -> None:
    assert lora_mismatches(tiny_gguf, tiny_lora_gguf) == []
    problems = lora_mismatches(tiny_gguf, other_base_lora)
    assert "blk.0.attn_q.weight: base [256, 256], lora_a [512, 8], lora_b [8, 512]" in problems
    assert "blk.3.attn_q.weight: not in the base model" in problems
    assert lora_mismatches(tiny_gguf, tiny_gguf) == ["the adapter has no lora_a/lora_b tensors"]


@pytest.mark.llama
def test_the_engine_refuses_a_mismatched_adapter_instead_of_crashing(
    tiny_gguf: Path, tiny_lora_gguf: Path, other_base_lora: Path
) -> None:
    pytest.importorskip("llama_cpp")
    with pytest.raises(ModelLoadError, match="does not fit"):
        load_engine(tiny_gguf, "gguf", n_ctx=32, lora_path=other_base_lora)
    engine = load_engine(tiny_gguf, "gguf", n_ctx=32, lora_path=tiny_lora_gguf)
    assert list(engine.complete("hi", max_tokens=2))[-1].finish_reason == FINISH_LENGTH
    engine.close()
