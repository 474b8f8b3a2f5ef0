"""The paho wrapper on the real Mosquitto and on the embedded amqtt broker."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from paho.mqtt.enums import MQTTProtocolVersion

from control_plane.fleet.broker import EmbeddedBroker
from shared.messages import StatusMessage, decode, encode
from shared.mqtt.client import MqttClient, Outgoing, loop_handler
from shared.mqtt.errors import MqttConnectError, MqttPublishError
from shared.net import free_port
from tests.support.mosquitto import MosquittoProcess
from tests.support.mqtt import (
    SYSTEM_MOSQUITTO,
    ClientFactory,
    Collector,
    broker_url,
    clear_retained,
    clients,
    embedded_broker,
    private_mosquitto,
    status_will,
    unique_topics,
)
from tests.support.waiting import wait_for

__all__ = ["broker_url", "clients", "embedded_broker", "private_mosquitto"]  # fixtures


def test_round_trip_publish_waits_for_puback(broker_url: str, clients: ClientFactory) -> None:
    topics = unique_topics()
    received = Collector()
    subscriber = clients(broker_url)
    result = subscriber.subscribe(topics.all_device_messages(), received)
    assert result is not None and result.all_granted
    publisher = clients(broker_url)
    info = publisher.publish(topics.state("dev-1"), b'{"x": 1}', qos=1)
    assert info.is_published()
    assert received.wait_for(1) == [b'{"x": 1}']
    assert received.items[0][0] == topics.state("dev-1")


def test_retained_desired_reaches_a_late_subscriber(broker_url: str, clients: ClientFactory) -> None:
    topics = unique_topics()
    control_plane = clients(broker_url)
    control_plane.publish(topics.desired("dev-1"), b"v2", qos=1, retain=True)
    control_plane.publish(topics.desired("dev-2"), b"other", qos=1, retain=True)
    late = Collector()
    device = clients(broker_url)
    device.subscribe(topics.desired("dev-1"), late)
    assert late.wait_for(1) == [b"v2"]
    clear_retained(control_plane, [topics.desired("dev-1"), topics.desired("dev-2")])


def test_birth_on_connect_and_will_when_the_process_dies(broker_url: str, clients: ClientFactory) -> None:
    topics = unique_topics()
    statuses = Collector()
    observer = clients(broker_url)
    observer.subscribe(topics.status("dev-1"), statuses)
    script = textwrap.dedent(
        f"""
        import sys, time
        from shared.messages import StatusMessage, encode
        from shared.mqtt.client import MqttClient, Outgoing
        topic = {topics.status("dev-1")!r}
        will = Outgoing(topic, encode(StatusMessage(status="offline", reason="connection lost")), retain=True)
        birth = Outgoing(topic, encode(StatusMessage(status="online", agent_version="9.9")), retain=True)
        MqttClient({broker_url!r}, client_id="dying-dev-1", will=will, birth=birth).start()
        print("ready", flush=True)
        time.sleep(120)
        """
    )
    agent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert agent.stdout is not None and agent.stdout.readline().strip() == "ready"
        statuses.wait_for(1)
        agent.kill()  # SIGKILL: no DISCONNECT, so the broker must send the will
        agent.wait()
        payloads = statuses.wait_for(2)
    finally:
        agent.kill()
    decoded = [decode("status", p) for p in payloads]
    assert [m.status for m in decoded if isinstance(m, StatusMessage)] == ["online", "offline"]
    late = Collector()
    clients(broker_url).subscribe(topics.status("dev-1"), late)
    # amqtt 0.12 may deliver one retained message once per matching subscription it holds (a known
    # quirk); what matters is that a late subscriber sees only the retained will, as one message id.
    late_messages = [decode("status", p) for p in late.wait_for(1)]
    assert {m.status for m in late_messages} == {"offline"}  # type: ignore[attr-defined]
    assert len({m.message_id for m in late_messages}) == 1  # type: ignore[attr-defined]
    clear_retained(observer, [topics.status("dev-1")])


def test_clean_stop_publishes_offline_explicitly(broker_url: str, clients: ClientFactory) -> None:
    topics = unique_topics()
    will, birth = status_will(topics, "dev-1")
    statuses = Collector()
    clients(broker_url).subscribe(topics.status("dev-1"), statuses)
    device = MqttClient(broker_url, client_id="clean-dev-1", will=will, birth=birth)
    device.start()
    assert statuses.wait_for(1) == [b"online"]
    device.stop()  # a clean DISCONNECT drops the will, so stop() must send it itself
    assert statuses.wait_for(2) == [b"online", b"offline"]
    clear_retained(clients(broker_url), [topics.status("dev-1")])


def test_handler_errors_are_counted_and_do_not_stop_delivery(broker_url: str, clients: ClientFactory) -> None:
    topics = unique_topics()
    good = Collector()

    def broken(topic: str, payload: bytes) -> None:
        raise RuntimeError("bug in a handler")

    subscriber = clients(broker_url)
    subscriber.subscribe(topics.all_devices("events"), broken)
    subscriber.subscribe(topics.all_devices("events"), good)
    publisher = clients(broker_url)
    for i in range(3):
        publisher.publish(topics.events("dev-1"), f"e{i}".encode())
    assert good.wait_for(3) == [b"e0", b"e1", b"e2"]
    assert subscriber.counters.handler_errors == 3


def test_auto_protocol_picks_v5_on_mosquitto_and_311_on_amqtt(
    embedded_broker: EmbeddedBroker, clients: ClientFactory
) -> None:
    assert clients(SYSTEM_MOSQUITTO, protocol="auto").protocol == MQTTProtocolVersion.MQTTv5
    assert clients(embedded_broker.url, protocol="auto").protocol == MQTTProtocolVersion.MQTTv311


def test_v5_client_round_trip_on_mosquitto(clients: ClientFactory) -> None:
    topics = unique_topics()
    received = Collector()
    clients(SYSTEM_MOSQUITTO, protocol="5").subscribe(topics.all_devices("state"), received)
    clients(SYSTEM_MOSQUITTO, protocol="5").publish(topics.state("d"), b"v5")
    assert received.wait_for(1) == [b"v5"]


def test_start_fails_fast_on_refused_credentials(private_mosquitto: MosquittoProcess) -> None:
    private_mosquitto.start({"dev-1": "right"})
    with pytest.raises(MqttConnectError, match="refused"):
        MqttClient(private_mosquitto.url("dev-1", "wrong"), client_id="dev-1").start(timeout_s=10)


@pytest.mark.parametrize("kind", ["mosquitto", "embedded"])
def test_reconnect_restores_subscriptions_and_refuses_publishes_while_down(
    kind: str, tmp_path: Path, clients: ClientFactory
) -> None:
    topics = unique_topics()
    if kind == "mosquitto":
        broker: MosquittoProcess | EmbeddedBroker = MosquittoProcess(tmp_path / "m", topics=topics)
        broker.start()
        url = broker.admin_url
    else:
        broker = EmbeddedBroker(port=free_port())
        broker.start()
        url = broker.url
    try:
        received = Collector()
        transitions: list[bool] = []
        subscriber = clients(url, reconnect_min_delay_s=1, reconnect_max_delay_s=2)
        subscriber.add_connection_listener(transitions.append)
        subscriber.subscribe(topics.all_devices("telemetry"), received)
        broker.stop()
        wait_for(lambda: not subscriber.connected)
        with pytest.raises(MqttPublishError):
            subscriber.publish(topics.telemetry("dev-1"), b"while down")
        broker.start()
        wait_for(lambda: subscriber.connected)
        clients(url).publish(topics.telemetry("dev-1"), b"after restart")
        assert received.wait_for(1) == [b"after restart"]
        assert transitions[:2] == [False, True] and subscriber.counters.connects == 2
    finally:
        broker.stop()


async def test_async_handoff_and_publish_async(embedded_broker: EmbeddedBroker, clients: ClientFactory) -> None:
    topics = unique_topics()
    loop = asyncio.get_running_loop()
    got: asyncio.Queue[tuple[str, bytes, bool]] = asyncio.Queue()

    async def on_message(topic: str, payload: bytes) -> None:
        # Runs on the test's loop, not on paho's thread.
        await got.put((topic, payload, asyncio.get_running_loop() is loop))

    subscriber = clients(embedded_broker.url)
    subscriber.subscribe(topics.all_devices("events"), loop_handler(loop, on_message))
    publisher = clients(embedded_broker.url)
    await publisher.publish_async(topics.events("d"), encode(StatusMessage(status="online")))
    topic, payload, on_our_loop = await asyncio.wait_for(got.get(), 15)
    assert topic == topics.events("d") and on_our_loop
    assert decode("status", payload).status == "online"  # type: ignore[attr-defined]


def test_publish_many_pipelines_and_acknowledges_all(broker_url: str, clients: ClientFactory) -> None:
    topics = unique_topics()
    received = Collector()
    clients(broker_url).subscribe(topics.all_devices("desired"), received)
    batch = [Outgoing(topics.desired(f"dev-{i}"), f"v{i}".encode(), retain=True) for i in range(50)]
    publisher = clients(broker_url)
    assert publisher.publish_many(batch) == 50
    assert sorted(received.wait_for(50)) == sorted(f"v{i}".encode() for i in range(50))
    clear_retained(publisher, [m.topic for m in batch])


@pytest.mark.parametrize("kind", ["mosquitto", "embedded-with-auth"])
def test_persistent_session_keeps_messages_sent_while_away(kind: str, clients: ClientFactory) -> None:
    topics = unique_topics()
    broker = None
    if kind == "mosquitto":
        url = SYSTEM_MOSQUITTO
    else:
        # amqtt queues for an absent persistent session only when the client authenticated.
        # "cp" is an admin: only an admin may choose a client id other than its username.
        broker = EmbeddedBroker(port=free_port(), auth=lambda _user, _password: True, admin_users=frozenset({"cp"}))
        broker.start()
        url = f"mqtt://cp:secret@127.0.0.1:{broker.port}"
    try:
        client_id = f"cp-{topics.prefix.split('/')[0]}"
        away = clients(url, client_id=client_id, persistent_session=True)
        away.subscribe(topics.all_devices("telemetry"), Collector())
        away.stop(publish_offline=False)
        device = clients(url)
        for i in range(3):
            device.publish(topics.telemetry("dev-1"), f"w{i}".encode())
        back = Collector()
        returning = clients(url, client_id=client_id, persistent_session=True, start=False)
        returning.subscribe(topics.all_devices("telemetry"), back)
        returning.start()
        assert back.wait_for(3) == [b"w0", b"w1", b"w2"]
        returning.stop(publish_offline=False)
        clients(url, client_id=client_id)  # a clean-session connect discards the stored session
    finally:
        if broker is not None:
            broker.stop()
