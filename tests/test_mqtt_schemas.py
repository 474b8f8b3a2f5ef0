"""Topic layout and message envelopes: pure functions, no broker."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from amqtt.contexts import Action

from control_plane.fleet.broker_plugins import TopicPolicy
from shared.desired import ArtifactRef, DesiredState
from shared.hardware import HardwareProfile
from shared.messages import (
    EventMessage,
    MessageDecodeError,
    StateMessage,
    StatusMessage,
    TelemetryMessage,
    decode,
    encode,
    message_id_of,
)
from shared.mqtt.url import BrokerURLError, parse_broker_url
from shared.state import DeviceState
from shared.telemetry import TelemetryWindow
from shared.topics import ParsedTopic, TopicKind, Topics

SHA = "ab" * 32


def test_topics_build_and_parse_round_trip() -> None:
    topics = Topics("acme/slmops/v1/")
    assert topics.prefix == "acme/slmops/v1"
    for kind in TopicKind:
        topic = topics.device("dev-1", kind)
        assert topic == f"acme/slmops/v1/devices/dev-1/{kind.value}"
        assert topics.parse(topic) == ParsedTopic("dev-1", kind)


@pytest.mark.parametrize(
    "topic",
    [
        "slmops/v1/devices/dev-1/unknown",
        "slmops/v1/devices/dev-1/state/extra",
        "slmops/v1/devices/state",
        "other/v1/devices/dev-1/state",
        "slmops/v1/devicesX/dev-1/state",
        "slmops/v1/devices/+/state",
    ],
)
def test_parse_rejects_foreign_topics(topic: str) -> None:
    assert Topics().parse(topic) is None


def test_topics_refuse_ids_and_prefixes_that_break_levels() -> None:
    with pytest.raises(ValueError):
        Topics().state("a/b")
    with pytest.raises(ValueError):
        Topics().desired("dev+")
    with pytest.raises(ValueError):
        Topics("slmops/#")


def test_control_plane_subscriptions_cover_device_kinds_but_not_desired() -> None:
    filters = Topics().control_plane_subscriptions()
    assert "slmops/v1/devices/+/state" in filters
    assert "slmops/v1/devices/+/status" in filters
    assert all(not f.endswith("/desired") for f in filters)


def test_status_and_event_round_trip_with_envelope() -> None:
    birth = StatusMessage(status="online", agent_version="0.1.0", hardware=HardwareProfile(ram_mb=512))
    decoded = decode("status", encode(birth))
    assert decoded == birth
    assert len(birth.message_id) == 32 and birth.sent_at.tzinfo is not None
    event = EventMessage(kind="download_progress", bytes_done=10, bytes_total=100, rate_bytes_per_s=5.0)
    assert decode(TopicKind.EVENTS, encode(event)) == event


def test_state_and_telemetry_wrap_colleague_schemas() -> None:
    state = StateMessage.wrap(DeviceState(device_id="d1", phase="downloading"))
    back = decode("state", encode(state))
    assert isinstance(back, DeviceState) and back.phase == "downloading"
    assert message_id_of(back) == state.message_id
    now = datetime.now(UTC)
    window = TelemetryWindow(seq=3, window_start=now, window_end=now, requests=7)
    message = TelemetryMessage.wrap(window, dropped_windows=2)
    back_t = decode("telemetry", encode(message))
    assert isinstance(back_t, TelemetryMessage) and back_t.requests == 7 and back_t.dropped_windows == 2


def test_desired_state_decodes() -> None:
    desired = DesiredState(
        message_id="m1", model="m", version="1", artifact=ArtifactRef(sha256=SHA, size_bytes=1, format="gguf")
    )
    assert decode("desired", encode(desired)) == desired


@pytest.mark.parametrize(
    ("kind", "payload", "reason"),
    [
        ("status", b"{not json", "malformed_json"),
        ("status", b"\xff\xfe", "malformed_json"),
        ("status", b"[1, 2]", "malformed_json"),
        ("status", json.dumps({"schema_version": 99, "status": "online"}).encode(), "unknown_schema_version"),
        ("status", json.dumps({"status": "sleeping"}).encode(), "invalid"),
        ("events", json.dumps({"kind": "no_such_event"}).encode(), "invalid"),
        ("telemetry", json.dumps({"seq": -1}).encode(), "invalid"),
        ("gossip", b"{}", "unknown_kind"),
    ],
)
def test_decode_raises_one_error_type_with_a_reason(kind: str, payload: bytes, reason: str) -> None:
    with pytest.raises(MessageDecodeError) as info:
        decode(kind, payload)
    assert info.value.reason == reason


def test_broker_urls() -> None:
    url = parse_broker_url("mqtts://dev%2F1:p%40ss@broker.example")
    assert (url.host, url.port, url.tls, url.username, url.password) == ("broker.example", 8883, True, "dev/1", "p@ss")
    assert "p@ss" not in url.redacted() and "p@ss" not in repr(url)
    assert parse_broker_url("mqtt://127.0.0.1").port == 1883
    for bad in ["http://x", "mqtt://", "mqtt://h:notaport"]:
        with pytest.raises(BrokerURLError):
            parse_broker_url(bad)


def test_embedded_topic_policy_mirrors_the_mosquitto_acl() -> None:
    topics = Topics()
    policy = TopicPolicy(topics, admin_users=frozenset({"cp"}))
    assert policy.allows("cp", topics.desired("d1"), Action.PUBLISH)
    assert policy.allows("cp", topics.all_device_messages(), Action.SUBSCRIBE)
    assert policy.allows("d1", topics.state("d1"), Action.PUBLISH)
    assert policy.allows("d1", topics.desired("d1"), Action.SUBSCRIBE)
    assert not policy.allows("d1", topics.desired("d1"), Action.PUBLISH)
    assert not policy.allows("d1", topics.state("d2"), Action.PUBLISH)
    assert not policy.allows("d1", topics.desired("d2"), Action.SUBSCRIBE)
    assert not policy.allows("d1", topics.all_devices("desired"), Action.SUBSCRIBE)
    assert not policy.allows("d1", "#", Action.SUBSCRIBE)
    assert not policy.allows(None, topics.state("d1"), Action.PUBLISH)
