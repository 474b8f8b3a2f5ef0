"""Quantizing what users have: a published (quantized) GGUF is dequantized exactly, variants come from
that float parent, and requantizing directly stays refused (real SmolLM2 and tiny models)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import gguf.quants
import numpy as np
import pytest
from fastapi.testclient import TestClient

from edge_agent.runtime import load_engine
from slmops.modelopt import QuantizeError, quantize_gguf
from tests.support.fleet import upload_version
from tests.support.waiting import wait_for

pytestmark = pytest.mark.llama


def _weights(path: Path) -> dict[str, Any]:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def test_a_published_q4_1_gguf_dequantizes_exactly_to_f32(
    smollm2_path: Path, smollm2_variant: Callable[[str], Path]
) -> None:
    source, parent = _weights(smollm2_path), _weights(smollm2_variant("F32"))
    assert {t.tensor_type for t in source.values()} >= {gguf.GGMLQuantizationType.Q4_1}
    assert source.keys() == parent.keys()
    for name, tensor in source.items():
        written = parent[name]
        assert written.tensor_type == gguf.GGMLQuantizationType.F32, name
        # Every value is the source's own dequantized value: a lossless upcast, not an approximation.
        want = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(-1)
        assert np.array_equal(np.asarray(written.data).reshape(-1), want), name


def test_f16_cannot_hold_q4_1_values_so_it_is_refused(smollm2_path: Path, tmp_path: Path) -> None:
    with pytest.raises(QuantizeError, match="F16 cannot hold every value .* dequantize to F32"):
        quantize_gguf(smollm2_path, tmp_path / "f16.gguf", "F16")
    assert not list(tmp_path.iterdir())


def test_requantizing_a_quantized_file_is_refused_with_the_way_out(smollm2_path: Path, tmp_path: Path) -> None:
    with pytest.raises(QuantizeError, match=r"already quantized .* dequantize it first \(quantize --to F32"):
        quantize_gguf(smollm2_path, tmp_path / "q4.gguf", "Q4_K_M")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(("quant_type", "own_type"), [("Q8_0", "Q8_0"), ("Q4_K_M", "Q4_K"), ("Q2_K", "Q3_K")])
def test_variants_are_made_from_the_float_parent_and_generate(
    smollm2_variant: Callable[[str], Path], quant_type: str, own_type: str
) -> None:
    path = smollm2_variant(quant_type)
    types = {t.tensor_type.name for t in _weights(path).values()}
    # SmolLM2's 576-wide rows take no 256-block K-quant: llama.cpp stores those in a 32-block type,
    # and the 1536-wide ffn_down rows get the K-quant itself.
    assert own_type in types, types
    assert path.stat().st_size < smollm2_variant("F32").stat().st_size / 3
    engine = load_engine(path, "gguf", n_ctx=128)
    try:
        chunks = list(engine.chat([{"role": "user", "content": "What is the capital of France?"}], max_tokens=8))
    finally:
        engine.close()
    assert chunks[-1].finish_reason is not None and "".join(c.text for c in chunks).strip()


def test_a_dequantize_job_records_dequantized_from_and_variants_follow(
    client: TestClient, operator_headers: dict[str, str], tiny_gguf: Path, tmp_path: Path
) -> None:
    published = quantize_gguf(tiny_gguf, tmp_path / "published-q8.gguf", "Q8_0").dst
    client.post("/v1/models", json={"name": "pub"}, headers=operator_headers).raise_for_status()
    upload_version(client, operator_headers, "pub", "1", published)
    direct = client.post("/v1/models/pub/versions/1/quantize", json={"to": "Q4_0"}, headers=operator_headers)
    assert direct.status_code == 422 and direct.json()["code"] == "quantization_unsupported"
    assert "dequantize it first" in direct.json()["detail"]

    _run_job(client, operator_headers, "pub", "1", {"to": "F32", "version": "1-f32"})
    parent = client.get("/v1/models/pub/versions/1-f32", headers=operator_headers).json()
    assert parent["parent"] == {"model": "pub", "version": "1", "relation": "dequantized_from"}
    assert parent["artifacts"][0]["quantization"] == "F32"
    _run_job(client, operator_headers, "pub", "1-f32", {"to": "Q4_0", "version": "1-q4_0"})
    variant = client.get("/v1/models/pub/versions/1-q4_0", headers=operator_headers).json()
    assert variant["parent"] == {"model": "pub", "version": "1-f32", "relation": "quantized_from"}


def _run_job(client: TestClient, headers: dict[str, str], model: str, version: str, body: dict[str, str]) -> None:
    started = client.post(f"/v1/models/{model}/versions/{version}/quantize", json=body, headers=headers)
    assert started.status_code == 202, started.text

    def done() -> dict[str, Any] | None:
        job = client.get(f"/v1/jobs/{started.json()['id']}", headers=headers).json()
        return job if job["state"] in ("succeeded", "failed") else None

    job = wait_for(done, timeout_s=120, what="quantize job")
    assert job["state"] == "succeeded", job
