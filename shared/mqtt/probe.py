"""Find out whether a broker speaks MQTT v5 (Mosquitto 2 does; the embedded amqtt 0.12 does not)."""

from __future__ import annotations

import logging
import ssl
import time
import uuid
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.reasoncodes import ReasonCode

from shared.mqtt.url import BrokerURL

log = logging.getLogger(__name__)


def broker_speaks_v5(url: BrokerURL, *, timeout_s: float = 5.0, tls_context: ssl.SSLContext | None = None) -> bool:
    """Connect once with MQTT v5 and report whether the broker accepted it.

    A v3.1.1-only broker answers a v5 CONNECT with return code 0x01 (unacceptable protocol
    version, MQTT 3.1.1 section 3.2.2.3) or closes the socket; either way this returns False,
    and so does an unreachable broker (the caller then falls back to 3.1.1).
    """
    outcome: dict[str, bool] = {}

    def on_connect(_c: paho.Client, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        outcome["v5"] = not reason.is_failure

    def on_disconnect(_c: paho.Client, _u: Any, _f: Any, _r: ReasonCode, _p: Any) -> None:
        outcome.setdefault("v5", False)

    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"slmops-probe-{uuid.uuid4().hex[:12]}",
        protocol=MQTTProtocolVersion.MQTTv5,
    )
    client.reconnect_delay_set(60, 60)  # one attempt only
    if url.username is not None:
        client.username_pw_set(url.username, url.password)
    if url.tls:
        client.tls_set_context(tls_context or ssl.create_default_context())
    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    try:
        client.connect(url.host, url.port, keepalive=10)
    except (OSError, ValueError) as exc:
        log.info("protocol probe of %s failed (%s); using MQTT 3.1.1", url.redacted(), exc)
        return False
    deadline = time.monotonic() + timeout_s
    try:
        while "v5" not in outcome and time.monotonic() < deadline:
            if client.loop(timeout=0.1) != paho.MQTT_ERR_SUCCESS:
                break
    finally:
        client.disconnect()
    return outcome.get("v5", False)
