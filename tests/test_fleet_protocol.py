"""The control plane's own MQTT connections speak the configured version (3.1.1 by default)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pydantic
import pytest
import sqlalchemy as sa
from paho.mqtt.enums import MQTTProtocolVersion

from control_plane.config import Settings
from control_plane.fleet import FleetRuntime
from tests.mqtt_support import SYSTEM_MOSQUITTO


def _settings(tmp_path: Path, db_url: str, **extra: object) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        database_url=db_url,
        mqtt_url=SYSTEM_MOSQUITTO,
        mqtt_topic_prefix=f"slmops-test/{uuid.uuid4().hex[:10]}",
        mqtt_client_id=f"cp-{uuid.uuid4().hex[:8]}",
        **extra,  # type: ignore[arg-type]
    )


@pytest.mark.mosquitto
@pytest.mark.parametrize(
    ("setting", "expected"),
    [(None, MQTTProtocolVersion.MQTTv311), ("5", MQTTProtocolVersion.MQTTv5), ("auto", MQTTProtocolVersion.MQTTv5)],
)
def test_connections_use_the_configured_protocol(
    tmp_path: Path, db_url: str, engine: sa.Engine, setting: str | None, expected: MQTTProtocolVersion
) -> None:
    extra = {} if setting is None else {"mqtt_protocol": setting}
    runtime = FleetRuntime(_settings(tmp_path, db_url, **extra), engine)
    runtime.start()
    try:
        assert runtime.client is not None and runtime.publisher is not None
        assert (runtime.client.protocol, runtime.publisher.protocol) == (expected, expected)
        assert runtime.client.connected and runtime.publisher.connected
    finally:
        runtime.stop()


def test_an_unknown_protocol_is_refused(tmp_path: Path, db_url: str) -> None:
    with pytest.raises(pydantic.ValidationError, match="mqtt_protocol"):
        _settings(tmp_path, db_url, mqtt_protocol="4")
