"""`slmops model push` of a large file: the CLI's memory and time, next to a bare streamed upload.

Starts a real `slmops server` on SQLite and makes a GGUF padded to the target size (default 1 GiB).
Two alternating rounds upload it with a bare httpx streamed multipart POST and with
`slmops model push` in its own process (RSS sampled every 50 ms); the best of each is reported.
The push reads the file twice (sha256 first, then the upload) and starts a Python process, so its
time is compared with the sum: bare upload + one sha256 pass + CLI start-up.

    .venv/bin/python benchmarks/cli_push.py [--size-mb 1024]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from upload_memory import _make_file, _multipart  # noqa: E402

from shared.hashing import file_sha256  # noqa: E402
from shared.net import free_port  # noqa: E402

MIB = 1024 * 1024
ROUNDS = ("1", "2")


def _env(work: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLMOPS_")}
    env["SLMOPS_CLI_CONFIG"] = str(work / "absent.toml")
    return env


def _start_server(work: Path, port: int, size: int) -> subprocess.Popen[bytes]:
    env = _env(work) | {"SLMOPS_MAX_UPLOAD_BYTES": str(size * 2), "SLMOPS_FLEET_ENABLED": "false"}
    server = subprocess.Popen(
        [sys.executable, "-m", "slmops", "server", "--port", str(port)],
        cwd=work,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                return server
        except httpx.TransportError:
            time.sleep(0.1)
    raise RuntimeError("the server did not start")


def _raw_upload(base: str, token: str, artifact: Path, digest: str, version: str) -> float:
    boundary = "slmopsbenchboundary"
    started = time.perf_counter()
    response = httpx.post(
        f"{base}/v1/models/raw/versions",
        content=_multipart(artifact, boundary, {"version": version, "sha256": digest}),
        headers={"Authorization": f"Bearer {token}", "Content-Type": f"multipart/form-data; boundary={boundary}"},
        timeout=600,
    )
    response.raise_for_status()
    return time.perf_counter() - started


def _cli_push(work: Path, base: str, token: str, artifact: Path, version: str) -> tuple[float, int, int]:
    """(wall seconds, steady RSS, peak RSS) of `slmops model push` in its own process."""
    env = _env(work) | {"SLMOPS_SERVER": base, "SLMOPS_TOKEN": token}
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "slmops", "model", "push", "cli", version, str(artifact), "-o", "json"],
        cwd=work,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ps = psutil.Process(proc.pid)
    samples: list[int] = []

    def sample() -> None:
        while proc.poll() is None:
            try:
                samples.append(ps.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    code = proc.wait()
    elapsed = time.perf_counter() - started
    sampler.join()
    if code != 0:
        raise RuntimeError(f"slmops model push exited {code}")
    # The first samples cover interpreter start-up; the steady RSS is the median of the rest.
    steady = sorted(samples[len(samples) // 10 :]) or samples
    return elapsed, steady[len(steady) // 2], max(samples)


def _startup_s(work: Path) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "slmops", "model", "--help"], env=_env(work), capture_output=True, check=True)
    return time.perf_counter() - started


def _hash_s(artifact: Path) -> float:
    started = time.perf_counter()
    file_sha256(artifact)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mb", type=int, default=1024)
    args = parser.parse_args()
    size = args.size_mb * MIB
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        artifact = work / "big.gguf"
        digest = _make_file(artifact, size)
        port = free_port()
        server = _start_server(work, port, size)
        try:
            base = f"http://127.0.0.1:{port}"
            token = subprocess.run(
                [sys.executable, "-m", "slmops", "token", "create", "--role", "operator", "--name", "bench"],
                cwd=work,
                env=_env(work),
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            for name in ("raw", "cli"):
                httpx.post(
                    f"{base}/v1/models", json={"name": name}, headers={"Authorization": f"Bearer {token}"}
                ).raise_for_status()
            raw_runs, cli_runs = [], []
            for version in ROUNDS:  # alternating, each after a sync: the disk's writeback favours no one
                os.sync()
                raw_runs.append(_raw_upload(base, token, artifact, digest, version))
                os.sync()
                cli_runs.append(_cli_push(work, base, token, artifact, version))
            raw_s, hash_s, startup_s = min(raw_runs), _hash_s(artifact), _startup_s(work)
            cli_s, steady_rss, peak_rss = min(cli_runs)
        finally:
            server.terminate()
            server.wait(timeout=30)
    parts = raw_s + hash_s + startup_s
    print(f"file size                       {size / MIB:8.1f} MiB")
    print(f"raw streamed upload (httpx)     {raw_s:8.2f} s  {size / MIB / raw_s:7.1f} MiB/s")
    print(f"sha256 pass over the file       {hash_s:8.2f} s")
    print(f"CLI start-up (model --help)     {startup_s:8.2f} s")
    print(f"slmops model push, end to end   {cli_s:8.2f} s  {size / MIB / cli_s:7.1f} MiB/s")
    print(f"push / (raw + sha256 + start)   {cli_s / parts:8.2f} x  (target <= 1.2)")
    growth = peak_rss - steady_rss
    print(f"CLI RSS steady / peak           {steady_rss / MIB:8.1f} / {peak_rss / MIB:.1f} MiB")
    print(f"CLI RSS growth                  {growth / MIB:8.1f} MiB  ({growth / size:.4f} of the file; target < 0.05)")


if __name__ == "__main__":
    main()
