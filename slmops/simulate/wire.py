"""A minimal MQTT 3.1.1 client on asyncio, for simulating thousands of devices in one process.

Why not paho or aiomqtt: paho's threaded loop waits on select() (no descriptor above 1,024), and
aiomqtt drives a paho client per connection with a timer task each, too slow for thousands
(docs/performance.md#fleet-paths). This protocol writes
each packet in one call and keeps no per-connection task: PUBLISH QoS 0/1, SUBSCRIBE, PUBACK,
PINGREQ, DISCONNECT, with the will, username and password of CONNECT (MQTT 3.1.1 section 3).
QoS 2 is not spoken (devices subscribe at QoS 1, so the broker never delivers QoS 2 to them).
"""

from __future__ import annotations

import asyncio
import ssl
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from slmops.errors import SlmopsError

CONNECT, CONNACK, PUBLISH, PUBACK, SUBSCRIBE, SUBACK, PINGREQ, PINGRESP, DISCONNECT = 1, 2, 3, 4, 8, 9, 12, 13, 14
OnMessage = Callable[[str, bytes], None]


class WireError(SlmopsError):
    """The connection failed, was refused or was lost."""


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


def _string(value: str | bytes) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    return struct.pack("!H", len(raw)) + raw


def _packet(kind: int, flags: int, body: bytes) -> bytes:
    header, length = bytearray([(kind << 4) | flags]), len(body)
    while True:  # remaining length: 7 bits a byte, high bit "more follows" (section 2.2.3)
        byte, length = length % 128, length // 128
        header.append(byte | (0x80 if length else 0))
        if not length:
            return bytes(header) + body


def connect_packet(
    client_id: str, username: str | None, password: str | None, will: Will | None, keepalive: int
) -> bytes:
    flags = 0x02  # clean session
    payload = _string(client_id)
    if will is not None:
        flags |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0)
        payload += _string(will.topic) + _string(will.payload)
    if username is not None:
        flags |= 0x80
        payload += _string(username)
    if password is not None:
        flags |= 0x40
        payload += _string(password)
    return _packet(CONNECT, 0, _string("MQTT") + bytes([4, flags]) + struct.pack("!H", keepalive) + payload)


