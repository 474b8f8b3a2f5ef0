"""The MQTT channel used by both the edge agent and the control plane.

Imports only `shared/` and third-party libraries, never `edge_agent/` or `control_plane/`.

    client.MqttClient               one paho client: will, birth, resubscribe, acked publishes
    device.DeviceChannel            the agent's side: desired in; state, events, telemetry out
    control.DesiredStatePublisher   the control plane's retained desired states
    subscriber.DeviceMessageSubscriber  the control plane's batched, typed, deduplicated ingest
    spool.MessageSpool / outbox.SpooledPublisher  telemetry that outlives a broker outage
    broker.EmbeddedBroker           amqtt in a thread (imported on its own: it pulls in amqtt)
    credentials                     Mosquitto password file + SIGHUP; in-memory for the embedded broker
    testing.MosquittoProcess        a private Mosquitto with the ACL, for tests and benchmarks

Consumers that must not lose device messages while they restart use a stable client id with
`persistent_session=True`: the broker then queues QoS 1 messages for them (amqtt only for
clients that authenticated).
"""

from shared.mqtt.client import ClientCounters, Handler, MqttClient, Outgoing, SubscribeResult, loop_handler
from shared.mqtt.dedup import RecentIds
from shared.mqtt.errors import (
    BrokerURLError,
    CredentialSyncError,
    MqttConnectError,
    MqttError,
    MqttPublishError,
    SpoolError,
)
from shared.mqtt.url import BrokerURL, parse_broker_url

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
