"""The hardware profile a device reports at enrollment and on every MQTT connect."""

from __future__ import annotations

from pydantic import Field

from shared import limits
from shared.base import WireModel
from shared.limits import Note, ShortName


class HardwareProfile(WireModel):
    cpu_model: Note = ""
    cpu_cores: int = Field(default=0, ge=0, le=1 << 20)
    ram_mb: int = Field(default=0, ge=0, le=limits.MAX_BYTES >> 20)
    # e.g. ["cuda", "npu"]; empty: CPU only
    accelerators: list[ShortName] = Field(default_factory=list, max_length=limits.MAX_LABELS)
    os: Note = ""
    arch: ShortName = ""  # platform.machine(): x86_64, aarch64, ...
    agent_version: ShortName = ""
