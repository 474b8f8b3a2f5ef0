"""The embedded MQTT broker (amqtt 0.12, MQTT 3.1.1 only) for laptops and the demo.

It runs on its own event loop in a background thread, so a slow API request in the control
plane cannot stall message delivery and the reverse. With `auth` set, anonymous clients are
refused and, with `topics` set too, each device reaches only its own topics (the same rules as
deploy/mosquitto/). Production fleets should use Mosquitto: see deploy/mosquitto/README.md.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import uuid
from concurrent.futures import Future
from typing import Any

from amqtt.broker import Broker

from shared.topics import Topics
from slmops.mqtt import broker_plugins
from slmops.mqtt.broker_plugins import PasswordCheck, TopicPolicy
from slmops.mqtt.errors import MqttError

log = logging.getLogger(__name__)

_PLUGINS = "slmops.mqtt.broker_plugins"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now (another process could still take it before we bind)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class EmbeddedBroker:
    """`start()` returns once the broker listens; `stop()` shuts it down and joins its thread."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 1883,
        *,
        auth: PasswordCheck | None = None,
        topics: Topics | None = None,
        admin_users: frozenset[str] = frozenset(),
    ) -> None:
        self.host = host
        self.port = port
        self._auth = auth
        self._policy = TopicPolicy(topics, admin_users) if (auth is not None and topics is not None) else None
        self._key = uuid.uuid4().hex
        self._loop: asyncio.AbstractEventLoop | None = None
        self._broker: Broker | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def config(self) -> dict[str, Any]:
        plugins: dict[str, Any] = {}
        if self._auth is None:
            plugins["amqtt.plugins.authentication.AnonymousAuthPlugin"] = {"allow_anonymous": True}
        else:
            plugins[f"{_PLUGINS}.PasswordCheckAuthPlugin"] = {"registry_key": self._key}
        if self._policy is not None:
            plugins[f"{_PLUGINS}.DeviceTopicPlugin"] = {"registry_key": self._key}
        return {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}", "max_connections": -1}},
            "plugins": plugins,
        }

    def start(self, timeout_s: float = 10.0) -> None:
        if self._thread is not None:
            raise MqttError("embedded broker already started")
        broker_plugins.register(self._key, check=self._auth, policy=self._policy)
        started: Future[None] = Future()
        self._thread = threading.Thread(target=self._run, args=(started,), name="slmops-mqtt-broker", daemon=True)
        self._thread.start()
        try:
            started.result(timeout=timeout_s)
        except Exception as exc:
            self._thread.join(timeout=timeout_s)
            self._thread = None
            broker_plugins.unregister(self._key)
            raise MqttError(f"embedded MQTT broker did not start on {self.host}:{self.port}: {exc}") from exc
        log.info("embedded MQTT broker listening on %s", self.url)

    def stop(self, timeout_s: float = 10.0) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._shutdown()))
        thread.join(timeout=timeout_s)
        self._thread = None
        broker_plugins.unregister(self._key)

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def _run(self, started: Future[None]) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._start_broker(started))
            if started.exception() is None:
                loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
            self._loop = None

    async def _start_broker(self, started: Future[None]) -> None:
        try:
            self._broker = Broker(self.config(), loop=asyncio.get_running_loop())
            await self._broker.start()
        except Exception as exc:
            started.set_exception(exc)
            return
        started.set_result(None)

    async def _shutdown(self) -> None:
        try:
            if self._broker is not None:
                await self._broker.shutdown()
        except Exception:
            log.exception("embedded MQTT broker shutdown failed")
        finally:
            pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            asyncio.get_running_loop().stop()
