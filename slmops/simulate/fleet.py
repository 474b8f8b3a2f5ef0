"""A simulated fleet in one process: enroll N devices through the REST API, then run N agents.

`enroll_fleet` creates each device (POST /v1/devices, admin token) and exchanges its one-time
enrollment token for a credential (POST /v1/devices/enroll), as a real device does; a credentials
file saves that step on the next run. `SimFleet` connects the agents with bounded concurrency (a
broker refuses a burst of thousands of simultaneous CONNECTs less gracefully than a steady flow)
and runs them until stopped.
"""

from __future__ import annotations

import asyncio
import json
import resource
from collections.abc import Callable, Coroutine, Iterable
from pathlib import Path
from typing import Any, TypeVar

import httpx

from shared.hardware import HardwareProfile
from shared.topics import DEFAULT_PREFIX
from slmops.simulate.agent import Credential, SimAgent, SimConfig, SimStats

ProgressFn = Callable[[int, int], None]  # (done, total)
T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run a fleet's coroutine on uvloop where it is installed (it comes with uvicorn[standard]).

    Thousands of sockets on one loop: asyncio's pure-Python selector loop spent more per readable
    socket than the simulated agent spends on its message, and on the benchmarks' two cores that
    time is taken from the control plane and the broker being measured.
    """
    try:
        import uvloop
    except ImportError:  # e.g. Windows: the standard loop works, only slower
        return asyncio.run(main)
    return uvloop.run(main)


def raise_fd_limit() -> int:
    """Every agent holds a socket: lift the soft descriptor limit to the hard one; return it."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


async def enroll_fleet(
    base_url: str,
    admin_token: str,
    count: int,
    *,
    name_prefix: str = "sim",
    labels: dict[str, str] | None = None,
    mqtt_url: str | None = None,
    concurrency: int = 16,
    progress: ProgressFn | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> list[Credential]:
    """Create and enroll `count` devices; `mqtt_url` overrides the broker URL the server hands out.

    `transport`: e.g. an `httpx.ASGITransport` to reach an in-process app (tests)."""
    hardware = HardwareProfile(cpu_model="sim", cpu_cores=4, ram_mb=4096, arch="x86_64", agent_version="sim")
    headers = {"Authorization": f"Bearer {admin_token}"}
    limit = asyncio.Semaphore(concurrency)
    done = 0

    async def one(client: httpx.AsyncClient, i: int) -> Credential:
        nonlocal done
        async with limit:
            body = {"name": f"{name_prefix}-{i:05d}", "labels": labels or {}}
            created = await client.post("/v1/devices", json=body, headers=headers)
            _check(created, "create a device (is the token an admin token?)")
            enroll = {"enrollment_token": created.json()["enrollment_token"], "hardware": hardware.model_dump()}
            enrolled = await client.post("/v1/devices/enroll", json=enroll)
            _check(enrolled, "enroll a device")
        done += 1
        if progress is not None:
            progress(done, count)
        return _credential(enrolled.json(), mqtt_url)

    async with httpx.AsyncClient(base_url=base_url, timeout=60, transport=transport) as client:
        return list(await asyncio.gather(*(one(client, i) for i in range(count))))


def _check(response: httpx.Response, doing: str) -> None:
    if response.status_code >= 400:
        raise RuntimeError(f"could not {doing}: HTTP {response.status_code} {response.text[:300]}")


def _credential(body: dict[str, Any], mqtt_url: str | None) -> Credential:
    url = mqtt_url or body.get("mqtt_url")
    if not url:
        raise RuntimeError("the control plane named no MQTT broker: pass --mqtt-url")
    return Credential(body["device_id"], body["device_secret"], url, body.get("topic_prefix") or DEFAULT_PREFIX)


def save_credentials(path: Path, credentials: Iterable[Credential]) -> None:
    rows = [c.__dict__ for c in credentials]
    path.write_text(json.dumps(rows, indent=1))
    path.chmod(0o600)  # device secrets


def load_credentials(path: Path, mqtt_url: str | None = None) -> list[Credential]:
    """Read a credentials file: a JSON list of enrollment responses (device_id, device_secret, ...)."""
    rows = json.loads(path.read_text())
    return [_credential(row, mqtt_url) for row in rows]


class SimFleet:
    """`start()` connects every agent (awaiting the connections), `stop()` disconnects them cleanly."""

    def __init__(self, credentials: list[Credential], config: SimConfig) -> None:
        self.stats = SimStats()
        self.agents = [SimAgent(c, config, self.stats) for c in credentials]
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(
        self, *, concurrency: int = 100, progress: ProgressFn | None = None, timeout_s: float = 600
    ) -> None:
        total = len(self.agents)
        for i in range(0, total, concurrency):
            chunk = self.agents[i : i + concurrency]
            self._tasks += [asyncio.create_task(agent.run(self._stop)) for agent in chunk]
            # Wait for this wave before starting the next: bounded concurrency on the broker.
            await asyncio.wait_for(asyncio.gather(*(a.connected.wait() for a in chunk)), timeout_s)
            if progress is not None:
                progress(min(i + concurrency, total), total)

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def wait(self, predicate: Callable[[], bool], timeout_s: float) -> bool:
        """Wait (agents keep running) until `predicate` is true or `timeout_s` passed. It is checked
        now and each time an agent has applied or failed a desired state, so the wait ends with the
        state that completes it (benchmarks time it)."""
        if predicate():
            return True
        done = asyncio.get_running_loop().create_future()

        def check() -> None:
            if not done.done() and predicate():
                done.set_result(None)

        self.stats.listeners.append(check)
        try:
            await asyncio.wait_for(done, timeout_s)
            return True
        except TimeoutError:
            return predicate()
        finally:
            self.stats.listeners.remove(check)

    def versions(self) -> dict[str | None, int]:
        counts: dict[str | None, int] = {}
        for agent in self.agents:
            counts[agent.current_version] = counts.get(agent.current_version, 0) + 1
        return counts
