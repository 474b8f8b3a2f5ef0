"""Model registry over REST with real tiny GGUF/ONNX files: upload, sniff, download, dedup, refusals."""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx
from fastapi.testclient import TestClient

from tests.support.gguf_craft import DECLARES_2_63_BYTES
from tests.support.onnx_craft import with_external_data
from tests.support.server_thread import ServerThread


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _create_model(client: TestClient, headers: dict[str, str], name: str = "tinyllama") -> None:
    response = client.post("/v1/models", json={"name": name, "description": "test"}, headers=headers)
    assert response.status_code == 201, response.text


def _upload(client, headers, path: Path, version: str, model: str = "tinyllama", **fields):  # type: ignore[no-untyped-def]
    with path.open("rb") as fh:
        return client.post(
            f"/v1/models/{model}/versions",
            data={"version": version, **fields},
            files={"file": (path.name, fh, "application/octet-stream")},
            headers=headers,
        )


def _blob_files(settings) -> list[Path]:  # type: ignore[no-untyped-def]
    root = settings.blob_dir
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def test_gguf_upload_download_round_trip_with_ranges(client, operator_headers, viewer_headers, tiny_gguf, settings):  # type: ignore[no-untyped-def]
    _create_model(client, operator_headers)
    digest = _sha(tiny_gguf)
    response = _upload(client, operator_headers, tiny_gguf, "1.0.0", sha256=digest, notes="first")
    assert response.status_code == 201, response.text
    version = response.json()
    artifact = version["artifacts"][0]
    assert artifact["sha256"] == digest
    assert artifact["size_bytes"] == tiny_gguf.stat().st_size
    assert artifact["format"] == "gguf"
    assert artifact["storage_key"] == f"blobs/sha256/{digest}"
    assert artifact["file_metadata"]["architecture"] == "llama"
    assert artifact["file_metadata"]["tensor_count"] > 0
    assert artifact["quantization"]  # read from general.file_type
    assert artifact["runtime_hints"]["context_length"] > 0
    assert (settings.blob_dir / "sha256" / digest).is_file()

    shown = client.get("/v1/models/tinyllama/versions/1.0.0", headers=viewer_headers)
    assert shown.status_code == 200 and shown.json()["artifacts"][0]["sha256"] == digest

    full = client.get(f"/v1/artifacts/{digest}", headers=viewer_headers)
    assert full.status_code == 200
    assert full.content == tiny_gguf.read_bytes()
    assert full.headers["etag"] == f'"{digest}"'
    assert int(full.headers["content-length"]) == tiny_gguf.stat().st_size

    size = tiny_gguf.stat().st_size
    part = client.get(f"/v1/artifacts/{digest}", headers={**viewer_headers, "Range": "bytes=100-199"})
    assert part.status_code == 206
    assert part.content == tiny_gguf.read_bytes()[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{size}"

    tail = client.get(f"/v1/artifacts/{digest}", headers={**viewer_headers, "Range": f"bytes={size - 10}-"})
    assert tail.status_code == 206 and tail.content == tiny_gguf.read_bytes()[-10:]

    beyond = client.get(f"/v1/artifacts/{digest}", headers={**viewer_headers, "Range": f"bytes={size + 5}-"})
    assert beyond.status_code == 416

    cached = client.get(f"/v1/artifacts/{digest}", headers={**viewer_headers, "If-None-Match": f'"{digest}"'})
    assert cached.status_code == 304


def test_onnx_upload_is_parsed(client, operator_headers, tiny_onnx):  # type: ignore[no-untyped-def]
    _create_model(client, operator_headers, "tinyonnx")
    response = _upload(client, operator_headers, tiny_onnx, "1", model="tinyonnx")
    assert response.status_code == 201, response.text
    artifact = response.json()["artifacts"][0]
    assert artifact["format"] == "onnx"
    assert artifact["quantization"] == "fp32"
    meta = artifact["file_metadata"]
    assert meta["opset"]["ai.onnx"] >= 13
    assert meta["inputs"] and meta["outputs"]


def test_identical_content_is_stored_once(client, operator_headers, tiny_gguf, settings):  # type: ignore[no-untyped-def]
    _create_model(client, operator_headers)
    assert _upload(client, operator_headers, tiny_gguf, "1.0.0").status_code == 201
    again = _upload(client, operator_headers, tiny_gguf, "1.0.1")
    assert again.status_code == 201
    assert again.json()["artifacts"][0]["sha256"] == _sha(tiny_gguf)
    assert len(_blob_files(settings)) == 1


def test_wrong_declared_sha256_is_refused_and_nothing_kept(
    client, operator_headers, viewer_headers, tiny_gguf, settings
):  # type: ignore[no-untyped-def]
    _create_model(client, operator_headers)
    response = _upload(client, operator_headers, tiny_gguf, "1.0.0", sha256="0" * 64)
    assert response.status_code == 422
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["code"] == "sha256_mismatch"
    assert _blob_files(settings) == []
    missing = client.get("/v1/models/tinyllama/versions/1.0.0", headers=viewer_headers)
    assert missing.status_code == 404 and missing.json()["code"] == "version_not_found"


def test_oversized_upload_is_refused_while_streaming(client, operator_headers, tiny_gguf, settings, tmp_path):  # type: ignore[no-untyped-def]
    _create_model(client, operator_headers)
    big = tmp_path / "big.gguf"
    big.write_bytes(tiny_gguf.read_bytes() + b"\0" * (settings.max_upload_bytes + 1))
    response = _upload(client, operator_headers, big, "1.0.0")
    assert response.status_code == 413
    body = response.json()
    assert body["code"] == "payload_too_large" and body["limit_bytes"] == settings.max_upload_bytes
    assert _blob_files(settings) == []  # the temp file was removed as soon as the limit was crossed


def test_non_model_file_is_refused(client, operator_headers, settings, tmp_path):  # type: ignore[no-untyped-def]
    _create_model(client, operator_headers)
    junk = tmp_path / "notes.txt"
    junk.write_text("definitely not a model\n" * 100)
    response = _upload(client, operator_headers, junk, "1.0.0")
    assert response.status_code == 422 and response.json()["code"] == "unrecognized_artifact"
    fake_onnx = tmp_path / "fake.onnx"
    fake_onnx.write_bytes(b"\x08" + b"\xff" * 200)
    response = _upload(client, operator_headers, fake_onnx, "1.0.1")
    assert response.status_code == 422 and response.json()["code"] == "unrecognized_artifact"
    assert _blob_files(settings) == []


def test_variants_lineage_and_reference(client, operator_headers, viewer_headers, tiny_gguf, tiny_gguf_other):  # type: ignore[no-untyped-def]
    _create_model(client, operator_headers)
    assert _upload(client, operator_headers, tiny_gguf, "1.0.0").status_code == 201
    child = _upload(
        client,
        operator_headers,
        tiny_gguf_other,
        "1.0.0-q8",
        parent="1.0.0",
        relation="quantized_from",
        quantization="Q8_0",
        min_ram_mb="512",
        cpu_arch="x86_64,aarch64",
        eval_metrics='{"perplexity": 12.5}',
    )
    assert child.status_code == 201, child.text
    body = child.json()
    assert body["parent"] == {"model": "tinyllama", "version": "1.0.0", "relation": "quantized_from"}
    assert body["eval_metrics"] == {"perplexity": 12.5}
    assert body["artifacts"][0]["quantization"] == "Q8_0"
    assert body["artifacts"][0]["cpu_arch"] == ["x86_64", "aarch64"]

    ref = {
        "url": "https://models.example/tinyllama/1.0.0-gpu.gguf",
        "sha256": "a" * 64,
        "size_bytes": 123456,
        "format": "gguf",
        "quantization": "F16",
        "accelerators": ["cuda"],
        "min_ram_mb": 4096,
    }
    added = client.post("/v1/models/tinyllama/versions/1.0.0/artifacts", json=ref, headers=operator_headers)
    assert added.status_code == 201, added.text
    assert added.json()["download_url"] == ref["url"]
    version = client.get("/v1/models/tinyllama/versions/1.0.0", headers=viewer_headers).json()
    assert len(version["artifacts"]) == 2

    s3_ref = {**ref, "url": "s3://models/tinyllama/1.0.0-gpu.gguf", "sha256": "c" * 64}
    s3 = client.post("/v1/models/tinyllama/versions/1.0.0/artifacts", json=s3_ref, headers=operator_headers)
    assert s3.status_code == 422 and s3.json()["code"] == "invalid_reference"  # no S3 backend yet

    bad_ref = {**ref, "url": "ftp://elsewhere/x", "sha256": "b" * 64}
    refused = client.post("/v1/models/tinyllama/versions/1.0.0/artifacts", json=bad_ref, headers=operator_headers)
    assert refused.status_code == 422 and refused.json()["code"] == "validation_error"


def test_duplicate_version_and_unknown_model(client, operator_headers, tiny_gguf):  # type: ignore[no-untyped-def]
    assert _upload(client, operator_headers, tiny_gguf, "1.0.0", model="nope").json()["code"] == "model_not_found"
    _create_model(client, operator_headers)
    assert _upload(client, operator_headers, tiny_gguf, "1.0.0").status_code == 201
    dup = _upload(client, operator_headers, tiny_gguf, "1.0.0")
    assert dup.status_code == 409 and dup.json()["code"] == "version_exists"
    dup_model = client.post("/v1/models", json={"name": "tinyllama"}, headers=operator_headers)
    assert dup_model.status_code == 409 and dup_model.json()["code"] == "model_exists"


def test_idempotency_key_replays_and_refuses_other_body(client, operator_headers):  # type: ignore[no-untyped-def]
    headers = {**operator_headers, "Idempotency-Key": "create-m1"}
    first = client.post("/v1/models", json={"name": "m1"}, headers=headers)
    second = client.post("/v1/models", json={"name": "m1"}, headers=headers)
    assert first.status_code == second.status_code == 201
    assert first.json() == second.json()
    assert second.headers.get("idempotent-replayed") == "true"
    other = client.post("/v1/models", json={"name": "m2"}, headers=headers)
    assert other.status_code == 422 and other.json()["code"] == "idempotency_key_reused"


def test_models_pagination(client, operator_headers, viewer_headers):  # type: ignore[no-untyped-def]
    for i in range(5):
        assert client.post("/v1/models", json={"name": f"m{i}"}, headers=operator_headers).status_code == 201
    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = client.get("/v1/models", params=params, headers=viewer_headers).json()
        seen += [m["name"] for m in page["data"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == [f"m{i}" for i in range(5)] and len(seen) == 5
    bad = client.get("/v1/models", params={"cursor": "garbage!"}, headers=viewer_headers)
    assert bad.status_code == 422


def test_hostile_gguf_header_is_refused_and_the_server_keeps_serving(app, operator_headers, tiny_gguf, tmp_path):  # type: ignore[no-untyped-def]
    hostile = tmp_path / "hostile.gguf"
    hostile.write_bytes(DECLARES_2_63_BYTES)  # one metadata array declaring 2**63 uint8 values
    with ServerThread(app, lifespan="on") as server, httpx.Client(base_url=server.url, timeout=60) as http:
        _create_model(http, operator_headers)  # type: ignore[arg-type]
        refused = _upload(http, operator_headers, hostile, "1.0.0")
        assert refused.status_code == 422 and refused.json()["code"] == "unrecognized_artifact", refused.text
        assert _upload(http, operator_headers, tiny_gguf, "1.0.1").status_code == 201


def test_plain_onnx_with_external_data_is_refused(client, operator_headers, tiny_onnx, settings, tmp_path):  # type: ignore[no-untyped-def]
    _create_model(client, operator_headers, "tinyonnx")
    outside = ["../../etc/hostname", "/etc/hostname", "weights.bin"]  # a plain file has no folder beside it
    for version, location in enumerate(outside):
        path = tmp_path / f"ext{version}.onnx"
        path.write_bytes(with_external_data(tiny_onnx, {"location": location}))
        response = _upload(client, operator_headers, path, str(version), model="tinyonnx")
        assert response.status_code == 422, (location, response.text)
        assert response.json()["code"] == "unrecognized_artifact", location
    assert _blob_files(settings) == []
