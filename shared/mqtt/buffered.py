"""A paho client that reads and writes its socket in large chunks.

Reads: paho reads one packet in three or more recv() calls of a few bytes each, and handles a
single packet per select() wake-up unless many of its own messages are in flight. Here recv()
takes up to 64 KiB, paho's small reads are served from that buffer, and loop_read() goes on while
buffered bytes remain, so one wake-up handles a burst.

Writes: paho sends every queued packet with its own send() call, and every packet queued (a
PUBACK for each message received, too) also writes a byte to its wake-up socket pair. Here the
network thread joins the queued packets into one send() of up to 64 KiB, and a packet queued on
the network thread itself wakes nothing: that thread looks at the queue before its next select().
A packet queued from another thread wakes the network thread only if no wake-up is pending since
it last took from the queue, so a burst of publish() calls costs one wake-up byte, not one each:
each send() on the socket pair released the GIL, and the publishing thread then waited its turn
behind the network threads once per message (ADR 0004).

PUBACKs of MQTT 3.1.1 are read without building paho's MQTT 5 reason code and properties objects.

The overridden methods are paho 2.x internals (the version is pinned to 2.x in pyproject.toml);
behaviour on the wire is unchanged: the same bytes in the same order.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable
from typing import Any, Literal

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

READ_CHUNK = 65536
WRITE_CHUNK = 65536
# What an MQTT 3.1.1 PUBACK carries implicitly, built once: paho hands them to on_publish only.
_PUBACK_SUCCESS = ReasonCode(PacketTypes.PUBACK)
_NO_PROPERTIES = Properties(PacketTypes.PUBACK)


class BufferedClient(paho.Client):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._rbuf = b""
        self._rpos = 0
        # A wake-up byte was sent and the network thread has not taken from the queue since.
        self._wake_pending = False
        self.on_read_burst: Callable[[], None] | None = None  # after each burst of packets read

    def retarget(self, host: str, port: int) -> None:
        """Connect to `host:port` from the next reconnect on. paho's `host` setter refuses while
        its state is not closed, which it is not between a lost connection and the reconnect."""
        self._host = host
        self._port = port

    # -- reading -----------------------------------------------------------------------------

    def _sock_recv(self, bufsize: int) -> bytes:
        if self._rpos >= len(self._rbuf):
            data = super()._sock_recv(READ_CHUNK)  # raises BlockingIOError etc. as paho expects
            if len(data) <= bufsize:
                self._rbuf, self._rpos = b"", 0
                return data  # b"" tells paho the connection closed
            self._rbuf, self._rpos = data, 0
        start = self._rpos
        self._rpos = min(start + bufsize, len(self._rbuf))
        return self._rbuf[start : self._rpos]

    def loop_read(self, max_packets: int = 1) -> MQTTErrorCode:
        rc = super().loop_read(max_packets)
        while rc == MQTTErrorCode.MQTT_ERR_SUCCESS and self._sock is not None and self._rpos < len(self._rbuf):
            rc = super().loop_read(max_packets)
        if self.on_read_burst is not None:
            # After the burst's messages were handed over, before their PUBACKs (queued while they
            # were read) leave: the network thread writes only once loop_read has returned.
            self.on_read_burst()
        return rc

    def _sock_close(self) -> None:
        self._rbuf, self._rpos = b"", 0  # bytes of a closed connection must not reach the next one
        super()._sock_close()

    def _handle_on_message(self, message: paho.MQTTMessage) -> None:
        # Without per-topic callbacks (message_callback_add, which MqttClient never uses) paho
        # would still walk its matcher tree for every message before calling on_message.
        if self._on_message_filtered._root._children:
            return super()._handle_on_message(message)
        on_message = self.on_message
        if on_message is not None:
            with self._in_callback_mutex:
                on_message(self, self._userdata, message)

    def _handle_pubackcomp(self, cmd: Literal["PUBACK", "PUBCOMP"]) -> MQTTErrorCode:
        # An MQTT 3.1.1 PUBACK is its packet id and nothing else (section 3.4); paho 2.x decodes it
        # into a fresh ReasonCode and Properties object all the same (ADR 0004).
        packet = self._in_packet["packet"]
        if cmd != "PUBACK" or self._protocol == paho.MQTTv5 or len(packet) != 2:
            return super()._handle_pubackcomp(cmd)  # MQTT 5, QoS 2, or a malformed packet paho reports
        (mid,) = struct.unpack("!H", packet)
        with self._out_message_mutex:
            if mid in self._out_messages:
                return self._do_on_publish(mid, _PUBACK_SUCCESS, _NO_PROPERTIES)
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    # -- writing -----------------------------------------------------------------------------

    def _packet_queue(
        self, command: int, packet: bytes | bytearray, mid: int, qos: int, info: paho.MQTTMessageInfo | None = None
    ) -> MQTTErrorCode:
        if self._thread is None:
            return super()._packet_queue(command, packet, mid, qos, info)  # no network thread: paho writes now
        self._out_packet.append(
            {"command": command, "mid": mid, "qos": qos, "pos": 0, "to_process": len(packet), "packet": packet,
             "info": info}
        )  # fmt: skip
        # On the network thread, its loop sees the queue (want_write) before it selects again.
        # From another thread, one byte wakes it; more would only repeat the same wake-up. The
        # flag is cleared before the network thread drains the queue (`_packet_write`), so a
        # packet appended after that drain always sends a byte of its own.
        if threading.get_ident() != self._thread.ident and not self._wake_pending and self._sockpairW is not None:
            self._wake_pending = True
            try:
                self._sockpairW.send(b"0")
            except BlockingIOError:
                pass  # the socket pair is full of wake-ups already
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _packet_write(self) -> MQTTErrorCode:
        """Send runs of queued packets one send() each; paho's own loop handles the rest."""
        self._wake_pending = False  # before taking from the queue: see _packet_queue
        while self._out_packet:
            run = self._take_plain_run()
            if not run:
                # A QoS 0 PUBLISH or a DISCONNECT leads: paho's per-packet path does what follows its send.
                return super()._packet_write()
            try:
                written = self._sock_send(b"".join(p["packet"][p["pos"] :] for p in run))
            except (AttributeError, ValueError):
                self._out_packet.extendleft(reversed(run))
                return MQTTErrorCode.MQTT_ERR_SUCCESS
            except BlockingIOError:
                self._out_packet.extendleft(reversed(run))
                return MQTTErrorCode.MQTT_ERR_AGAIN
            except OSError:
                self._out_packet.extendleft(reversed(run))
                return MQTTErrorCode.MQTT_ERR_CONN_LOST
            unsent = _advance(run, written)
            with self._msgtime_mutex:
                self._last_msg_out = paho.time_func()
            if unsent:
                self._out_packet.extendleft(reversed(unsent))
                return MQTTErrorCode.MQTT_ERR_AGAIN
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _take_plain_run(self) -> list[Any]:
        """Packets from the head of the queue that need nothing done once sent, up to WRITE_CHUNK bytes."""
        run: list[Any] = []
        size = 0
        while self._out_packet and size < WRITE_CHUNK:
            head = self._out_packet[0]
            command = head["command"] & 0xF0
            if command == paho.DISCONNECT or (command == paho.PUBLISH and head["qos"] == 0):
                break
            run.append(self._out_packet.popleft())
            size += head["to_process"]
        return run


def _advance(run: list[Any], written: int) -> list[Any]:
    """Account `written` bytes against the run in order; returns the packets not wholly sent."""
    for i, packet in enumerate(run):
        if written >= packet["to_process"]:
            written -= packet["to_process"]
            packet["pos"] += packet["to_process"]
            packet["to_process"] = 0
            continue
        packet["pos"] += written
        packet["to_process"] -= written
        return run[i:]
    return []
