"""The embedded MQTT broker (amqtt 0.12, MQTT 3.1.1 only) for laptops and the demo.

It runs on its own event loop in a background thread, so a slow API request in the control
plane cannot stall message delivery and the reverse. With `auth` set, anonymous clients are
refused and, with `topics` set too, each device reaches only its own topics (the same rules as
deploy/mosquitto/), a will included; a packet over 1 MiB closes its connection. Production fleets
should use Mosquitto: see deploy/mosquitto/README.md.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from amqtt.adapters import ReaderAdapter, WriterAdapter
from amqtt.broker import Broker
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.mqtt.connack import ConnackPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import Session
from amqtt.utils import gen_client_id

from control_plane.fleet import broker_plugins
from control_plane.fleet.broker_plugins import ConnectPolicy, PasswordCheck, TopicPolicy
from shared.mqtt.errors import MqttError
from shared.net import free_port
from shared.topics import Topics

log = logging.getLogger(__name__)

_PLUGINS = "control_plane.fleet.broker_plugins"
# The largest remaining length a packet may declare: deploy/mosquitto/mosquitto.conf's max_packet_size.
MAX_PACKET_BYTES = 1024 * 1024


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
        tls: tuple[Path, Path] | None = None,
    ) -> None:
        """`tls` = (certificate, key): the listener at host:port speaks TLS only, and a plaintext
        listener on a free loopback port (`local_url`) serves clients on this machine."""
        self.host = host
        self.port = port
        self._tls = tls
        self.local_port = free_port() if tls is not None else port
        self._auth = auth
        self._policy = TopicPolicy(topics, admin_users) if (auth is not None and topics is not None) else None
        self._connect = ConnectPolicy(auth, admin_users, self._policy) if auth is not None else None
        self._key = uuid.uuid4().hex
        self._loop: asyncio.AbstractEventLoop | None = None
        self._broker: Broker | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"{'mqtts' if self._tls else 'mqtt'}://{self.host}:{self.port}"

    @property
    def local_url(self) -> str:
        """Plaintext, for the control plane in the same process: `url` itself without TLS, else loopback."""
        return self.url if self._tls is None else f"mqtt://127.0.0.1:{self.local_port}"

    def _listeners(self) -> dict[str, Any]:
        public: dict[str, Any] = {"type": "tcp", "bind": f"{self.host}:{self.port}", "max_connections": -1}
        if self._tls is None:
            return {"default": public}
        public.update(ssl=True, certfile=str(self._tls[0]), keyfile=str(self._tls[1]))
        # amqtt copies "default"'s values into every other listener's unset ones (ssl=False included),
        # so the plaintext one must be "default".
        local = {"type": "tcp", "bind": f"127.0.0.1:{self.local_port}", "max_connections": -1}
        return {"default": local, "devices": public}

    def config(self) -> dict[str, Any]:
        plugins: dict[str, Any] = {}
        if self._auth is None:
            plugins["amqtt.plugins.authentication.AnonymousAuthPlugin"] = {"allow_anonymous": True}
        else:
            plugins[f"{_PLUGINS}.PasswordCheckAuthPlugin"] = {"registry_key": self._key}
        if self._policy is not None:
            plugins[f"{_PLUGINS}.DeviceTopicPlugin"] = {"registry_key": self._key}
        return {
            "listeners": self._listeners(),
            "plugins": plugins,
        }

    def start(self, timeout_s: float = 10.0) -> None:
        if self._thread is not None:
            raise MqttError("embedded broker already started")
        broker_plugins.register(self._key, connect=self._connect, policy=self._policy)
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

    def disconnect(self, client_id: str, timeout_s: float = 10.0) -> bool:
        """Close `client_id`'s connection now (its will is sent); False when it was not connected.

        Its next CONNECT is checked again, so a revoked credential stays out.
        """
        loop = self._loop
        if loop is None or self._broker is None:
            return False
        closing = asyncio.run_coroutine_threadsafe(_close_connection(self._broker, client_id), loop)
        return closing.result(timeout=timeout_s)

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
            self._broker = _AdmittingBroker(self.config(), loop=asyncio.get_running_loop(), admission=self._connect)
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


async def _close_connection(broker: Broker, client_id: str) -> bool:
    session, handler = broker.sessions.get(client_id, (None, None))
    if session is None or handler is None or not session.transitions.is_connected():
        return False
    # As amqtt's own take-over does: the message loop sees the close, sends the will, cleans up.
    await handler.handle_connection_closed()
    await handler.stop()
    # Its will is queued before whatever a new connection under this id publishes (bounded wait).
    for _ in range(100):
        if not session.transitions.is_connected():
            break
        await asyncio.sleep(0.01)
    return True


class PacketTooLarge(AMQTTError):
    """A packet declared a remaining length over the cap: its connection closes, its body unread."""


class _PacketSizeGuard(ReaderAdapter):
    """Follows the MQTT framing (3.1.1 section 2.2) of what amqtt reads from one connection and
    raises `PacketTooLarge` once a fixed header's remaining length exceeds `limit`, so no body over
    the cap is ever buffered (amqtt 0.12 reads a PUBLISH payload in one `readexactly`)."""

    def __init__(self, reader: ReaderAdapter, limit: int) -> None:
        self._reader = reader
        self._limit = limit
        self._body_left = 0  # bytes of the current packet still to come after its fixed header
        self._in_header = False  # between a packet's first byte and its last remaining-length byte
        self._length = self._multiplier = 0
        self.exceeded = False

    async def read(self, n: int = -1) -> bytes:
        if self.exceeded:
            raise PacketTooLarge(f"a packet is over {self._limit} bytes")
        data = await self._reader.read(n)
        self._follow(data)
        return data

    def feed_eof(self) -> None:
        self._reader.feed_eof()

    def _follow(self, data: bytes) -> None:
        at = 0
        while at < len(data):
            if self._body_left:
                step = min(self._body_left, len(data) - at)
                self._body_left, at = self._body_left - step, at + step
            elif not self._in_header:  # the packet type byte
                self._in_header, self._length, self._multiplier, at = True, 0, 1, at + 1
            else:
                byte, at = data[at], at + 1
                self._length += (byte & 0x7F) * self._multiplier
                self._multiplier *= 128
                if not byte & 0x80:
                    self._in_header, self._body_left = False, self._length
                    if self._length > self._limit:
                        self.exceeded = True
                        raise PacketTooLarge(f"a packet declared {self._length} bytes, over {self._limit}")


class _AdmittingBroker(Broker):
    """amqtt's Broker, refusing a CONNECT before its client id can touch an existing session.

    amqtt 0.12 deletes (clean session) or adopts, overwriting its username (persistent), the
    session a CONNECT's client id names before it authenticates: a refused client could end the
    control plane's session and a device could take it over. `_initialize_client_session` below
    is amqtt 0.12's (pinned in pyproject.toml) with the `ConnectPolicy` in front.
    """

    def __init__(self, config: dict[str, Any], *, loop: asyncio.AbstractEventLoop, admission: ConnectPolicy | None):
        super().__init__(config, loop=loop)
        self._admission = admission

    async def _client_connected(self, listener_name: str, reader: ReaderAdapter, writer: WriterAdapter) -> None:
        guarded = _PacketSizeGuard(reader, MAX_PACKET_BYTES)
        try:
            await super()._client_connected(listener_name, guarded, writer)
        finally:
            if guarded.exceeded:  # amqtt leaves a connection that failed its CONNECT open
                await writer.close()

    async def _initialize_client_session(
        self, reader: Any, writer: Any, remote_address: str, remote_port: int
    ) -> tuple[BrokerProtocolHandler, Session]:
        if self._admission is None:
            return await super()._initialize_client_session(reader, writer, remote_address, remote_port)
        try:
            handler, incoming = await BrokerProtocolHandler.init_from_connect(reader, writer, self.plugins_manager)
        except MQTTError:
            await writer.close()
            raise
        except NoDataError as exc:
            raise AMQTTError(exc) from exc
        will_topic = incoming.will_topic if incoming.will_flag else None
        refusal = self._admission.refusal(incoming.username, incoming.password, incoming.client_id, will_topic)
        if refusal is not None:
            await ConnackPacket.build(0, refusal).to_stream(writer)
            await writer.close()
            raise MQTTError(f"refused {incoming.client_id!r} ({incoming.username!r}) from {remote_address}: {refusal}")
        return handler, await self._attach_session(incoming)

    async def _attach_session(self, incoming: Session) -> Session:
        """amqtt 0.12: a clean session replaces a stored one, a persistent one resumes it."""
        if incoming.clean_session:
            if incoming.client_id:
                # MQTT-3.1.4-2: the client id's open connection goes too (amqtt would leave it running).
                await _close_connection(self, incoming.client_id)
                await self._delete_session(incoming.client_id)
            else:
                incoming.client_id = gen_client_id()
            incoming.parent = 0
        elif incoming.client_id in self._sessions:
            existing, _ = self._sessions[incoming.client_id]
            for name in ("will_flag", "will_message", "will_topic", "will_qos", "keep_alive", "username", "password"):
                setattr(existing, name, getattr(incoming, name))
            incoming, incoming.parent = existing, 1
        else:
            incoming.parent = 0
        delay = self.config.get("timeout-disconnect-delay", 0)
        if incoming.keep_alive > 0 and isinstance(delay, int):
            incoming.keep_alive += delay
        return incoming
