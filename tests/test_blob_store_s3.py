"""Artifacts in an S3-compatible store shared by control-plane replicas.

No S3 server runs here: the S3 endpoint is moto in server mode (tests/support/s3.py), over TLS.
"""

from __future__ import annotations

import hashlib
import os
import ssl
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from pydantic import ValidationError
from rich.console import Console

from control_plane.api.main import create_app
from control_plane.config import Settings
from control_plane.storage import S3BlobStore, make_blob_store, s3_client
from shared.net import free_port
from slmops.demo import Fleet, wait_until
from slmops.tinymodels.gguf_tiny import write_tiny_gguf
from tests.support.fleet import upload_version
from tests.support.s3 import CREDENTIALS, CountingProxy, TlsMotoServer
from tests.support.tls import self_signed

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsMotoServer]:
    tls = self_signed(tmp_path_factory.mktemp("tls"))
    saved = {k: os.environ.get(k) for k in (*CREDENTIALS, "AWS_CA_BUNDLE")}
    os.environ.update(CREDENTIALS, AWS_CA_BUNDLE=tls[0])  # boto3 reads both, as in production
    server = TlsMotoServer(tls)
    server.start()
    yield server
    server.stop()
    for key, value in saved.items():
        os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


@pytest.fixture
def bucket(moto: TlsMotoServer) -> str:
    name = f"artifacts-{uuid.uuid4().hex[:12]}"
    s3_client(moto.url).create_bucket(Bucket=name)
    return name


@pytest.fixture
def settings(tmp_path: Path, db_url: str, moto: TlsMotoServer, bucket: str) -> Settings:
    """Replica A's settings (the `app` fixture builds it): blobs in the shared bucket."""
    return _replica_settings(tmp_path / "replica-a", db_url, moto, bucket)


def _replica_settings(data_dir: Path, db_url: str, moto: TlsMotoServer, bucket: str) -> Settings:
    return Settings(
        data_dir=data_dir,
        database_url=db_url,
        max_upload_bytes=20 * MiB,
        fleet_enabled=False,
        blob_store="s3",
        s3_endpoint_url=moto.url,
        s3_bucket=bucket,
        blob_gc_grace_s=0,
    )


def _trust(moto: TlsMotoServer) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=moto.tls[0])


def test_an_upload_through_one_replica_is_served_by_the_store_through_another(  # type: ignore[no-untyped-def]
    app, engine: sa.Engine, admin_headers, db_url: str, moto: TlsMotoServer, bucket: str, tiny_gguf: Path, tmp_path
) -> None:
    replica_b = create_app(_replica_settings(tmp_path / "replica-b", db_url, moto, bucket), engine=engine)
    with TestClient(app, headers=admin_headers) as a, TestClient(replica_b, headers=admin_headers) as b:
        assert a.post("/v1/models", json={"name": "shared"}).status_code == 201
        with tiny_gguf.open("rb") as fh:
            created = a.post("/v1/models/shared/versions", data={"version": "1"}, files={"file": fh})
        assert created.status_code == 201, created.text
        sha256 = created.json()["artifacts"][0]["sha256"]
        assert not any((tmp_path / "replica-a" / "blobs").rglob(sha256))  # nothing kept on the replica's disk

        answer = b.get(f"/v1/artifacts/{sha256}", follow_redirects=False)
        assert answer.status_code == 307
        assert answer.content == b""
        location = answer.headers["location"]
        assert location.startswith(f"{moto.url}/{bucket}/blobs/sha256/{sha256}?")
        assert "X-Amz-Signature=" in location and "X-Amz-Expires=900" in location

        fetched = httpx.get(location, verify=_trust(moto))
        assert fetched.content == tiny_gguf.read_bytes()
        assert hashlib.sha256(fetched.content).hexdigest() == sha256
        part = httpx.get(location, verify=_trust(moto), headers={"Range": "bytes=4-9"})  # resumes work
        assert (part.status_code, part.content) == (206, tiny_gguf.read_bytes()[4:10])

        assert b.get(f"/v1/artifacts/{sha256}", headers={"Authorization": ""}).status_code == 401
        missing = b.get(f"/v1/artifacts/{'0' * 64}", follow_redirects=False)
        assert missing.json()["code"] == "artifact_not_found"


