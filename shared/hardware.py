"""The hardware profile a device reports at enrollment and on every MQTT connect."""

from __future__ import annotations

from pydantic import Field

from shared.base import WireModel


class HardwareProfile(WireModel):
    cpu_model: str = ""
    cpu_cores: int = Field(default=0, ge=0)
    ram_mb: int = Field(default=0, ge=0)
    accelerators: list[str] = Field(default_factory=list)  # e.g. ["cuda", "npu"]; empty: CPU only
    os: str = ""
    arch: str = ""  # platform.machine(): x86_64, aarch64, ...
    agent_version: str = ""
