"""SmolLM2-135M-Instruct served three ways, side by side: tokens/s, time to first token, memory.

The agent (a real daemon, loopback HTTP), llama-cpp-python in this process, and llama-cpp-python's
own server (`python -m llama_cpp.server`), on the same GGUF, prompt, greedy sampling, n_ctx and
thread count; rounds alternate sides so machine noise hits all alike. Then the agent's RSS while
serving the model against a bare process that loads it and generates once.
Targets: tokens/s >= 0.97 of in-process, TTFT within 10 %, RSS ratio <= 1.10.

llama_cpp.server needs the `server` extra's packages; install them first if missing:

    .venv/bin/pip install sse-starlette starlette-context
    python benchmarks/smollm2_serving.py [--tokens 64] [--rounds 5] [--threads 2] [--baseline-checkout DIR]

`--baseline-checkout DIR` adds a second agent run from another checkout (e.g. `git worktree add
--detach /tmp/base main`) as one more side: before and after, measured in the same rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from shared.net import free_port  # noqa: E402
from slmops.modelopt.sample import fetch_sample  # noqa: E402
from tests.support.agent import AgentProcess, ArtifactServer, desired_for  # noqa: E402
from tests.support.server_thread import ServerThread  # noqa: E402
from tests.support.waiting import wait_for  # noqa: E402

PROMPT = "Once upon a time, in a small village by the sea,"
N_CTX = 512
BARE = """
import sys, psutil, llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=int(sys.argv[2]), n_threads=int(sys.argv[3]), verbose=False)
llm.create_completion("Hello", max_tokens=8, temperature=0.0)
print(psutil.Process().memory_info().rss)
"""

Run = Callable[[], tuple[float, float]]  # -> (seconds to first token, tokens per second)


def timed_stream(chunks: Iterator[str]) -> tuple[float, int]:
    """Seconds to the first non-empty text and the number of text chunks (one per token here)."""
    started = time.perf_counter()
    first, count = None, 0
    for text in chunks:
        if text:
            count += 1
            first = first if first is not None else time.perf_counter() - started
    return (first or 0.0), count


def http_run(client: httpx.Client, model: str, tokens: int) -> Run:
    body = {"model": model, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0.0, "stream": True}

    def texts() -> Iterator[str]:
        with client.stream("POST", "/v1/completions", json=body) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    choices = json.loads(line[6:]).get("choices") or [{}]
                    yield choices[0].get("text") or ""

    return lambda: _rate(texts)


def direct_run(llm: object, tokens: int) -> Run:
    def texts() -> Iterator[str]:
        stream = llm.create_completion(PROMPT, max_tokens=tokens, temperature=0.0, stream=True)  # type: ignore[attr-defined]
        for chunk in stream:
            yield chunk["choices"][0]["text"]

    return lambda: _rate(texts)


def _rate(texts: Callable[[], Iterator[str]]) -> tuple[float, float]:
    started = time.perf_counter()
    ttft, count = timed_stream(texts())
    return ttft, count / (time.perf_counter() - started)


def llama_server(model: Path, threads: int) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--n_ctx", str(N_CTX)]
    command += ["--n_threads", str(threads), "--n_threads_batch", str(threads), "--port", str(port)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{url}/v1/models", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up, what="llama_cpp.server", timeout_s=120, proc=proc)
    return proc, url


def bare_rss(model: Path, threads: int) -> int:
    out = subprocess.run([sys.executable, "-c", BARE, str(model), str(N_CTX), str(threads)], capture_output=True)
    return int(out.stdout.decode().split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--baseline-checkout", type=Path, default=None, help="also run the agent from this checkout")
    args = parser.parse_args()
    import llama_cpp

    model = fetch_sample("smollm2")
    artifacts = ArtifactServer()
    with tempfile.TemporaryDirectory() as tmp, ServerThread(artifacts.app()) as server:
        artifacts.port = server.port
        sha = artifacts.add_file(model)
        agent = AgentProcess(Path(tmp) / "data", control_plane_url=artifacts.url, threads=args.threads).start()
        agents = {"agent": agent}
        if args.baseline_checkout:
            baseline = AgentProcess(Path(tmp) / "baseline", control_plane_url=artifacts.url, threads=args.threads)
            baseline.cwd = args.baseline_checkout.resolve()
            agents["agent (baseline)"] = baseline.start()
        server_proc, server_url = llama_server(model, args.threads)
        llm = llama_cpp.Llama(model_path=str(model), n_ctx=N_CTX, n_threads=args.threads, verbose=False)
        try:
            for each in agents.values():
                each.apply(desired_for(artifacts, sha, model="smol", n_ctx=N_CTX)).raise_for_status()
            clients = {name: httpx.Client(base_url=each.url, timeout=600) for name, each in agents.items()}
            with httpx.Client(base_url=server_url, timeout=600) as to_server:
                sides = {"in-process": direct_run(llm, args.tokens)}
                sides |= {name: http_run(client, "smol", args.tokens) for name, client in clients.items()}
                sides["llama_cpp.server"] = http_run(to_server, str(model), args.tokens)
                samples: dict[str, list[tuple[float, float]]] = {side: [] for side in sides}
                for round_ in range(args.rounds + 1):  # round 0 warms up
                    for side, run in sides.items():
                        result = run()
                        if round_:
                            samples[side].append(result)
                rss = {name: psutil.Process(each.proc.pid).memory_info().rss for name, each in agents.items()}  # type: ignore[union-attr]
                for client in clients.values():
                    client.close()
        finally:
            llm.close()
            server_proc.terminate()
            server_proc.wait(timeout=30)
            for each in agents.values():
                each.stop()
    report(samples, args, rss, bare_rss(model, args.threads))


def report(
    samples: dict[str, list[tuple[float, float]]], args: argparse.Namespace, rss: dict[str, int], bare: int
) -> None:
    cpus = psutil.cpu_count()
    setup = f"{args.tokens} tokens, greedy, n_ctx {N_CTX}, threads {args.threads}, {cpus} CPUs"
    print(f"SmolLM2-135M-Instruct Q4_1, {setup}")
    print(f"median of {args.rounds} alternating rounds, streaming /v1/completions")
    base_ttft = statistics.median(s[0] for s in samples["in-process"])
    base_rate = statistics.median(s[1] for s in samples["in-process"])
    print(f"{'side':<18}{'tokens/s':>10}{'vs in-proc':>12}{'TTFT ms':>10}{'vs in-proc':>12}")
    for side, values in samples.items():
        ttft, rate = statistics.median(v[0] for v in values), statistics.median(v[1] for v in values)
        print(f"{side:<18}{rate:>10.1f}{rate / base_rate:>12.3f}{ttft * 1000:>10.1f}{ttft / base_ttft:>12.3f}")
    print(f"load average {' '.join(f'{x:.2f}' for x in psutil.getloadavg())}")
    for name, agent_rss in rss.items():
        print(f"RSS: {name} serving {agent_rss / 2**20:.0f} MiB, bare process {bare / 2**20:.0f} MiB, "
              f"ratio {agent_rss / bare:.3f} (target <= 1.10)")  # fmt: skip


if __name__ == "__main__":
    main()
