"""Publish through the spool: sent now when connected, kept on disk when not, drained in order.

The agent uses it for telemetry: a window produced during a broker outage waits in the spool and
goes out after the reconnect, oldest first. While anything is spooled new messages queue behind
it, so the broker sees windows in the order they were produced.
"""

from __future__ import annotations

import logging
import threading

from edge_agent.mqtt.spool import MessageSpool, SpooledMessage
from shared.mqtt.client import MqttClient
from shared.mqtt.errors import MqttPublishError

log = logging.getLogger(__name__)


class SpooledPublisher:
    """`publish` never loses a message within the spool's bound; `start()` begins draining on reconnect."""

    def __init__(self, client: MqttClient, spool: MessageSpool, *, ack_timeout_s: float = 10.0) -> None:
        self.client = client
        self.spool = spool
        self._ack_timeout_s = ack_timeout_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._send_lock = threading.Lock()  # one sender at a time keeps the order
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        # The drain waits for PUBACKs, which must not happen on paho's network thread, where
        # connection listeners run: the listener only wakes this thread.
        self.client.add_connection_listener(lambda connected: self._wake.set() if connected else None)
        self._thread = threading.Thread(target=self._run, name="slmops-mqtt-outbox", daemon=True)
        self._thread.start()
        self._wake.set()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> bool:
        """True when the broker acknowledged it now; False when it was spooled for later."""
        with self._send_lock:
            if self.client.connected and len(self.spool) == 0:
                try:
                    self.client.publish(topic, payload, qos=qos, retain=retain, timeout_s=self._ack_timeout_s)
                    return True
                except MqttPublishError as exc:
                    log.info("spooling a message for %s: %s", topic, exc)
            dropped = self.spool.append(topic, payload, qos=qos, retain=retain)
        if dropped:
            log.warning("spool full: dropped the %d oldest message(s)", dropped)
        self._wake.set()
        return False

    def flush(self) -> int:
        """Send what is spooled now; returns how many went out (stops quietly when disconnected)."""
        with self._send_lock:
            try:
                return self.spool.drain(self._send)
            except MqttPublishError as exc:
                log.info("spool drain paused: %s", exc)
                return 0

    def _send(self, message: SpooledMessage) -> None:
        self.client.publish(
            message.topic,
            message.payload,
            qos=message.qos,
            retain=message.retain,
            timeout_s=self._ack_timeout_s,
        )

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait()
            self._wake.clear()
            if self._stop.is_set():
                return
            if self.client.connected and len(self.spool):
                sent = self.flush()
                if sent:
                    log.info("sent %d spooled message(s) after reconnecting", sent)
