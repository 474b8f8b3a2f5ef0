"""The root of every error `shared` raises: `except SharedError` catches any of them. Errors whose
callers catch ValueError keep it as a second base.

Error tree::

    SharedError
    ├── MessageDecodeError      (ValueError) a payload that cannot become a typed message
    ├── CanonicalJSONError      (ValueError) a value with no single canonical JSON encoding
    ├── ReleaseRefused          signed metadata, or what a desired state asks under it, failed a check
    ├── GGUFHeaderError         (ValueError) not a well-formed GGUF within the reader's limits
    ├── BundleError             (ValueError) not a well-formed ONNX model with external data
    └── MqttError               the MQTT transport (shared/mqtt/errors.py draws its subtree)
        ├── BrokerURLError      (ValueError) a broker URL that is not mqtt:// or mqtts:// with a host
        ├── MqttConnectError    no connection within the timeout, or the broker refused it
        ├── MqttPublishError    no PUBACK within the timeout, or paho refused the message
        ├── SpoolError          the agent's on-disk telemetry spool cannot be used
        ├── CredentialSyncError the broker's credentials could not be written or reloaded
        └── UnstorableBatch     a batch handler's refusal no retry can fix
"""

from __future__ import annotations


class SharedError(Exception):
    """Base of every error from the `shared` package."""