def test_uploads_go_to_the_store_in_parts_and_identical_content_once(
    moto: TlsMotoServer, bucket: str, tmp_path: Path
) -> None:
    store = S3BlobStore(tmp_path, client=s3_client(moto.url), bucket=bucket)
    payload = os.urandom(20 * MiB)
    for round_ in range(2):
        writer = store.writer(max_bytes=32 * MiB)
        for start in range(0, len(payload), MiB):
            writer.write(payload[start : start + MiB])
        blob = writer.commit()
        assert blob.deduplicated == (round_ == 1)
    key = f"/{bucket}/blobs/sha256/{blob.sha256}"
    writes = [(method, query) for method, path, query in moto.counted.requests if path == key and method != "HEAD"]
    parts = [query for method, query in writes if method == "PUT" and "partNumber=" in query]
    assert writes[0] == ("POST", "uploads")  # CreateMultipartUpload, then 8 MiB parts: 8 + 8 + 4
    assert len(parts) == 3
    assert len([w for w in writes if w[0] == "POST"]) == 2  # create and complete, once: the copy was not sent
    assert writes[-1] == ("PUT", "")  # the copy onto itself that restarts the GC grace period, no bytes sent
    assert list(store.tmp_dir.iterdir()) == []
    assert store.exists(blob.sha256) and not store.exists("f" * 64)


def test_an_unreachable_store_is_a_503_and_keeps_no_version(  # type: ignore[no-untyped-def]
    app, engine: sa.Engine, admin_headers, db_url: str, moto: TlsMotoServer, tiny_gguf: Path, tmp_path: Path
) -> None:
    gone = create_app(_replica_settings(tmp_path / "gone", db_url, moto, "no-such-bucket"), engine=engine)
    with TestClient(gone, headers=admin_headers) as client:
        assert client.post("/v1/models", json={"name": "unstored"}).status_code == 201
        with tiny_gguf.open("rb") as fh:
            refused = client.post("/v1/models/unstored/versions", data={"version": "1"}, files={"file": fh})
        assert (refused.status_code, refused.json()["code"]) == (503, "blob_store_unavailable")
        assert client.get("/v1/models/unstored/versions").json()["data"] == []
        assert list((tmp_path / "gone" / "blobs" / "tmp").iterdir()) == []


def _blob_keys(moto: TlsMotoServer, bucket: str) -> dict[str, int]:
    listed = s3_client(moto.url).list_objects_v2(Bucket=bucket)
    return {item["Key"]: item["Size"] for item in listed.get("Contents", [])}


def test_gc_removes_exactly_the_unreferenced_objects_from_the_bucket(  # type: ignore[no-untyped-def]
    client, admin_headers, moto: TlsMotoServer, bucket: str, tiny_gguf: Path, tiny_gguf_other: Path
) -> None:
    client.post("/v1/models", json={"name": "m", "keep_versions": 1}, headers=admin_headers).raise_for_status()
    old = upload_version(client, admin_headers, "m", "1", tiny_gguf)["artifacts"][0]
    kept = upload_version(client, admin_headers, "m", "2", tiny_gguf_other)["artifacts"][0]
    orphan = "f" * 64
    s3 = s3_client(moto.url)
    s3.put_object(Bucket=bucket, Key=f"blobs/sha256/{orphan}", Body=b"left by a crash" * 100)
    s3.put_object(Bucket=bucket, Key="backups/not-a-blob", Body=b"someone else's")
    before = _blob_keys(moto, bucket)

    dry = client.post("/v1/models/gc", params={"dry_run": True}, headers=admin_headers).json()
    assert dry["versions"] == ["m@1"]
    assert {b["sha256"]: b["size_bytes"] for b in dry["blobs"]} == {old["sha256"]: old["size_bytes"], orphan: 1500}
    assert dry["bytes_freed"] == old["size_bytes"] + 1500
    assert _blob_keys(moto, bucket) == before  # a dry run removes nothing

    done = client.post("/v1/models/gc", headers=admin_headers).json()
    assert done["bytes_freed"] == old["size_bytes"] + 1500
    assert _blob_keys(moto, bucket) == {
        f"blobs/sha256/{kept['sha256']}": kept["size_bytes"],
        "backups/not-a-blob": len(b"someone else's"),
    }
    assert client.post("/v1/models/gc", params={"dry_run": True}, headers=admin_headers).json()["bytes_freed"] == 0


