"""shared.mqtt.buffered: coalesced writes keep every byte in order, across partial sends and
refusals; the client routes each topic to the handlers subscribed at the time of the message."""

from __future__ import annotations

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from shared.mqtt.buffered import WRITE_CHUNK, BufferedClient
from shared.mqtt.client import Outgoing
from tests.support.mqtt import (
    SYSTEM_MOSQUITTO,
    ClientFactory,
    Collector,
    broker_url,
    clients,
    embedded_broker,
    unique_topics,
)

__all__ = ["broker_url", "clients", "embedded_broker"]  # fixtures


class ChunkySocket:
    """Takes at most `limit` bytes per send() and refuses every second call, as a full socket would."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.sent = bytearray()
        self.calls = 0
        self._refuse = False

    def send(self, data: bytes) -> int:
        self.calls += 1
        self._refuse = not self._refuse
        if not self._refuse:
            raise BlockingIOError
        taken = bytes(data[: self.limit])
        self.sent += taken
        return len(taken)

    def close(self) -> None:
        pass


def _queue(
    client: BufferedClient, command: int, packet: bytes, qos: int, info: paho.MQTTMessageInfo | None = None
) -> None:
    client._out_packet.append(
        {"command": command, "mid": 0, "qos": qos, "pos": 0, "to_process": len(packet), "packet": packet, "info": info}
    )


def test_queued_packets_go_out_whole_and_in_order_in_few_sends() -> None:
    client = BufferedClient(CallbackAPIVersion.VERSION2, client_id="t")
    sock = ChunkySocket(limit=10_000)
    client._sock = sock  # type: ignore[assignment]
    expected = bytearray()
    qos0 = paho.MQTTMessageInfo(7)
    for i in range(300):
        if i == 150:  # a QoS 0 publish is marked sent by paho's own path, between coalesced runs
            packet, command, qos, info = b"\x30\x05abcde", paho.PUBLISH, 0, qos0
        elif i % 50 == 0:
            packet, command, qos, info = bytes([0x32]) + bytes([i % 256]) * (WRITE_CHUNK + 123), paho.PUBLISH, 1, None
        else:
            packet, command, qos, info = bytes([0x40, 0x02, i // 256, i % 256]), paho.PUBACK, 0, None
        _queue(client, command, packet, qos, info)
        expected += packet
    rounds = 0
    while client._out_packet and rounds < 1000:
        rc = client._packet_write()
        assert rc in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_AGAIN)
        rounds += 1
    assert not client._out_packet
    assert bytes(sock.sent) == bytes(expected)
    assert qos0.is_published()
    # paho sends one packet per call; here a run of small packets shares one send().
    assert sock.calls < 300


def test_a_lost_connection_keeps_the_unsent_packets_queued() -> None:
    client = BufferedClient(CallbackAPIVersion.VERSION2, client_id="t")

    class Broken:
        def send(self, _data: bytes) -> int:
            raise ConnectionResetError

        def close(self) -> None:
            pass

    client._sock = Broken()  # type: ignore[assignment]
    for i in range(5):
        _queue(client, paho.PUBACK, bytes([0x40, 0x02, 0, i]), 0)
    assert client._packet_write() == MQTTErrorCode.MQTT_ERR_CONN_LOST
    assert [p["packet"][3] for p in client._out_packet] == [0, 1, 2, 3, 4]


@pytest.mark.mosquitto
def test_a_thousand_pipelined_publishes_arrive_intact_and_in_order(broker_url: str, clients: ClientFactory) -> None:
    topics = unique_topics()
    received = Collector()
    clients(broker_url).subscribe(topics.state("dev-1"), received)
    # 1,000: the system Mosquitto queues at most that many QoS 1 messages for a subscriber.
    payloads = [f"{i}:".encode() + b"x" * (i % 700) for i in range(1000)]
    publisher = clients(broker_url)
    assert publisher.publish_many([Outgoing(topics.state("dev-1"), p) for p in payloads], timeout_s=60) == 1000
    assert received.wait_for(1000) == payloads  # one topic, QoS 1, one publisher: the order is kept


def test_a_handler_subscribed_later_gets_the_next_message_on_a_topic_seen_before(
    broker_url: str, clients: ClientFactory
) -> None:
    topics = unique_topics()
    first, second = Collector(), Collector()
    subscriber = clients(broker_url)
    subscriber.subscribe(topics.all_devices("state"), first)
    publisher = clients(broker_url)
    publisher.publish(topics.state("dev-1"), b"one")
    assert first.wait_for(1) == [b"one"]
    subscriber.subscribe(topics.all_devices("state"), second)  # a second handler on the same filter
    publisher.publish(topics.state("dev-1"), b"two")
    assert second.wait_for(1) == [b"two"]
    assert first.wait_for(2) == [b"one", b"two"]
    subscriber.unsubscribe(topics.all_devices("state"))
    subscriber.subscribe(topics.state("dev-1"), second)
    publisher.publish(topics.state("dev-1"), b"three")
    assert second.wait_for(2) == [b"two", b"three"]
    assert first.payloads() == [b"one", b"two"]  # unsubscribed handlers hear nothing more


class CountingSocket:
    """Counts the wake-up bytes sent on paho's socket pair (and passes them on)."""

    def __init__(self, sock: object) -> None:
        self._sock = sock
        self.sends = 0

    def send(self, data: bytes) -> int:
        self.sends += 1
        return self._sock.send(data)  # type: ignore[attr-defined,no-any-return]

    def __getattr__(self, name: str) -> object:
        return getattr(self._sock, name)


