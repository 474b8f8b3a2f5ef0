"""Benchmark 4: requests failed during 20 model swaps under continuous load (target 0).

A real agent serves tiny GGUF model A; client threads (streaming and not) send requests without
pause while the agent is told to switch A -> B -> A ... 20 times. Every failed request counts.

    python benchmarks/agent_swaps.py [--swaps 20] [--clients 4]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import openai

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from slmops.tinymodels import write_tiny_gguf  # noqa: E402
from tests.support.agent import AgentProcess, ArtifactServer, desired_for  # noqa: E402
from tests.support.server_thread import ServerThread  # noqa: E402

TARGET_FAILED = 0


class Load:
    def __init__(self, url: str, clients: int) -> None:
        self.url = url
        self.stop = threading.Event()
        self.ok = 0
        self.failed: list[str] = []
        self.latencies: list[float] = []
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i % 2 == 0,)) for i in range(clients)]

    def _run(self, stream: bool) -> None:
        ai = openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0)
        while not self.stop.is_set():
            started = time.perf_counter()
            try:
                if stream:
                    chunks = list(ai.completions.create(model="tiny", prompt="hi", max_tokens=8, stream=True))
                    ok = chunks[-1].choices[0].finish_reason is not None
                else:
                    reply = ai.chat.completions.create(
                        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=8
                    )
                    ok = reply.usage is not None and reply.usage.completion_tokens > 0
                outcome = None if ok else "incomplete response"
            except Exception as exc:  # every failure is counted
                outcome = repr(exc)
            with self._lock:
                if outcome is None:
                    self.ok += 1
                    self.latencies.append(time.perf_counter() - started)
                else:
                    self.failed.append(outcome)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--swaps", type=int, default=20)
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        artifacts = ArtifactServer()
        with ServerThread(artifacts.app()) as server:
            artifacts.port = server.port
            shas = [artifacts.add_file(write_tiny_gguf(tmp / f"{i}.gguf", seed=i)) for i in (1, 2)]
            agent = AgentProcess(tmp / "data", control_plane_url=artifacts.url, trial_requests=10**6).start()
            try:
                agent.apply(desired_for(artifacts, shas[0], version="0")).raise_for_status()
                load = Load(agent.url, args.clients)
                for thread in load.threads:
                    thread.start()
                swap_s = []
                started = time.perf_counter()
                for i in range(1, args.swaps + 1):
                    t = time.perf_counter()
                    state = agent.apply(desired_for(artifacts, shas[i % 2], version=str(i))).json()
                    swap_s.append(time.perf_counter() - t)
                    assert state["current"]["version"] == str(i), state
                elapsed = time.perf_counter() - started
                load.stop.set()
                for thread in load.threads:
                    thread.join()
            finally:
                agent.stop()
    print(f"{args.swaps} swaps of tiny GGUF models in {elapsed:.1f} s under {args.clients} clients")
    print(f"requests served: {load.ok}, median latency {statistics.median(load.latencies) * 1000:.1f} ms")
    print(f"median swap (apply -> serving) {statistics.median(swap_s) * 1000:.0f} ms")
    print(f"{'failed requests':<20}{len(load.failed):>6}   target {TARGET_FAILED}  "
          f"{'ok' if len(load.failed) <= TARGET_FAILED else 'FAILED'}")  # fmt: skip
    for failure in load.failed[:5]:
        print("  ", failure)


if __name__ == "__main__":
    main()
