"""Keep a NATS cluster's device users in step with enrolled devices.

A NATS node takes its users from an `authorization { users = [...] }` block, which each node's
config pulls in with `include "users.conf"` (deploy/nats/README.md). This module writes that file
atomically under a file lock and then reloads every node it knows a pid file of (SIGHUP: NATS
re-reads its config, includes too, and closes the connections of users it no longer has or whose
permissions changed). Each device may publish to its own state, telemetry, events and status
subjects and subscribe to its own desired subject only; NATS maps MQTT topic `a/b/c` to subject
`a.b.c`.

Passwords are bcrypt hashes (`$2b$...`): NATS compares them with bcrypt, and anything else it
takes as a plaintext password. The control plane computes `nats_hash(secret)` once, at enrollment,
where the secret is in hand, stores it with the device, and can `sync` the whole file from the
database at any time without knowing a single secret.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import bcrypt

from control_plane.fleet.credentials import CredentialFile, write_atomically
from shared.mqtt.errors import CredentialSyncError
from shared.topics import DEVICE_PUBLISHED_KINDS, TopicKind, Topics, is_valid_device_id

# A device secret is 256 random bits, not a human password: bcrypt's minimum work factor keeps a
# reconnect storm (every device of a killed node at once) cheap for the nodes that take it over.
BCRYPT_COST = 4
# An MQTT client's QoS 1 subscription is a JetStream consumer delivering to `$MQTT.sub.<id>`,
# which the client's own user subscribes to (NATS MQTT documentation, "Permissions").
MQTT_DELIVERY_SUBJECT = "$MQTT.sub.>"
# Admins get every subject spelled out, not an absent permissions block: nats-server 2.9.10
# dereferences a user's permissions for each retained message it published when it reloads,
# and crashes on a user without any (server/mqtt.go mqttCheckPubRetainedPerms).
ADMIN_PERMISSIONS: dict[str, object] = {"publish": {"allow": [">"]}, "subscribe": {"allow": [">"]}}


def nats_hash(secret: str, *, cost: int = BCRYPT_COST) -> str:
    """A bcrypt hash that a NATS users block accepts as a password."""
    # bcrypt reads at most 72 bytes; device secrets are far shorter.
    return bcrypt.hashpw(secret.encode("utf-8"), bcrypt.gensalt(cost)).decode("ascii")


def verify_nats_hash(secret: str, password_hash: str) -> bool:
    try:
        return bcrypt.checkpw(secret.encode("utf-8"), password_hash.encode("ascii"))
    except ValueError:
        return False


def is_nats_hash(password_hash: str) -> bool:
    """True for a bcrypt hash; NATS would take anything else as the password itself."""
    return password_hash[:4] in ("$2a$", "$2b$", "$2y$") and len(password_hash) == 60


def mqtt_topic_to_subject(topic: str) -> str:
    """The NATS subject of an MQTT topic: levels become tokens, `+` is `*` and `#` is `>`.

    A `.` inside a level has no MQTT meaning but separates NATS tokens: NATS 2.9 refuses such
    topics, so a device id with a dot cannot be served (`device_permissions` refuses it).
    """
    return ".".join({"+": "*", "#": ">"}.get(level, level) for level in topic.split("/"))


def device_permissions(topics: Topics, device_id: str) -> dict[str, object]:
    """What `device_id` may do: publish its own messages, read its own desired state."""
    if not is_valid_device_id(device_id) or "." in device_id:
        raise CredentialSyncError(f"device id {device_id!r} cannot be a NATS user with its own subjects")
    publish = [mqtt_topic_to_subject(topics.device(device_id, kind)) for kind in DEVICE_PUBLISHED_KINDS]
    subscribe = [mqtt_topic_to_subject(topics.device(device_id, TopicKind.DESIRED)), MQTT_DELIVERY_SUBJECT]
    return {"publish": {"allow": publish}, "subscribe": {"allow": subscribe}}


def render_users(topics: Topics, devices: Mapping[str, str], admins: Mapping[str, str]) -> str:
    """The `authorization` block: admins (user -> bcrypt hash) may do anything, devices only their own."""
    header = "# slmops: written by control_plane.fleet.nats_users; edits are overwritten."
    lines = [header, "authorization {", "  users = ["]
    for user, password_hash in admins.items():
        lines.append(_user_line(user, password_hash, ADMIN_PERMISSIONS))
    for device_id, password_hash in devices.items():
        lines.append(_user_line(device_id, password_hash, device_permissions(topics, device_id), mqtt_only=True))
    lines += ["  ]", "}", ""]
    return "\n".join(lines)


def _user_line(user: str, password_hash: str, permissions: Mapping[str, object], *, mqtt_only: bool = False) -> str:
    fields = [f"user: {_quote(user)}", f"password: {_quote(password_hash)}", f"permissions: {_compact(permissions)}"]
    if mqtt_only:
        # Over the NATS protocol a device could subscribe to `$MQTT.sub.>`, every client's deliveries.
        fields.append('allowed_connection_types: ["MQTT"]')
    return "    {" + ", ".join(fields) + "}"


def _compact(value: object) -> str:
    return json.dumps(value, separators=(", ", ": "))


def _quote(value: str) -> str:
    # NATS' config parser takes JSON strings; `$` inside quotes is not a variable reference.
    return json.dumps(value)


def signal_pid_files(pid_files: Iterable[Path]) -> Callable[[], None]:
    """A reload that sends SIGHUP to each node whose pid is in one of `pid_files`, as
    `nats-server --signal reload=<pid>` does. A missing or stale file is a node that is down: it
    reads the users file when it starts."""
    paths = list(pid_files)

    def reload() -> None:
        for path in paths:
            try:
                os.kill(int(path.read_text().strip()), signal.SIGHUP)
            except (FileNotFoundError, ProcessLookupError):
                continue
            except (OSError, ValueError) as exc:
                raise CredentialSyncError(f"cannot signal the NATS node from {path}: {exc}") from exc

    return reload


class NatsUsersFile(CredentialFile):
    """A NATS users file kept in step with enrolled devices, the nodes reloaded after each change:
    `MosquittoPasswordFile`'s surface, with bcrypt hashes (`nats_hash`) in place of Mosquitto's."""

    def __init__(
        self,
        path: str | Path,
        *,
        topics: Topics,
        admins: Mapping[str, str] | None = None,
        reload: Callable[[], None] | None = None,
        pid_files: Iterable[str | Path] = (),
    ) -> None:
        """`admins`: user -> secret (the control plane); `reload` or `pid_files` says how to reload."""
        self.path = Path(path)
        self.topics = topics
        self._admins = {user: nats_hash(secret) for user, secret in (admins or {}).items()}
        self._reload = reload or signal_pid_files(Path(p) for p in pid_files)
        self._entries_path = self.path.with_name(self.path.name + ".json")
        self._tombstone = nats_hash(secrets.token_urlsafe(32))  # the hash of a secret nobody knows

    def hash_secret(self, secret: str) -> str:
        return nats_hash(secret)

    def check_entry(self, device_id: str, password_hash: str) -> None:
        device_permissions(self.topics, device_id)  # refuses ids that cannot be a user
        if not is_nats_hash(password_hash):
            # NATS would take a Mosquitto `$7$` hash as the plaintext password: never write one.
            raise CredentialSyncError(f"device {device_id!r} has no bcrypt hash; it must re-enroll or rotate")

    def read(self) -> dict[str, str]:
        """Current device entries (device id -> bcrypt hash), as last written."""
        try:
            entries = json.loads(self._entries_path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise CredentialSyncError(f"cannot read {self._entries_path}: {exc}") from exc
        return {str(user): str(h) for user, h in entries.items()}

    def _forget(self, entries: dict[str, str], device_ids: list[str]) -> None:
        """A revoked device keeps its user, with a password nobody knows: nats-server 2.9.10
        crashes on the reload that drops a user who published a retained message (every device
        does: its status) while deleting that message (server/mqtt.go mqttCheckPubRetainedPerms,
        a nil subscription). A changed password closes the device's connection all the same."""
        for device_id in device_ids:
            entries[device_id] = self._tombstone

    def _write(self, devices: Mapping[str, str]) -> None:
        # The entries go to a JSON sibling too: parsing NATS' config format back is not worth it.
        # The users file is written last, so a crash in between leaves the nodes on the old list.
        write_atomically(self._entries_path, json.dumps(dict(devices), indent=0))
        write_atomically(self.path, render_users(self.topics, devices, self._admins))
