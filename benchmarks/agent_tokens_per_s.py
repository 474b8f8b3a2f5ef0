"""Benchmark 1: generation tokens/s through the agent's HTTP API vs llama-cpp-python in-process.

Same GGUF model, prompt, max_tokens, sampling (greedy) and thread count. The agent runs as a real
daemon process; requests go over loopback HTTP (non-streaming and SSE streaming). Target: >= 0.95.

    python benchmarks/agent_tokens_per_s.py [--size small] [--tokens 128] [--rounds 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from slmops.tinymodels import write_tiny_gguf  # noqa: E402
from tests.support.agent import AgentProcess, ArtifactServer, desired_for  # noqa: E402
from tests.support.server_thread import ServerThread  # noqa: E402

TARGET = 0.95
PROMPT = "Once upon a time"


def timed(run: Callable[[], int]) -> float:
    started = time.perf_counter()
    tokens = run()
    return tokens / (time.perf_counter() - started)


def direct_runs(llm: object, args: argparse.Namespace) -> dict[str, Callable[[], int]]:
    def whole() -> int:
        out = llm.create_completion(PROMPT, max_tokens=args.tokens, temperature=0.0)  # type: ignore[attr-defined]
        return out["usage"]["completion_tokens"]

    def streamed() -> int:
        chunks = llm.create_completion(PROMPT, max_tokens=args.tokens, temperature=0.0, stream=True)  # type: ignore[attr-defined]
        return sum(1 for chunk in chunks if chunk["choices"][0]["text"])

    return {"non-stream": whole, "stream": streamed}


def agent_runs(client: httpx.Client, args: argparse.Namespace) -> dict[str, Callable[[], int]]:
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": args.tokens, "temperature": 0.0}

    def whole() -> int:
        return client.post("/v1/completions", json=body).json()["usage"]["completion_tokens"]

    def streamed() -> int:
        tokens = 0
        with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
            for line in response.iter_lines():
                if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                    tokens += 1
        return tokens

    return {"non-stream": whole, "stream": streamed}


def measure(model: Path, args: argparse.Namespace, tmp: Path) -> dict[str, dict[str, float]]:
    """Median tokens/s per (side, mode); rounds alternate sides so machine noise hits both alike."""
    import llama_cpp

    artifacts = ArtifactServer()
    with ServerThread(artifacts.app()) as server:
        artifacts.port = server.port
        sha = artifacts.add_file(model)
        agent = AgentProcess(tmp / "data", control_plane_url=artifacts.url, threads=args.threads).start()
        llm = llama_cpp.Llama(model_path=str(model), n_ctx=512, n_threads=args.threads, seed=0, verbose=False)
        try:
            agent.apply(desired_for(artifacts, sha, n_ctx=512)).raise_for_status()
            with httpx.Client(base_url=agent.url, timeout=300) as client:
                sides = {"in-process": direct_runs(llm, args), "agent": agent_runs(client, args)}
                samples: dict[str, dict[str, list[float]]] = {s: {"non-stream": [], "stream": []} for s in sides}
                for round_ in range(args.rounds + 1):  # round 0 warms up
                    for side, runs in sides.items():
                        for mode, run in runs.items():
                            value = timed(run)
                            if round_:
                                samples[side][mode].append(value)
                return {s: {m: statistics.median(v) for m, v in modes.items()} for s, modes in samples.items()}
        finally:
            llm.close()
            agent.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", choices=["tiny", "small"])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        model = write_tiny_gguf(tmp / "bench.gguf", seed=0, size=args.size)
        rates = measure(model, args, tmp)
    print(
        f"model: tiny GGUF size={args.size}, prompt {PROMPT!r}, {args.tokens} tokens, threads={args.threads}, "
        f"median of {args.rounds} alternating rounds"
    )
    print(f"{'mode':<12}{'in-process tok/s':>18}{'agent HTTP tok/s':>18}{'ratio':>8}{'target':>8}")
    for mode in ("non-stream", "stream"):
        direct, agent = rates["in-process"][mode], rates["agent"][mode]
        ratio = agent / direct
        verdict = "ok" if ratio >= TARGET else "below"
        print(f"{mode:<12}{direct:>18.1f}{agent:>18.1f}{ratio:>8.3f}{TARGET:>8.2f}  {verdict}")


if __name__ == "__main__":
    main()