@pytest.mark.mosquitto
def test_a_burst_of_publishes_wakes_the_network_thread_once_not_per_message(
    broker_url: str, clients: ClientFactory
) -> None:
    topics = unique_topics()
    received = Collector()
    clients(broker_url).subscribe(topics.state("dev-1"), received)
    publisher = clients(broker_url)
    paho_client = publisher._require_client()
    wakeups = CountingSocket(paho_client._sockpairW)
    paho_client._sockpairW = wakeups  # type: ignore[assignment]
    payloads = [f"{i}".encode() for i in range(1000)]
    assert publisher.publish_many([Outgoing(topics.state("dev-1"), p) for p in payloads], timeout_s=60) == 1000
    assert received.wait_for(1000) == payloads
    # paho wrote one byte per publish(); a burst now wakes the thread again only after it drained.
    assert wakeups.sends < 100
    # Each lone publish after a drain must wake the thread itself: one waiting for select()'s
    # 1 s timeout instead would make these 20 round trips take 20 s.
    before = wakeups.sends
    for i in range(20):
        publisher.publish(topics.state("dev-1"), f"lone {i}".encode(), timeout_s=0.5)
    assert wakeups.sends - before == 20
    assert received.wait_for(1020)[-1] == b"lone 19"


@pytest.mark.mosquitto
def test_mqtt_3_1_1_pubacks_complete_publishes_without_paho_decoding_them(
    clients: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    from paho.mqtt import _packet

    topics = unique_topics()
    decoded: list[int] = []
    real_decode = _packet.decode_puback

    def decode_puback(*args: object) -> object:
        decoded.append(1)
        return real_decode(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(_packet, "decode_puback", decode_puback)
    messages = [Outgoing(topics.state(f"dev-{i}"), b"x") for i in range(50)]
    assert clients(SYSTEM_MOSQUITTO).publish_many(messages, timeout_s=30) == 50  # every PUBACK matched
    assert decoded == []
    # MQTT 5 PUBACKs may carry a reason code and properties: paho decodes those as it always did.
    assert clients(SYSTEM_MOSQUITTO, protocol="5").publish_many(messages, timeout_s=30) == 50
    assert len(decoded) == 50


def test_a_puback_for_no_message_in_flight_is_ignored_and_a_malformed_one_is_refused() -> None:
    client = BufferedClient(CallbackAPIVersion.VERSION2, client_id="t", protocol=paho.MQTTv311)
    client._in_packet["packet"] = b"\x00\x07"  # nothing was published with packet id 7
    assert client._handle_pubackcomp("PUBACK") == MQTTErrorCode.MQTT_ERR_SUCCESS
    client._in_packet["packet"] = b"\x00\x07\x00"  # a 3.1.1 PUBACK is exactly two bytes
    with pytest.raises(paho.MalformedPacket):  # type: ignore[attr-defined]
        client._handle_pubackcomp("PUBACK")
