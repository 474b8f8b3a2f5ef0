"""Device enrollment: a one-time enrollment token is exchanged once for a device credential.

The credential (device_id, device_secret) authenticates the device on REST (HTTP Basic) and on
MQTT (username/password).
"""

from __future__ import annotations

from pydantic import Field

from shared.base import WireModel
from shared.hardware import HardwareProfile
from shared.signing import SignedMetadata


class EnrollRequest(WireModel):
    enrollment_token: str = Field(min_length=8)
    hardware: HardwareProfile = Field(default_factory=HardwareProfile)


class EnrollResponse(WireModel):
    device_id: str
    device_secret: str
    mqtt_url: str | None = None  # where the control plane wants the device to connect
    topic_prefix: str = "slmops/v1"
    # The root chain releases are signed under: a device with no provisioned root trusts it (TOFU).
    root_metadata: list[SignedMetadata] | None = Field(default=None, max_length=32)
