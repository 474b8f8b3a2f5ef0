"""What the demo's devices say about the signed releases they were sent: each agent reports a
`release_verified` event (serial, root version) once it has checked a release against its pinned
root, and `release_refused` when a check fails. The summary counts those reports; it does not take
the control plane's word for it."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

# Rollout member statuses of devices that were never sent the rollout's desired state.
NOT_SENT = ("waiting", "incompatible", "waiting_window")


@dataclass
class Verifications:
    """(rollout id, version) -> release serial -> ids of the devices that verified it."""

    releases: dict[tuple[str, str], dict[int, set[str]]] = field(default_factory=lambda: defaultdict(dict))
    refused: int = 0

    def devices(self, rollout_id: str, version: str) -> set[str]:
        return set().union(*self.releases.get((rollout_id, version), {}).values())


def _events(api: httpx.Client, kind: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"type": kind, "limit": 500} | ({"cursor": cursor} if cursor else {})
        page = api.get("/v1/events", params=params).json()
        found += page["data"]
        if not (cursor := page.get("next_cursor")):
            return found


def read_verifications(api: httpx.Client) -> Verifications:
    seen = Verifications(refused=len(_events(api, "release_refused")))
    for event in _events(api, "release_verified"):
        message = event["detail"]  # the event as the device sent it
        inner = message.get("detail") or {}
        key = (inner.get("rollout_id") or "", message.get("version") or "")
        seen.releases[key].setdefault(int(inner["serial"]), set()).add(event["device_id"])
    return seen


def sent_count(rollout: dict[str, Any]) -> int:
    """How many devices the rollout sent its desired state to."""
    return sum(count for status, count in rollout["devices"].items() if status not in NOT_SENT)


def verified_everywhere(results: list[dict[str, Any]], seen: Verifications) -> bool:
    """Every rollout's release was verified by every device it was sent to, and none was refused."""
    return seen.refused == 0 and all(
        sent_count(r) > 0 and len(seen.devices(r["id"], r["version"])) >= sent_count(r) for r in results
    )


def release_table(results: list[dict[str, Any]], seen: Verifications) -> Table:
    table = Table(title="signed releases, as the devices reported verifying them")
    for column in ("rollout", "version", "release serial", "devices that verified it", "devices sent it"):
        table.add_column(column)
    for rollout in results:
        for (rollout_id, version), serials in sorted(seen.releases.items()):
            if rollout_id != rollout["id"]:
                continue
            devices = set().union(*serials.values())
            sent = str(sent_count(rollout)) if version == rollout["version"] else "its rollback"
            label = f"{rollout['baseline_version'] or '-'} -> {rollout['version']}"
            table.add_row(label, version, ", ".join(map(str, sorted(serials))), str(len(devices)), sent)
    return table


def report_verifications(console: Console, results: list[dict[str, Any]], api: httpx.Client) -> bool:
    """Print the devices' verification reports; whether each release was verified everywhere it went."""
    seen = read_verifications(api)
    console.print(release_table(results, seen))
    if verified_everywhere(results, seen):
        console.log("each signed release was verified on every device it was sent to (the devices' own reports)")
        return True
    console.log(f"[red]a release was not verified on every device it was sent to[/red] ({seen.refused} refused)")
    return False
