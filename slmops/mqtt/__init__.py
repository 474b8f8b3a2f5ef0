"""The MQTT channel used by both the edge agent and the control plane.

Imports only `shared/` and third-party libraries, never `edge_agent/` or `control_plane/`.
"""

from slmops.mqtt.client import ClientCounters, Handler, MqttClient, Outgoing, SubscribeResult, loop_handler
from slmops.mqtt.dedup import RecentIds
from slmops.mqtt.errors import (
    BrokerURLError,
    CredentialSyncError,
    MqttConnectError,
    MqttError,
    MqttPublishError,
    SpoolError,
)
from slmops.mqtt.url import BrokerURL, parse_broker_url

__all__ = [
    "BrokerURL",
    "BrokerURLError",
    "ClientCounters",
    "CredentialSyncError",
    "Handler",
    "MqttClient",
    "MqttConnectError",
    "MqttError",
    "MqttPublishError",
    "Outgoing",
    "RecentIds",
    "SpoolError",
    "SubscribeResult",
    "loop_handler",
    "parse_broker_url",
]
