"""The control plane's outgoing side: desired states, retained, QoS 1, acknowledged by the broker.

Retained (MQTT 3.1.1 section 3.3.1.3) so a device that is offline now receives its latest desired
state when it connects; an empty retained payload clears it.
"""

from __future__ import annotations

from collections.abc import Mapping

from shared.desired import DesiredState
from shared.messages import encode
from shared.mqtt.client import MqttClient
from shared.mqtt.types import Outgoing
from shared.topics import Topics


class DesiredStatePublisher:
    def __init__(self, client: MqttClient, topics: Topics | None = None) -> None:
        self.client = client
        self.topics = topics or Topics()

    def publish(self, device_id: str, desired: DesiredState, *, timeout_s: float = 10.0) -> None:
        """Returns once the broker has acknowledged (and so retained) the message."""
        self.client.publish(self.topics.desired(device_id), encode(desired), qos=1, retain=True, timeout_s=timeout_s)

    def publish_many(self, desired_by_device: Mapping[str, DesiredState], *, timeout_s: float = 60.0) -> int:
        """Pipelined: all published, then every PUBACK awaited; far faster than one by one."""
        return self.client.publish_many(
            [
                Outgoing(self.topics.desired(device_id), encode(desired), qos=1, retain=True)
                for device_id, desired in desired_by_device.items()
            ],
            timeout_s=timeout_s,
        )

    def clear(self, device_id: str, *, timeout_s: float = 10.0) -> None:
        """Remove the retained desired state (for example when the device is deleted)."""
        self.client.publish(self.topics.desired(device_id), b"", qos=1, retain=True, timeout_s=timeout_s)
