"""Quantization as a control-plane job on real tiny models, and eval metrics stored over REST."""

from __future__ import annotations

import hashlib
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session

from control_plane.models import Job
from control_plane.services.quantize_jobs import QuantizeJobs
from control_plane.storage import LocalBlobStore
from slmops.tinymodels import TinyLlamaShape, write_tiny_gguf
from tests.support.fleet import upload_version
from tests.support.gguf_craft import U8, gguf_file, kv_array, llama_kvs, tensor_info
from tests.support.waiting import wait_for

# Rows of 96: fine for 32-blocks (Q8_0), impossible for 256-blocks (K-quants).
ODD_SHAPE = TinyLlamaShape(n_layer=1, n_embd=96, n_ff=160, n_head=2, n_head_kv=2)


def _finished_job(client: TestClient, headers: dict[str, str], job_id: str) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        body = client.get(f"/v1/jobs/{job_id}", headers=headers).json()
        return body if body["state"] in ("succeeded", "failed") else None

    return wait_for(done, timeout_s=120, what=f"job {job_id}")  # type: ignore[no-any-return]


@pytest.mark.llama
def test_a_quantize_job_registers_a_smaller_version_with_lineage(
    client: TestClient, operator_headers: dict[str, str], viewer_headers: dict[str, str], tiny_gguf: Path
) -> None:
    pytest.importorskip("llama_cpp")
    client.post("/v1/models", json={"name": "tiny"}, headers=operator_headers).raise_for_status()
    parent = upload_version(client, operator_headers, "tiny", "1.0", tiny_gguf)
    started = client.post("/v1/models/tiny/versions/1.0/quantize", json={"to": "q4_0"}, headers=operator_headers)
    assert started.status_code == 202, started.text
    assert started.json()["state"] in ("queued", "running", "succeeded")
    job = _finished_job(client, viewer_headers, started.json()["id"])
    assert job["state"] == "succeeded", job
    assert job["progress"] == 1.0 and job["result"]["version"] == "1.0-q4_0"

    version = client.get("/v1/models/tiny/versions/1.0-q4_0", headers=viewer_headers).json()
    assert version["parent"] == {"model": "tiny", "version": "1.0", "relation": "quantized_from"}
    (artifact,) = version["artifacts"]
    assert artifact["quantization"] == "Q4_0" and artifact["format"] == "gguf"
    assert artifact["size_bytes"] < parent["artifacts"][0]["size_bytes"] * 0.3
    assert version["eval_metrics"]["size_reduction"] == pytest.approx(
        1 - artifact["size_bytes"] / parent["artifacts"][0]["size_bytes"], abs=1e-4
    )
    # The stored bytes are a real Q4_0 model with the recorded digest.
    data = client.get(f"/v1/artifacts/{artifact['sha256']}", headers=viewer_headers).content
    assert hashlib.sha256(data).hexdigest() == artifact["sha256"]
    assert b"GGUF" == data[:4]
    # Quantizing to a name that exists is refused before any work is queued.
    again = client.post("/v1/models/tiny/versions/1.0/quantize", json={"to": "Q4_0"}, headers=operator_headers)
    assert again.status_code == 409 and again.json()["code"] == "version_exists"


@pytest.mark.llama
def test_shapes_a_type_cannot_hold_are_a_422_not_a_failed_job(
    client: TestClient, operator_headers: dict[str, str], tmp_path: Path
) -> None:
    pytest.importorskip("llama_cpp")
    odd = write_tiny_gguf(tmp_path / "odd.gguf", shape=ODD_SHAPE)
    client.post("/v1/models", json={"name": "odd"}, headers=operator_headers).raise_for_status()
    upload_version(client, operator_headers, "odd", "1", odd)
    refused = client.post("/v1/models/odd/versions/1/quantize", json={"to": "Q4_K_M"}, headers=operator_headers)
    assert refused.status_code == 422
    assert refused.json()["code"] == "quantization_unsupported"
    assert "multiples of 256" in refused.json()["detail"]
    unknown = client.post("/v1/models/odd/versions/1/quantize", json={"to": "Q9_9"}, headers=operator_headers)
    assert unknown.status_code == 422 and unknown.json()["code"] == "quantization_unsupported"
    assert client.get("/v1/models/odd/versions", headers=operator_headers).json()["data"][0]["version"] == "1"
    assert len(client.get("/v1/models/odd/versions", headers=operator_headers).json()["data"]) == 1


