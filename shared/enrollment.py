"""Device enrollment: a one-time enrollment token is exchanged once for a device credential.

The credential (device_id, device_secret) authenticates the device on REST (HTTP Basic) and on
MQTT (username/password).
"""

from __future__ import annotations

from datetime import datetime

from pydantic import Field

from shared.base import WireModel
from shared.hardware import HardwareProfile
from shared.signing import SignedMetadata


class EnrollRequest(WireModel):
    enrollment_token: str = Field(min_length=8)
    hardware: HardwareProfile = Field(default_factory=HardwareProfile)
    # X.509 identity: a PEM CSR over a key the device made; the CA ignores its subject.
    csr_pem: str | None = Field(default=None, max_length=16384)


class CertificateRequest(WireModel):
    """A device renewing its X.509 identity (HTTP Basic as itself): a CSR over its own key."""

    csr_pem: str = Field(max_length=16384)


class CertificateResponse(WireModel):
    client_certificate_pem: str = Field(max_length=16384)


class EnrollResponse(WireModel):
    device_id: str
    device_secret: str
    mqtt_url: str | None = None  # where the control plane wants the device to connect
    topic_prefix: str = "slmops/v1"
    # The root chain releases are signed under: a device with no provisioned root trusts it (TOFU).
    root_metadata: list[SignedMetadata] | None = Field(default=None, max_length=32)
    client_certificate_pem: str | None = Field(default=None, max_length=16384)  # CN = device id, by the device CA


class CredentialRotation(WireModel):
    """`POST /v1/devices/me/credential`: the device's new secret, staged until its first use (a
    later fetch replaces it). The previous secret then keeps working until at least
    `previous_valid_until` (the rotation's grace period)."""

    device_id: str
    device_secret: str
    previous_valid_until: datetime
