"""One class owns the paho-mqtt client: will, birth, subscriptions, reconnects, acknowledged publishes.

Shaped after Home Assistant's MQTT integration: the last will is set before connecting, a birth
message goes out on every connect, every subscription is restored after a reconnect, paho calls
happen under one lock, and callbacks can be handed to an asyncio loop (`loop_handler`). Handlers
run on paho's network thread: they must not block, and must not wait for a publish there.

Given several URLs (the nodes of a broker cluster), a client starts on one chosen by its client
id, so a fleet spreads over the nodes, and moves to the next after each lost connection or failed
attempt: paho reconnects to one host only, with its backoff between attempts.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.reasoncodes import ReasonCode

from shared.mqtt.buffered import BufferedClient
from shared.mqtt.errors import MqttConnectError, MqttPublishError
from shared.mqtt.types import (
    AsyncHandler,
    ClientCounters,
    ConnectionListener,
    Handler,
    Outgoing,
    Payload,
    Protocol,
    SubscribeResult,
    _SubackWaiter,
    _Subscription,
    loop_handler,
)
from shared.mqtt.url import BrokerURL, parse_broker_urls

log = logging.getLogger(__name__)
ROUTE_CACHE_SIZE = 65536  # topics whose matching handlers are remembered

__all__ = [
    "AsyncHandler",
    "ClientCounters",
    "ConnectionListener",
    "Handler",
    "MqttClient",
    "Outgoing",
    "Payload",
    "Protocol",
    "SubscribeResult",
    "loop_handler",
]


class MqttClient:
    """A connected MQTT session; see the module docstring for the contract."""

    def __init__(
        self,
        url: str | BrokerURL | Sequence[BrokerURL],
        *,
        client_id: str,
        protocol: Protocol = "3.1.1",
        will: Outgoing | Callable[[], Outgoing] | None = None,
        birth: Outgoing | Callable[[], Outgoing] | None = None,
        keepalive_s: int = 30,
        reconnect_min_delay_s: int = 1,
        reconnect_max_delay_s: int = 30,
        tls_context: ssl.SSLContext | None = None,
        persistent_session: bool = False,
    ) -> None:
        """`url`: one broker, or several (comma-separated, or a sequence) that are one cluster."""
        self.urls = (
            parse_broker_urls(url) if isinstance(url, str) else [url] if isinstance(url, BrokerURL) else list(url)
        )
        # Spread clients over the nodes, the same node for the same client every time.
        self._url_index = zlib.crc32(client_id.encode("utf-8")) % len(self.urls)
        self.client_id = client_id
        self.requested_protocol = protocol
        self.counters = ClientCounters()
        self._will = will
        self._birth = birth
        self._keepalive_s = keepalive_s
        self._reconnect_delays = (reconnect_min_delay_s, reconnect_max_delay_s)
        self._tls_context = tls_context
        # A persistent session (3.1.1 clean session 0, section 3.1.2.4; v5 clean start 0 with a
        # session expiry) makes the broker queue QoS 1 messages while this client is away.
        self._persistent = persistent_session
        # Two locks, never nested: paho holds its callback mutex while calling us, so our callbacks
        # take only `_state_lock`, and paho calls are made under `_paho_lock` only.
        self._paho_lock = threading.RLock()
        self._state_lock = threading.Lock()
        self._subscriptions: dict[str, _Subscription] = {}
        self._routes: dict[str, list[Handler]] = {}  # topic -> handlers of the filters matching it
        self._suback_waiters: dict[int, _SubackWaiter] = {}
        self._early_subacks: dict[int, list[int | None]] = {}
        self._listeners: list[ConnectionListener] = []
        self._burst_hooks: list[Callable[[], None]] = []
        self._connected = threading.Event()
        self._network_thread_id: int | None = None
        self._paho: paho.Client | None = None
        self.protocol: MQTTProtocolVersion | None = None
        self.last_refusal: str | None = None  # the broker's reason when it refused a CONNECT

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def url(self) -> BrokerURL:
        """The broker this client is connected to, or tries next."""
        return self.urls[self._url_index]

    def start(self, *, wait: bool = True, timeout_s: float = 10.0) -> None:
        """Connect in the background; paho keeps reconnecting with backoff until `stop()`."""
        self.protocol = self._choose_protocol(timeout_s)
        client = self._build_paho(self.protocol)
        with self._paho_lock:
            self._paho = client
            client.connect_async(self.url.host, self.url.port, keepalive=self._keepalive_s, **self._session_args())
            client.loop_start()
        if wait and not self._wait_first_connect(timeout_s):
            refusal = self.last_refusal
            self.stop(publish_offline=False)
            why = f"refused: {refusal}" if refusal else f"no connection within {timeout_s:.1f}s"
            raise MqttConnectError(f"{self.url.redacted()} as {self.client_id}: {why}")

    def _wait_first_connect(self, timeout_s: float) -> bool:
        # A refusal (bad credentials) ends the wait early; paho would otherwise retry until timeout.
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._connected.wait(0.05):
                return True
            if self.last_refusal is not None:
                return False
        return self._connected.is_set()

    def stop(self, *, publish_offline: bool = True, timeout_s: float = 5.0) -> None:
        """Disconnect cleanly; a clean DISCONNECT discards the will (MQTT 3.1.1 section 3.14.4),
        so the will's message is published explicitly first when `publish_offline`."""
        client = self._paho
        if client is None:
            return
        if publish_offline and self._will is not None and self.connected:
            try:
                self.publish_message(_resolve(self._will), timeout_s=timeout_s)
            except MqttPublishError:
                log.warning("could not publish the offline status of %s before stopping", self.client_id)
        with self._paho_lock:
            client.disconnect()
        client.loop_stop()
        self._connected.clear()
        self._paho = None

    def set_password(self, password: str) -> None:
        """Use `password` from the next CONNECT on (a rotated credential); the live session stays."""
        self.urls = [url.with_credentials(url.username, password) for url in self.urls]
        with self._paho_lock:
            if self._paho is not None:
                self._paho.username_pw_set(self.url.username, password)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def add_connection_listener(self, listener: ConnectionListener) -> None:
        """`listener(True)` after each (re)connect and its resubscriptions, `listener(False)` on loss."""
        self._listeners.append(listener)

    def add_read_burst_hook(self, hook: Callable[[], None]) -> None:
        """`hook()` on the network thread after each burst of packets read, before the PUBACKs of
        the messages in it are sent (the ingest journal writes what it recorded then)."""
        self._burst_hooks.append(hook)

    # -- publishing --------------------------------------------------------------------------

    def publish(
        self,
        topic: str,
        payload: Payload,
        *,
        qos: int = 1,
        retain: bool = False,
        wait: bool = True,
        timeout_s: float = 10.0,
    ) -> paho.MQTTMessageInfo:
        """Publish; with `wait` and QoS >= 1, return only after the broker's PUBACK."""
        info = self._publish_nowait(topic, payload, qos=qos, retain=retain)
        if wait and qos > 0:
            self._wait_for_ack(info, topic, timeout_s)
        return info

    def publish_message(self, message: Outgoing, *, wait: bool = True, timeout_s: float = 10.0) -> None:
        self.publish(
            message.topic,
            message.payload,
            qos=message.qos,
            retain=message.retain,
            wait=wait,
            timeout_s=timeout_s,
        )

    def publish_many(self, messages: Iterable[Outgoing], *, timeout_s: float = 30.0) -> int:
        """Publish all, then wait for every PUBACK (pipelined: far faster than one at a time).

        `timeout_s` bounds the whole batch, not each message.
        """
        return self.wait_published(self.publish_all(messages), timeout_s=timeout_s)

    def publish_all(self, messages: Iterable[Outgoing]) -> list[tuple[str, paho.MQTTMessageInfo]]:
        """Queue every message without waiting for the broker; `wait_published` waits. A caller
        can queue the next batch before waiting on this one, so the broker never runs dry."""
        return [(m.topic, self._publish_nowait(m.topic, m.payload, qos=m.qos, retain=m.retain)) for m in messages]

    def wait_published(self, infos: list[tuple[str, paho.MQTTMessageInfo]], *, timeout_s: float = 30.0) -> int:
        """Wait for every PUBACK of what `publish_all` queued; `timeout_s` bounds them all."""
        deadline = time.monotonic() + timeout_s
        for topic, info in infos:
            if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS or info.rc == MQTTErrorCode.MQTT_ERR_AGAIN:
                self._wait_for_ack(info, topic, max(deadline - time.monotonic(), 0.001))
            else:
                self.counters.publish_failures += 1
                raise MqttPublishError(f"publish to {topic} refused: {paho.error_string(info.rc)}")
        return len(infos)

    async def publish_async(
        self, topic: str, payload: Payload, *, qos: int = 1, retain: bool = False, timeout_s: float = 10.0
    ) -> None:
        """Like `publish`, awaiting the PUBACK without blocking the event loop."""
        info = self._publish_nowait(topic, payload, qos=qos, retain=retain)
        if qos > 0:
            await asyncio.to_thread(self._wait_for_ack, info, topic, timeout_s)

    def _publish_nowait(self, topic: str, payload: Payload, *, qos: int, retain: bool) -> paho.MQTTMessageInfo:
        client = self._require_client()
        if not self.connected:
            # Refuse instead of letting paho queue in memory: the caller spools what must survive.
            self.counters.publish_failures += 1
            raise MqttPublishError(f"not connected to {self.url.redacted()}; cannot publish to {topic}")
        with self._paho_lock:
            return client.publish(topic, payload, qos=qos, retain=retain)

    def _wait_for_ack(self, info: paho.MQTTMessageInfo, topic: str, timeout_s: float) -> None:
        if threading.get_ident() == self._network_thread_id:
            raise MqttPublishError("waiting for a PUBACK on paho's network thread would deadlock")
        try:
            info.wait_for_publish(timeout_s)
        except (ValueError, RuntimeError) as exc:
            self.counters.publish_failures += 1
            raise MqttPublishError(f"publish to {topic} failed: {exc}") from exc
        if not info.is_published():
            self.counters.publish_failures += 1
            raise MqttPublishError(f"no PUBACK for {topic} within {timeout_s:.1f}s")

    # -- subscriptions -----------------------------------------------------------------------

    def subscribe(
        self, topic_filter: str, handler: Handler, *, qos: int = 1, timeout_s: float | None = 10.0
    ) -> SubscribeResult | None:
        """Register `handler(topic, payload)`; it stays subscribed across reconnects.

        When this call sends a SUBSCRIBE (connected, and the filter is new) and `timeout_s` is
        set, waits for the SUBACK and returns what was granted; otherwise returns None.
        """
        with self._state_lock:
            is_new = topic_filter not in self._subscriptions
            sub = self._subscriptions.setdefault(topic_filter, _Subscription(topic_filter, qos))
            sub.handlers.append(handler)
            self._routes.clear()
            # Decided under the lock `_on_connect` takes to snapshot: each filter is sent once,
            # either here or by the reconnect.
            send_now = is_new and self._connected.is_set()
        if not send_now:
            return None
        # Re-subscribing an existing filter would make the broker resend its retained messages.
        return self._send_subscribe([(topic_filter, qos)], timeout_s)

    def unsubscribe(self, topic_filter: str) -> None:
        with self._state_lock:
            self._subscriptions.pop(topic_filter, None)
            self._routes.clear()
        with self._paho_lock:
            if self._paho is not None and self.connected:
                self._paho.unsubscribe(topic_filter)

    def _send_subscribe(
        self, filters: list[tuple[str, int]], timeout_s: float | None, *, restore_attempt: int | None = None
    ) -> SubscribeResult | None:
        client = self._require_client()
        with self._paho_lock:
            rc, mid = client.subscribe(filters)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            return None
        waiter = _SubackWaiter(filters=filters, restore_attempt=restore_attempt)
        with self._state_lock:
            early = self._early_subacks.pop(mid, None)  # the SUBACK may beat us here
            if early is None:
                self._suback_waiters[mid] = waiter
            else:
                waiter.granted.extend(early)
                waiter.done.set()
        if early is not None:
            self._retry_refused(waiter)
        if timeout_s is None or threading.get_ident() == self._network_thread_id:
            return None
        if not waiter.done.wait(timeout_s):
            with self._state_lock:
                self._suback_waiters.pop(mid, None)
            return None
        return SubscribeResult(dict(zip((f for f, _ in filters), waiter.granted, strict=False)))

    # -- paho callbacks (network thread) -----------------------------------------------------

    def _on_connect(self, client: paho.Client, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        self._network_thread_id = threading.get_ident()
        if reason.is_failure:
            self.last_refusal = str(reason)
            log.warning("broker %s refused %s: %s", self.url.redacted(), self.client_id, reason)
            return
        self.counters.connects += 1
        self.last_refusal = None
        # Clean sessions forget subscriptions (MQTT 3.1.1 section 3.1.2.4): send them all again.
        with self._state_lock:
            self._connected.set()
            filters = [(s.topic_filter, s.qos) for s in self._subscriptions.values()]
        if filters:
            self._send_subscribe(filters, timeout_s=None, restore_attempt=0)
        if self._birth is not None:
            birth = _resolve(self._birth)
            with self._paho_lock:
                client.publish(birth.topic, birth.payload, qos=birth.qos, retain=birth.retain)
        # The broker holds this connection's will already; prepare a fresh one for the next, so
        # a consumer deduplicating by message id does not take the next offline for a redelivery.
        self._arm_will(client)
        self._notify(True)

    def _on_disconnect(self, _c: paho.Client, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        if was_connected:
            self.counters.disconnects += 1
            log.info("disconnected %s from %s: %s", self.client_id, self.url.redacted(), reason)
            self._notify(False)
        self._next_broker(_c)

    def _on_connect_fail(self, client: paho.Client, _u: Any) -> None:
        self._next_broker(client)

    def _next_broker(self, client: paho.Client) -> None:
        """Aim paho's next reconnect at the next node; its backoff still paces the attempts."""
        if len(self.urls) < 2 or self._paho is not client:
            return  # one broker, or a stopped client
        self._url_index = (self._url_index + 1) % len(self.urls)
        if isinstance(client, BufferedClient):
            client.retarget(self.url.host, self.url.port)

    def _on_subscribe(self, _c: paho.Client, _u: Any, mid: int, reasons: list[ReasonCode], _p: Any) -> None:
        granted = [None if r.is_failure else int(r.value) for r in reasons]
        self.counters.subscribe_failures += sum(1 for g in granted if g is None)
        with self._state_lock:
            waiter = self._suback_waiters.pop(mid, None)
            if waiter is None:
                if len(self._early_subacks) > 256:  # only waiters that timed out leave these behind
                    self._early_subacks.clear()
                self._early_subacks[mid] = granted
                return
        waiter.granted.extend(granted)
        waiter.done.set()
        self._retry_refused(waiter)

    def _retry_refused(self, waiter: _SubackWaiter) -> None:
        """A broker may refuse a subscription it cannot set up yet (NATS, while JetStream elects
        its leaders, cannot create the consumer behind a QoS 1 subscription): the subscriptions
        restored after a connect are asked for again, with backoff, until granted."""
        if waiter.restore_attempt is None:
            return
        refused = [f for f, granted in zip(waiter.filters, waiter.granted, strict=False) if granted is None]
        if not refused:
            return
        attempt = waiter.restore_attempt
        delay = min(max(self._reconnect_delays[0], 1) * 2**attempt, self._reconnect_delays[1])
        log.warning("%s refused %d subscription(s) of %s; asking again in %ds", self.url.redacted(),
                    len(refused), self.client_id, delay)  # fmt: skip
        timer = threading.Timer(delay, self._resubscribe, args=(self._paho, refused, attempt + 1))
        timer.daemon = True
        timer.start()

    def _resubscribe(self, client: paho.Client | None, filters: list[tuple[str, int]], attempt: int) -> None:
        if self._paho is not client or client is None or not self.connected:
            return  # stopped, or disconnected: the next connect restores every subscription
        with self._state_lock:
            wanted = [(f, qos) for f, qos in filters if f in self._subscriptions]
        if wanted:
            self._send_subscribe(wanted, timeout_s=None, restore_attempt=attempt)

    def _on_message(self, _c: paho.Client, _u: Any, message: paho.MQTTMessage) -> None:
        self.counters.messages_received += 1
        try:
            topic = message.topic
        except UnicodeDecodeError:  # brokers should refuse such topics (MQTT 3.1.1 section 1.5.3)
            self.counters.handler_errors += 1
            log.warning("dropped a message whose topic is not UTF-8")
            return
        handlers = self._routes.get(topic)
        if handlers is None:
            with self._state_lock:
                handlers = [
                    h for s in self._subscriptions.values() if topic_matches(s.topic_filter, topic) for h in s.handlers
                ]
                # Matched once per topic, not per message (ADR 0004); a fleet has a few topics per
                # device, so the cache stays small (and is bounded anyway).
                if len(self._routes) >= ROUTE_CACHE_SIZE:
                    self._routes.clear()
                self._routes[topic] = handlers
        for handler in handlers:
            try:
                handler(topic, bytes(message.payload))
            except Exception:
                # A handler's bug must never kill paho's network thread.
                self.counters.handler_errors += 1
                log.exception("handler for %s failed", message.topic)

    def _notify(self, connected: bool) -> None:
        for listener in list(self._listeners):
            try:
                listener(connected)
            except Exception:
                log.exception("connection listener failed")

    # -- construction ------------------------------------------------------------------------

    def _build_paho(self, protocol: MQTTProtocolVersion) -> paho.Client:
        v5 = protocol == MQTTProtocolVersion.MQTTv5
        client = BufferedClient(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=protocol,
            clean_session=None if v5 else not self._persistent,
        )
        if self.url.username is not None:
            client.username_pw_set(self.url.username, self.url.password)
        if self.url.tls:
            client.tls_set_context(self._tls_context or ssl.create_default_context())
        # The will must be in the CONNECT packet (MQTT 3.1.1 section 3.1.2.5): set it first.
        self._arm_will(client)
        client.reconnect_delay_set(*self._reconnect_delays)
        # No cap on QoS 1 messages in flight: publish_many pipelines a whole batch, and with a cap
        # paho scans every message it holds on each PUBACK, quadratic in the batch (ADR 0004).
        # The broker's own receive maximum still applies on its side.
        client.max_inflight_messages_set(0)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_connect_fail = self._on_connect_fail
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_read_burst = self._read_burst
        return client

    def _read_burst(self) -> None:
        for hook in self._burst_hooks:
            hook()

    def _arm_will(self, client: paho.Client) -> None:
        """Set the will for the next CONNECT; a callable gives each connection a fresh message id."""
        if self._will is not None:
            will = _resolve(self._will)
            client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)

    def _session_args(self) -> dict[str, Any]:
        if not self._persistent or self.protocol != MQTTProtocolVersion.MQTTv5:
            return {}
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 7 * 24 * 3600
        return {"clean_start": False, "properties": props}

    def _choose_protocol(self, timeout_s: float) -> MQTTProtocolVersion:
        if self.requested_protocol == "5":
            return MQTTProtocolVersion.MQTTv5
        if self.requested_protocol == "3.1.1":
            return MQTTProtocolVersion.MQTTv311
        from shared.mqtt.probe import broker_speaks_v5

        return (
            MQTTProtocolVersion.MQTTv5
            if broker_speaks_v5(self.url, timeout_s=min(timeout_s, 5.0), tls_context=self._tls_context)
            else MQTTProtocolVersion.MQTTv311
        )

    def _require_client(self) -> paho.Client:
        client = self._paho
        if client is None:
            raise MqttPublishError("the MQTT client is not started")
        return client


def _resolve(message: Outgoing | Callable[[], Outgoing]) -> Outgoing:
    return message() if callable(message) else message


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT 3.1.1 section 4.7 filter matching, as paho.topic_matches_sub decides it.

    paho builds a matcher tree on every call, too slow for the control plane's network thread (ADR 0004).
    """
    if topic_filter.startswith("$share/"):
        # A shared subscription (MQTT 5 section 4.8.2; Mosquitto and EMQX take it over 3.1.1 too)
        # delivers messages under their own topic: match the filter after "$share/<group>/".
        topic_filter = topic_filter.split("/", 2)[2] if topic_filter.count("/") >= 2 else ""
    if topic_filter == topic:
        return True
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False  # wildcards at the first level never match $SYS-style topics (4.7.2)
    levels = topic.split("/")
    parts = topic_filter.split("/")
    for i, part in enumerate(parts):
        if part == "#":
            return True  # also matches the parent level: "a/#" matches "a" (4.7.1.2)
        if i >= len(levels) or (part != "+" and part != levels[i]):
            return False
    return len(parts) == len(levels)
