"""The MQTT topic layout, defined once, under a configurable prefix.

    {prefix}/devices/{device_id}/desired    retained, QoS 1, control plane -> device
    {prefix}/devices/{device_id}/state      device -> control plane
    {prefix}/devices/{device_id}/telemetry  device -> control plane
    {prefix}/devices/{device_id}/events     device -> control plane
    {prefix}/devices/{device_id}/status     retained birth "online", last will "offline"

A device id becomes one topic level, so it may not contain `/`, `+`, `#` or NUL
(MQTT 3.1.1 section 4.7.1: those are the level separator and the wildcards).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

DEFAULT_PREFIX = "slmops/v1"

_DEVICE_ID = re.compile(r"^[A-Za-z0-9_.:@-]{1,128}$")


class TopicKind(StrEnum):
    DESIRED = "desired"
    STATE = "state"
    TELEMETRY = "telemetry"
    EVENTS = "events"
    STATUS = "status"


DEVICE_PUBLISHED_KINDS: tuple[TopicKind, ...] = (
    TopicKind.STATE,
    TopicKind.TELEMETRY,
    TopicKind.EVENTS,
    TopicKind.STATUS,
)
"""Kinds a device publishes; the control plane publishes only `desired`."""


def is_valid_device_id(device_id: str) -> bool:
    """True when `device_id` can be one topic level (and a Mosquitto username)."""
    return bool(_DEVICE_ID.match(device_id))


def _check_prefix(prefix: str) -> str:
    cleaned = prefix.strip("/")
    if not cleaned or any(ch in cleaned for ch in "+#\x00"):
        raise ValueError(f"invalid MQTT topic prefix: {prefix!r}")
    return cleaned


@dataclass(frozen=True)
class ParsedTopic:
    device_id: str
    kind: TopicKind


@dataclass(frozen=True)
class Topics:
    """Builds and parses topics under one prefix; the only place topic strings are spelled."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        object.__setattr__(self, "prefix", _check_prefix(self.prefix))

    @property
    def devices_root(self) -> str:
        return f"{self.prefix}/devices"

    def device(self, device_id: str, kind: TopicKind | str) -> str:
        if not is_valid_device_id(device_id):
            raise ValueError(f"invalid device id for a topic: {device_id!r}")
        return f"{self.devices_root}/{device_id}/{TopicKind(kind).value}"

    def desired(self, device_id: str) -> str:
        return self.device(device_id, TopicKind.DESIRED)

    def state(self, device_id: str) -> str:
        return self.device(device_id, TopicKind.STATE)

    def telemetry(self, device_id: str) -> str:
        return self.device(device_id, TopicKind.TELEMETRY)

    def events(self, device_id: str) -> str:
        return self.device(device_id, TopicKind.EVENTS)

    def status(self, device_id: str) -> str:
        return self.device(device_id, TopicKind.STATUS)

    def parse(self, topic: str) -> ParsedTopic | None:
        """Return the device id and kind of a device topic, or None for anything else."""
        head = self.devices_root + "/"
        if not topic.startswith(head):
            return None
        parts = topic[len(head) :].split("/")
        if len(parts) != 2:
            return None
        device_id, kind = parts
        if not is_valid_device_id(device_id):
            return None
        try:
            return ParsedTopic(device_id=device_id, kind=TopicKind(kind))
        except ValueError:
            return None

    # Wildcard filters for the control plane: `+` matches exactly one level (the device id).
    def all_devices(self, kind: TopicKind | str) -> str:
        return f"{self.devices_root}/+/{TopicKind(kind).value}"

    def all_device_messages(self) -> str:
        return f"{self.devices_root}/+/+"

    def control_plane_subscriptions(self) -> list[str]:
        """Filters for everything devices publish (not `desired`, which the control plane writes)."""
        return [self.all_devices(kind) for kind in DEVICE_PUBLISHED_KINDS]