def test_deleting_a_version_removes_its_object_and_the_scratch_copy(  # type: ignore[no-untyped-def]
    client, admin_headers, settings: Settings, moto: TlsMotoServer, bucket: str, tiny_gguf: Path
) -> None:
    client.post("/v1/models", json={"name": "m"}, headers=admin_headers).raise_for_status()
    sha256 = upload_version(client, admin_headers, "m", "1", tiny_gguf)["artifacts"][0]["sha256"]
    store = make_blob_store(settings)
    scratch = store.path_for(sha256)  # the local copy quantization reads
    assert scratch.is_file()
    assert client.delete("/v1/models/m/versions/1", headers=admin_headers).status_code == 204
    assert _blob_keys(moto, bucket) == {} and not scratch.exists()


def test_listing_the_bucket_follows_every_page(moto: TlsMotoServer, bucket: str, tmp_path: Path) -> None:
    store = S3BlobStore(tmp_path, client=s3_client(moto.url), bucket=bucket)
    store.list_page_size = 2
    names = [f"{n:064x}" for n in range(5)]
    for name in names:
        store.client.put_object(Bucket=bucket, Key=f"blobs/sha256/{name}", Body=name.encode())
    listed = list(store.list_blobs())
    assert [(b.sha256, b.size_bytes) for b in listed] == [(name, 64) for name in names]
    assert all(b.modified > 0 for b in listed)
    pages = [q for method, path, q in moto.counted.requests if path == f"/{bucket}" and "list-type=2" in q]
    assert len(pages) == 3
    store.delete(names[0])
    assert [b.sha256 for b in store.list_blobs()] == names[1:]


def test_s3_needs_a_bucket(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="SLMOPS_S3_BUCKET"):
        Settings(data_dir=tmp_path, blob_store="s3")
    assert make_blob_store(Settings(data_dir=tmp_path)).download_url("0" * 64) is None  # local: the route serves


# -- the done-when: real server processes, a real agent ------------------------------------------

PLAN: dict[str, Any] = {
    "stages": [{"name": "all", "percent": 100, "min_bake_s": 0}],
    "gates": {"min_activated_fraction": 1.0, "max_p95_latency_ratio": None, "max_error_rate": None},
}


def _spawn_replica(fleet: Fleet, env: dict[str, str]) -> CountingProxy:
    (fleet.workdir / "logs").mkdir(parents=True, exist_ok=True)
    fleet.spawn(["server"], "control-plane.log", env=fleet.env() | env)
    wait_until(lambda: httpx.get(f"{fleet.base}/readyz", timeout=2).status_code == 200, 90, "a replica")
    return CountingProxy(fleet.api_port)


