"""Benchmark 3: the agent's download + verify throughput vs a plain httpx download (target >= 0.9).

Both fetch the same file from the same local HTTP server (Starlette FileResponse under uvicorn, in
its own process, as the control plane would be).
The agent's path streams to a partial file, hashes (sha256) as it goes, fsyncs and renames into the
content-addressed store; the plain path only streams to a file. Rounds alternate between the two.

    python benchmarks/agent_download.py [--mb 256] [--rounds 5]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from edge_agent.download import Downloader  # noqa: E402
from edge_agent.store import ModelStore  # noqa: E402
from shared.desired import ArtifactRef  # noqa: E402
from shared.net import free_port  # noqa: E402
from tests.support.waiting import wait_for  # noqa: E402

TARGET = 0.9
MiB = 1024 * 1024
SERVER = """
import asyncio, sys, uvicorn
from starlette.applications import Starlette
from starlette.responses import FileResponse, StreamingResponse
from starlette.routing import Route
path, rate = sys.argv[2], float(sys.argv[3])

async def paced():
    step = 256 * 1024
    with open(path, "rb") as f:
        while block := f.read(step):
            yield block
            await asyncio.sleep(len(block) / rate)

def serve(request):
    if rate <= 0:
        return FileResponse(path)
    import os
    return StreamingResponse(paced(), headers={"Content-Length": str(os.path.getsize(path))})

app = Starlette(routes=[Route("/a", serve, methods=["GET", "HEAD"])])
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""


def start_server(source: Path, rate_bps: float = 0) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(port), str(source), str(rate_bps)])
    url = f"http://127.0.0.1:{port}/a"

    def answers() -> bool:
        try:
            return httpx.head(url).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(answers, what="file server", proc=proc)
    return proc, url


def write_payload(path: Path, size_mb: int) -> str:
    digest = hashlib.sha256()
    with path.open("wb") as out:
        for _ in range(size_mb):
            block = os.urandom(MiB)
            digest.update(block)
            out.write(block)
    return digest.hexdigest()


def plain(client: httpx.Client, url: str, dest: Path) -> float:
    started = time.perf_counter()
    with client.stream("GET", url) as response, dest.open("wb") as out:
        for block in response.iter_raw():
            out.write(block)
    elapsed = time.perf_counter() - started
    dest.unlink()
    return elapsed


def agent(client: httpx.Client, url: str, store: ModelStore, artifact: ArtifactRef) -> float:
    downloader = Downloader(store, client=client, retries=0)
    started = time.perf_counter()
    path = downloader.fetch(artifact, url)
    elapsed = time.perf_counter() - started
    path.unlink()
    return elapsed


def compare(source: Path, sha: str, tmp: Path, rounds: int, rate_bps: float) -> dict[str, float]:
    """Median seconds per side; rounds alternate so machine noise hits both alike."""
    server, url = start_server(source, rate_bps)
    store = ModelStore(tmp / "data")
    artifact = ArtifactRef(sha256=sha, size_bytes=source.stat().st_size, format="gguf")
    times: dict[str, list[float]] = {"plain httpx": [], "agent download+verify": []}
    try:
        with httpx.Client(timeout=60) as client:
            for round_ in range(rounds + 1):  # round 0 warms the page cache and the connection
                plain_s = plain(client, url, tmp / "plain.bin")
                agent_s = agent(client, url, store, artifact)
                if round_:
                    times["plain httpx"].append(plain_s)
                    times["agent download+verify"].append(agent_s)
    finally:
        server.terminate()
        server.wait()
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--link-mib-s", type=float, default=100, help="paced server for the second scenario")
    args = parser.parse_args()
    scenarios = {"loopback, unpaced": 0.0, f"server paced at {args.link_mib_s:g} MiB/s": args.link_mib_s * MiB}
    print(f"file: {args.mb} MiB over loopback HTTP (server in its own process), median of {args.rounds} rounds")
    print(f"{'scenario':<30}{'plain MiB/s':>13}{'agent MiB/s':>13}{'ratio':>8}{'target':>8}")
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        source = tmp / "artifact.bin"
        sha = write_payload(source, args.mb)
        for label, rate in scenarios.items():
            seconds = compare(source, sha, tmp, args.rounds, rate)
            plain_rate = args.mb / seconds["plain httpx"]
            agent_rate = args.mb / seconds["agent download+verify"]
            ratio = agent_rate / plain_rate
            verdict = "ok" if ratio >= TARGET else "below"
            print(f"{label:<30}{plain_rate:>13.1f}{agent_rate:>13.1f}{ratio:>8.3f}{TARGET:>8.2f}  {verdict}")


if __name__ == "__main__":
    main()
