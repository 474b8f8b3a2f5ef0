"""A paho client that reads its socket in large chunks and handles every whole packet it has.

paho reads one packet in three or more recv() calls of a few bytes each, and handles a single
packet per select() wake-up unless many of its own messages are in flight. For the control
plane's ingest connection, at thousands of messages a second, that was most of the network
thread's time (py-spy on benchmarks/fleet_scale.py). Here recv() takes up to 64 KiB, paho's small
reads are served from that buffer, and loop_read() goes on while buffered bytes remain, so one
wake-up handles a burst. The overridden methods are paho 2.x internals (the version is pinned
to 2.x in pyproject.toml); behaviour on the wire is unchanged.
"""

from __future__ import annotations

from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode

READ_CHUNK = 65536


class BufferedClient(paho.Client):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._rbuf = b""
        self._rpos = 0

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
        return rc

    def _sock_close(self) -> None:
        self._rbuf, self._rpos = b"", 0  # bytes of a closed connection must not reach the next one
        super()._sock_close()