def test_a_two_million_item_metadata_array_is_checked_for_quantization_in_bounded_memory(
    client: TestClient, operator_headers: dict[str, str], tmp_path: Path
) -> None:
    items = 2_000_000  # a well-formed header near the reader's array limit
    token_types = kv_array("tokenizer.ggml.token_type", U8, items, bytes(items))
    weight = tensor_info("blk.0.attn_q.weight", [32, 4])  # rows of 32: Q8_0 fits, K-quants do not
    path = tmp_path / "big-array.gguf"
    path.write_bytes(gguf_file(llama_kvs(token_types), [weight], data=bytes(32 * 4 * 4)))
    client.post("/v1/models", json={"name": "vocab"}, headers=operator_headers).raise_for_status()
    upload_version(client, operator_headers, "vocab", "1", path)

    tracemalloc.start()
    try:
        refused = client.post("/v1/models/vocab/versions/1/quantize", json={"to": "Q4_K_M"}, headers=operator_headers)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (refused.status_code, refused.json()["code"]) == (422, "quantization_unsupported")
    assert "blk.0.attn_q.weight (row 32)" in refused.json()["detail"]
    assert peak < 16 * 1024**2  # the array is stepped over, never materialised


def test_onnx_quantizes_to_int8_only(client: TestClient, operator_headers: dict[str, str], tiny_onnx: Path) -> None:
    client.post("/v1/models", json={"name": "byte-lm"}, headers=operator_headers).raise_for_status()
    upload_version(client, operator_headers, "byte-lm", "1", tiny_onnx)
    refused = client.post("/v1/models/byte-lm/versions/1/quantize", json={"to": "Q4_0"}, headers=operator_headers)
    assert refused.status_code == 422 and refused.json()["code"] == "quantization_unsupported"
    started = client.post(
        "/v1/models/byte-lm/versions/1/quantize", json={"to": "int8", "version": "1-int8"}, headers=operator_headers
    )
    assert started.status_code == 202, started.text
    job = _finished_job(client, operator_headers, started.json()["id"])
    assert job["state"] == "succeeded", job
    version = client.get("/v1/models/byte-lm/versions/1-int8", headers=operator_headers).json()
    assert version["artifacts"][0]["format"] == "onnx" and version["artifacts"][0]["quantization"] == "int8"
    assert version["eval_metrics"]["size_reduction"] > 0.6
    static = client.post("/v1/models/byte-lm/versions/1/quantize", json={"to": "INT8-static"}, headers=operator_headers)
    assert static.status_code == 202, static.text
    assert _finished_job(client, operator_headers, static.json()["id"])["state"] == "succeeded"
    calibrated = client.get("/v1/models/byte-lm/versions/1-int8-static", headers=operator_headers).json()
    assert calibrated["artifacts"][0]["quantization"] == "int8-static"
    assert calibrated["parent"]["relation"] == "quantized_from"


def test_eval_metrics_are_stored_on_version_and_artifact(
    client: TestClient, operator_headers: dict[str, str], viewer_headers: dict[str, str], tiny_onnx: Path
) -> None:
    client.post("/v1/models", json={"name": "m"}, headers=operator_headers).raise_for_status()
    sha = upload_version(client, operator_headers, "m", "1", tiny_onnx)["artifacts"][0]["sha256"]
    body = {"metrics": {"quality_retention": 0.95, "tokens_per_s": 12.5}, "artifact_sha256": sha, "against": "m@0"}
    stored = client.put("/v1/models/m/versions/1/eval-metrics", json=body, headers=operator_headers)
    assert stored.status_code == 200, stored.text
    assert stored.json()["eval_metrics"]["quality_retention"] == 0.95
    assert stored.json()["artifacts"][0]["eval_metrics"]["evaluated_against"] == "m@0"
    later = {"metrics": {"tokens_per_s": 20.0}}
    merged = client.put("/v1/models/m/versions/1/eval-metrics", json=later, headers=operator_headers).json()
    assert merged["eval_metrics"]["tokens_per_s"] == 20.0 and merged["eval_metrics"]["quality_retention"] == 0.95
    assert client.put("/v1/models/m/versions/1/eval-metrics", json=body, headers=viewer_headers).status_code == 403
    wrong = {"metrics": {}, "artifact_sha256": "0" * 64}
    missing = client.put("/v1/models/m/versions/1/eval-metrics", json=wrong, headers=operator_headers)
    assert missing.status_code == 404 and missing.json()["code"] == "artifact_not_found"
    assert client.get("/v1/jobs/nope", headers=viewer_headers).json()["code"] == "job_not_found"


def test_a_job_a_restart_interrupted_is_reported_failed(
    client: TestClient, operator_headers: dict[str, str], engine: Any, tmp_path: Path
) -> None:
    with Session(engine) as session:
        job = Job(kind="quantize", state="running", progress=0.1, step="quantizing", target="m@1 -> m@1-q8_0")
        session.add(job)
        session.commit()
        job_id = job.id
    QuantizeJobs(engine, LocalBlobStore(tmp_path / "blobs"))  # what a restarted control plane builds
    status = client.get(f"/v1/jobs/{job_id}", headers=operator_headers).json()
    assert status["state"] == "failed" and "restarted" in status["error"]