class MqttWire(asyncio.Protocol):
    """One connection. `await open(...)`, then `publish`, `subscribe`, `close`; `closed` ends with it."""

    def __init__(self, on_message: OnMessage, keepalive: int = 60) -> None:
        self.on_message = on_message
        self.keepalive = keepalive
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._connack: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pending: dict[int, asyncio.Future[None]] = {}  # packet id -> PUBACK/SUBACK
        self._next_id = 0
        self._ping: asyncio.TimerHandle | None = None
        self._gathered: list[bytes] | None = None  # packets written while data_received runs

    @classmethod
    async def open(
        cls, host: str, port: int, client_id: str, *, on_message: OnMessage, username: str | None = None,
        password: str | None = None, will: Will | None = None, keepalive: int = 60, timeout_s: float = 60,
        tls: bool = False,
    ) -> MqttWire:  # fmt: skip
        loop = asyncio.get_running_loop()
        context = ssl.create_default_context() if tls else None  # mqtts://: the system's CAs
        try:
            _, wire = await asyncio.wait_for(
                loop.create_connection(lambda: cls(on_message, keepalive), host, port, ssl=context), timeout_s
            )
        except (OSError, TimeoutError) as exc:
            raise WireError(f"cannot connect to {host}:{port}: {exc}") from exc
        try:
            wire._write(connect_packet(client_id, username, password, will, keepalive))
            code = await asyncio.wait_for(asyncio.shield(wire._connack), timeout_s)
        except (WireError, TimeoutError) as exc:
            wire.abort()
            raise WireError(f"no CONNACK from {host}:{port}: {exc}") from exc
        if code != 0:
            wire.abort()
            raise WireError(f"connection refused by the broker (CONNACK return code {code})")
        return wire

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        self._schedule_ping()

    def connection_lost(self, exc: Exception | None) -> None:
        error = WireError(f"connection lost: {exc}" if exc else "connection closed")
        futures: list[asyncio.Future[Any]] = [self._connack, *self._pending.values()]
        for future in futures:
            if not future.done():
                future.set_exception(error)
        self._pending.clear()
        if self._ping is not None:
            self._ping.cancel()
        if not self.closed.done():
            self.closed.set_result(None)
        self._transport = None

    def data_received(self, data: bytes) -> None:
        # What handling these packets writes (PUBACKs, the states they lead to) goes out in one
        # write at the end, not a send() per packet (docs/performance.md#fleet-paths).
        self._gathered = []
        try:
            self._buffer += data
            while (packet := self._take_packet()) is not None:
                self._handle(*packet)
        finally:
            gathered, self._gathered = self._gathered, None
            if gathered and self._transport is not None and not self._transport.is_closing():
                self._transport.write(b"".join(gathered))

    def _take_packet(self) -> tuple[int, int, bytes] | None:
        buf, multiplier, length, i = self._buffer, 1, 0, 1
        while True:
            if i >= len(buf):
                return None
            byte = buf[i]
            length += (byte & 0x7F) * multiplier
            multiplier *= 128
            i += 1
            if not byte & 0x80:
                break
        if len(buf) < i + length:
            return None
        first, body = buf[0], bytes(buf[i : i + length])
        del buf[: i + length]
        return first >> 4, first & 0x0F, body

    def _handle(self, kind: int, flags: int, body: bytes) -> None:
        if kind == PUBLISH:
            qos = (flags >> 1) & 0x03
            (topic_len,) = struct.unpack_from("!H", body)
            topic, rest = body[2 : 2 + topic_len].decode(), body[2 + topic_len :]
            if qos:
                self._write(_packet(PUBACK, 0, rest[:2]))
                rest = rest[2:]
            self.on_message(topic, rest)
        elif kind == CONNACK:
            if not self._connack.done():
                self._connack.set_result(body[1])
        elif kind in (PUBACK, SUBACK):
            (packet_id,) = struct.unpack_from("!H", body)
            future = self._pending.pop(packet_id, None)
            if future is not None and not future.done():
                if kind == SUBACK and body[2] == 0x80:
                    future.set_exception(WireError("subscription refused"))
                else:
                    future.set_result(None)

    def _write(self, packet: bytes) -> None:
        if self._transport is None or self._transport.is_closing():
            raise WireError("not connected")
        if self._gathered is not None:
            self._gathered.append(packet)
        else:
            self._transport.write(packet)

    def _schedule_ping(self) -> None:
        # A PINGREQ every half keepalive whatever else is sent: simpler and cheaper than moving a
        # timer on every write, and well inside the broker's 1.5 x keepalive (section 3.1.2.10).
        if self.keepalive:
            self._ping = asyncio.get_running_loop().call_later(self.keepalive / 2, self._send_ping)

    def _send_ping(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._write(_packet(PINGREQ, 0, b""))
            self._schedule_ping()

    def _packet_id(self) -> int:
        self._next_id = self._next_id % 65535 + 1
        return self._next_id

    def publish_nowait(self, topic: str, payload: bytes, *, qos: int = 0, retain: bool = False) -> asyncio.Future[None]:
        """Write a PUBLISH now; the future completes at the PUBACK (at once for QoS 0)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        flags = (qos << 1) | (1 if retain else 0)
        if qos:
            packet_id = self._packet_id()
            self._pending[packet_id] = future
            self._write(_packet(PUBLISH, flags, _string(topic) + struct.pack("!H", packet_id) + payload))
        else:
            self._write(_packet(PUBLISH, flags, _string(topic) + payload))
            future.set_result(None)
        return future

    async def publish(self, topic: str, payload: bytes, *, qos: int = 0, retain: bool = False) -> None:
        await self.publish_nowait(topic, payload, qos=qos, retain=retain)

    async def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        packet_id = self._packet_id()
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending[packet_id] = future
        self._write(_packet(SUBSCRIBE, 0x02, struct.pack("!H", packet_id) + _string(topic_filter) + bytes([qos])))
        await future

    async def close(self) -> None:
        """Send DISCONNECT (the broker then discards the will) and close."""
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(_packet(DISCONNECT, 0, b""))
            self._transport.close()
        await self.closed

    def abort(self) -> None:
        """Drop the connection without DISCONNECT: the broker publishes the will."""
        if self._transport is not None:
            self._transport.abort()
