"""Simulated devices for synchronous tests: the asyncio `slmops.simulate.SimAgent`, each on an event
loop thread of its own, started, stopped and read from the test's thread.

A test device acts sooner than the fleet default (`sim_config`) and sends telemetry only when the
test asks (`publish_telemetry`, `TelemetryPump`), so a test counts exactly what it sent.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import Any

from shared.messages import StateMessage
from shared.topics import Topics
from slmops.simulate import Credential, SimAgent, SimConfig, SimStats

CONNECT_TIMEOUT_S = 60.0


def sim_config(**overrides: Any) -> SimConfig:
    """The behaviour of a test device: applies after 50 ms, no telemetry of its own."""
    return SimConfig(**{"apply_delay_s": 0.05, "telemetry_interval_s": None, **overrides})


class SimDevice:
    """One simulated device; `start()` connects it (it reconnects by itself until `stop()`)."""

    def __init__(self, url: str, topics: Topics, device_id: str, secret: str, config: SimConfig | None = None) -> None:
        credential = Credential(device_id=device_id, device_secret=secret, mqtt_url=url, topic_prefix=topics.prefix)
        self.agent = SimAgent(credential, config or sim_config(), SimStats())
        self.device_id = device_id
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"sim-{device_id}", daemon=True)
        self._stop = asyncio.Event()
        self._running: concurrent.futures.Future[None] | None = None  # the agent's run()

    @property
    def state(self) -> StateMessage:
        return self.agent.state

    @state.setter
    def state(self, value: StateMessage) -> None:
        """Set before `start()`: what the device already serves when it first connects."""
        self.agent.state = value

    @property
    def current_version(self) -> str | None:
        return self.agent.current_version

    @property
    def applied(self) -> list[str]:
        """Desired message ids acted on, in order."""
        return self.agent.applied

    @property
    def connected(self) -> bool:
        return self.agent.connected.is_set()

    def start(self, *, wait: bool = True, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        """Connect; with `wait`, return once connected (birth, subscription and state sent)."""
        self._thread.start()
        self._running = asyncio.run_coroutine_threadsafe(self.agent.run(self._stop), self._loop)
        if wait:
            connected = asyncio.wait_for(self.agent.connected.wait(), timeout_s)
            asyncio.run_coroutine_threadsafe(connected, self._loop).result()

    def stop(self) -> None:
        """Disconnect cleanly (an offline status first); a desired state still being applied is
        abandoned, as on power loss."""
        running, self._running = self._running, None
        if running is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
            running.result(timeout=30)
            asyncio.run_coroutine_threadsafe(_cancel_the_rest(), self._loop).result(timeout=10)
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
        self._loop.close()

    def publish_telemetry(self) -> bool:
        """Send one telemetry window for the version served (QoS 1, acknowledged); False if none
        was sent (nothing served, not connected, or stopped meanwhile)."""
        if self._running is None:
            return False
        try:
            sent = asyncio.run_coroutine_threadsafe(self.agent.send_telemetry(), self._loop)
            return bool(sent.result(timeout=30))
        except (RuntimeError, concurrent.futures.CancelledError):  # the loop closed or stopped under it
            return False


async def _cancel_the_rest() -> None:
    """Cancel what is still running on a stopping device's loop (a publish awaiting its PUBACK)."""
    rest = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in rest:
        task.cancel()
    await asyncio.gather(*rest, return_exceptions=True)


def start_sim_devices(url: str, topics: Topics, creds: list[dict], config: SimConfig | None = None) -> list[SimDevice]:  # type: ignore[type-arg]
    devices = [SimDevice(url, topics, c["device_id"], c["device_secret"], config) for c in creds]
    for device in devices:
        device.start()
    return devices


class TelemetryPump:
    """Publishes a telemetry window from every connected simulated device every `interval_s`."""

    def __init__(self, devices: list[SimDevice], interval_s: float = 0.2) -> None:
        self.devices = devices
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TelemetryPump:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            for device in self.devices:
                if device.connected:
                    device.publish_telemetry()