@pytest.mark.slow
@pytest.mark.llama
@pytest.mark.mosquitto
@pytest.mark.postgres
def test_an_agent_of_replica_b_installs_what_replica_a_took_in_from_the_store(  # type: ignore[no-untyped-def]
    fresh_database_url, moto: TlsMotoServer, bucket: str, tmp_path: Path
) -> None:
    prefix = f"slmops-test/{uuid.uuid4().hex[:10]}"
    shared = {
        "SLMOPS_DATABASE_URL": fresh_database_url("postgres"),
        "SLMOPS_BLOB_STORE": "s3",
        "SLMOPS_S3_ENDPOINT_URL": moto.url,
        "SLMOPS_S3_BUCKET": bucket,
        **CREDENTIALS,
        "AWS_CA_BUNDLE": moto.tls[0],
    }
    quiet = Console(quiet=True)
    fleet_a = Fleet(tmp_path / "a", quiet, mqtt_url="mqtt://127.0.0.1:1883", topic_prefix=prefix)
    fleet_b = Fleet(tmp_path / "b", quiet, mqtt_url="mqtt://127.0.0.1:1883", topic_prefix=prefix)
    proxies: list[CountingProxy] = []
    try:
        proxies.append(proxy_a := _spawn_replica(fleet_a, shared))
        proxies.append(proxy_b := _spawn_replica(fleet_b, shared))
        token = subprocess.run(
            [sys.executable, "-m", "slmops", "token", "create", "--role", "admin", "--name", "t"],
            env=fleet_a.env() | shared, capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        auth = {"Authorization": f"Bearer {token}"}
        api_a = httpx.Client(base_url=proxy_a.url, headers=auth, timeout=60)
        api_b = httpx.Client(base_url=proxy_b.url, headers=auth, timeout=60)

        model_file = write_tiny_gguf(tmp_path / "v1.gguf", seed=1)
        size = model_file.stat().st_size
        api_a.post("/v1/models", json={"name": "tinyllama"}).raise_for_status()
        with model_file.open("rb") as fh:
            pushed = api_a.post("/v1/models/tinyllama/versions", data={"version": "1.0.0"}, files={"file": fh})
        pushed.raise_for_status()
        sha256 = pushed.json()["artifacts"][0]["sha256"]

        device = api_b.post("/v1/devices", json={"name": "kiosk-b"})
        device.raise_for_status()
        agent_dir = tmp_path / "agent"
        agent_dir.mkdir()
        config = agent_dir / "agent.toml"
        config.write_text(
            f'control_plane_url = "{proxy_b.url}"\nenrollment_token = "{device.json()["enrollment_token"]}"\n'
            f'data_dir = "{agent_dir}"\nlisten_port = {free_port()}\n'
            'threads = 1\ntelemetry_window_s = 1.0\ntrial_requests = 3\ntrial_seconds = 3\n'
            'watch_interval_s = 0.5\ndownload_allowed_hosts = ["127.0.0.1"]\n'
        )  # fmt: skip
        # The agent trusts the test S3 endpoint's certificate as a device trusts a private CA.
        trust_env = fleet_b.env() | {"SSL_CERT_FILE": moto.tls[0]}
        fleet_b.spawn(["agent", "--config", str(config)], "agent.log", env=trust_env)
        wait_until(lambda: api_b.get("/v1/devices").json()["data"][0]["status"] == "online", 90, "the agent online")
        served_before = (proxy_a.served, proxy_b.served)
        rollout = api_b.post("/v1/rollouts", json={"model": "tinyllama", "version": "1.0.0", **PLAN})
        assert rollout.status_code == 201, rollout.text

        def completed() -> bool:
            return bool(api_b.get(f"/v1/rollouts/{rollout.json()['id']}").json()["state"] == "completed")

        wait_until(completed, 180, "the rollout on the agent of replica B")
        (row,) = api_b.get("/v1/devices").json()["data"]
        assert (row["current_version"], row["current_sha256"]) == ("1.0.0", sha256)

        from_store = moto.counted.bytes_out[f"GET /{bucket}/blobs/sha256/{sha256}"]
        assert from_store == size  # the whole file, once, from the S3 endpoint
        assert proxy_b.requests_for(f"GET /v1/artifacts/{sha256}".encode()) >= 1  # asked B, sent to the store
        assert proxy_a.requests_for(b"GET /v1/artifacts/") == 0
        served = (proxy_a.served - served_before[0], proxy_b.served - served_before[1])
        assert max(served) < size // 10, f"replicas served {served} bytes during the rollout; artifact {size}"
        for fleet in (fleet_a, fleet_b):
            assert not any((fleet.workdir / "control-plane" / "blobs").rglob(sha256))
    finally:
        fleet_b.shutdown()
        fleet_a.shutdown()
        for proxy in proxies:
            proxy.close()
