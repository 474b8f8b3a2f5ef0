"""Server memory during a large streamed upload (default 2 GiB) vs the server's idle memory.

Starts a real `slmops server` on SQLite, uploads a GGUF padded to the target size through a
streaming multipart body, and samples the server's RSS every 50 ms. Prints idle RSS, peak RSS,
their difference next to the upload size, and the upload throughput.

    .venv/bin/python benchmarks/upload_memory.py [--size-mb 2048]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil

from shared.net import free_port
from slmops.tinymodels.gguf_tiny import write_tiny_gguf

CHUNK = 1024 * 1024


def _make_file(path: Path, size: int) -> str:
    write_tiny_gguf(path, seed=7)
    digest = hashlib.sha256(path.read_bytes())
    pad = b"\0" * CHUNK
    with path.open("ab") as fh:  # trailing bytes after the tensor data: still a parseable GGUF
        remaining = size - path.stat().st_size
        while remaining > 0:
            block = pad[: min(CHUNK, remaining)]
            fh.write(block)
            digest.update(block)
            remaining -= len(block)
    return digest.hexdigest()


def _multipart(path: Path, boundary: str, fields: dict[str, str]) -> Iterator[bytes]:
    for key, value in fields.items():
        yield f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode()
    yield (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{path.name}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    with path.open("rb") as fh:
        while block := fh.read(CHUNK):
            yield block
    yield f"\r\n--{boundary}--\r\n".encode()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mb", type=int, default=2048)
    args = parser.parse_args()
    size = args.size_mb * 1024 * 1024
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        artifact = work / "big.gguf"
        digest = _make_file(artifact, size)
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLMOPS_")}
        env["SLMOPS_MAX_UPLOAD_BYTES"] = str(size * 2)
        server = subprocess.Popen(
            [sys.executable, "-m", "slmops", "server", "--port", str(port)],
            cwd=work,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            _run(work, port, server.pid, artifact, digest, size)
        finally:
            server.terminate()
            server.wait(timeout=30)


def _run(work: Path, port: int, pid: int, artifact: Path, digest: str, size: int) -> None:
    base = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(f"{base}/readyz").status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.1)
    token = subprocess.run(
        [sys.executable, "-m", "slmops", "token", "create", "--role", "operator", "--name", "bench"],
        cwd=work,
        capture_output=True,
        text=True,
        check=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("SLMOPS_")},
    ).stdout.strip()
    headers = {"Authorization": f"Bearer {token}"}
    httpx.post(f"{base}/v1/models", json={"name": "big"}, headers=headers).raise_for_status()
    proc = psutil.Process(pid)
    idle_rss = proc.memory_info().rss
    peak = [idle_rss]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    boundary = "slmopsbenchboundary"
    started = time.perf_counter()
    response = httpx.post(
        f"{base}/v1/models/big/versions",
        content=_multipart(artifact, boundary, {"version": "1", "sha256": digest}),
        headers={**headers, "Content-Type": f"multipart/form-data; boundary={boundary}"},
        timeout=600,
    )
    elapsed = time.perf_counter() - started
    done.set()
    sampler.join()
    response.raise_for_status()
    assert response.json()["artifacts"][0]["sha256"] == digest
    mib = 1024 * 1024
    growth = peak[0] - idle_rss
    print(f"upload size            {size / mib:10.1f} MiB")
    print(f"server RSS idle        {idle_rss / mib:10.1f} MiB")
    print(f"server RSS peak        {peak[0] / mib:10.1f} MiB")
    share = growth / size
    print(f"RSS growth             {growth / mib:10.1f} MiB  ({share:.4f} of the upload; target < 0.05)")
    print(f"throughput             {size / mib / elapsed:10.1f} MiB/s  ({elapsed:.1f} s, sha256 verified)")


if __name__ == "__main__":
    main()
