"""Errors raised by the MQTT channel (a subtree of `shared.errors.SharedError`).

MqttError
├── BrokerURLError        the URL is not mqtt:// or mqtts:// with a host
├── MqttConnectError      no connection within the timeout, or the broker refused it
├── MqttPublishError      no PUBACK within the timeout, or paho refused the message
├── SpoolError            the on-disk telemetry spool cannot be used
├── CredentialSyncError   the broker's credentials could not be written or reloaded
└── UnstorableBatch       a batch handler's refusal no retry can fix (a value its store rejects)
"""

from __future__ import annotations

from shared.errors import SharedError


class MqttError(SharedError):
    """Base of every error from shared.mqtt."""


class BrokerURLError(MqttError, ValueError):
    pass


class MqttConnectError(MqttError):
    pass


class MqttPublishError(MqttError):
    pass


class SpoolError(MqttError):
    pass


class CredentialSyncError(MqttError):
    pass


class UnstorableBatch(MqttError):
    """Raised by a subscriber's batch handler: some message in the batch can never be stored, so
    the subscriber isolates it at once instead of retrying the whole batch."""
