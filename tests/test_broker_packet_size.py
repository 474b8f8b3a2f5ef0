"""The embedded broker (inside the control-plane process) refuses an MQTT packet over 1 MiB, as the
shipped Mosquitto config's max_packet_size does, before it reads the packet's body."""

from __future__ import annotations

import socket
import tracemalloc
from collections.abc import Iterator

import pytest

from control_plane.fleet.broker import EmbeddedBroker
from control_plane.fleet.credentials import InMemoryCredentials
from control_plane.fleet.mosquitto_config import CONTROL_PLANE_USER
from shared.net import free_port
from tests.support.mqtt import WAIT_S, ClientFactory, Collector, clients, unique_topics

__all__ = ["clients"]  # fixture

MIB = 1024 * 1024
CLAIMED = 200 * MIB  # what the packet's remaining length says
SENT = 16 * MIB  # what the test streams of it


def _remaining_length(n: int) -> bytes:
    """MQTT 3.1.1 section 2.2.3: seven bits a byte, the high bit saying another byte follows."""
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(value: bytes) -> bytes:
    return len(value).to_bytes(2, "big") + value


def _connect_packet(client_id: bytes, username: bytes, password: bytes) -> bytes:
    body = _string(b"MQTT") + bytes([4, 0xC2]) + (60).to_bytes(2, "big")  # v3.1.1, user+password, clean
    body += _string(client_id) + _string(username) + _string(password)
    return bytes([0x10]) + _remaining_length(len(body)) + body


def _stream_until_closed(sock: socket.socket, head: bytes) -> bool:
    """Send `head`, then up to SENT bytes of body; True once the broker closed the connection."""
    chunk = b"\0" * MIB
    try:
        sock.sendall(head)
        for _ in range(SENT // MIB):
            sock.sendall(chunk)
        return sock.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


TOPICS = unique_topics()


@pytest.fixture
def broker() -> Iterator[EmbeddedBroker]:
    credentials = InMemoryCredentials(admins={CONTROL_PLANE_USER: "cp-secret"})
    credentials.add_device("dev-a", "secret-a")
    started = EmbeddedBroker(
        port=free_port(), auth=credentials.check, topics=TOPICS, admin_users=frozenset({CONTROL_PLANE_USER})
    )
    started.start()
    yield started
    started.stop()


def test_an_oversized_publish_closes_the_connection_unread(broker: EmbeddedBroker) -> None:
    tracemalloc.start()
    try:
        with socket.create_connection(("127.0.0.1", broker.port), timeout=WAIT_S) as sock:
            sock.sendall(_connect_packet(b"dev-a", b"dev-a", b"secret-a"))
            assert sock.recv(4) == b"\x20\x02\x00\x00"  # CONNACK, accepted
            closed = _stream_until_closed(sock, bytes([0x30]) + _remaining_length(CLAIMED))  # PUBLISH, QoS 0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Closed, and nothing near the size of what was sent was ever held.
    assert (closed, peak < 4 * MIB) == (True, True), f"peak {peak} bytes"


def test_a_packet_under_the_cap_is_delivered(broker: EmbeddedBroker, clients: ClientFactory) -> None:
    topics = TOPICS
    url = f"127.0.0.1:{broker.port}"
    seen = Collector()
    control_plane = clients(f"mqtt://{CONTROL_PLANE_USER}:cp-secret@{url}")
    control_plane.subscribe(topics.all_device_messages(), seen)
    device = clients(f"mqtt://dev-a:secret-a@{url}", client_id="dev-a")
    payload = b"x" * (MIB - 1024)
    device.publish(topics.telemetry("dev-a"), payload)
    assert seen.wait_for(1) == [payload]
