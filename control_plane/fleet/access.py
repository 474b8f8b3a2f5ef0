"""The broker admits exactly the devices the registry holds a live credential for.

Mosquitto: the password file is derived state, rebuilt from `devices.mqtt_password_hash` at start
(a lost file comes back, a restored old one loses the devices revoked since), a line added at
enrollment and removed at revocation, each followed by SIGHUP (Mosquitto then disconnects a
removed device; a device on the mTLS listener is disconnected by a session takeover, see
`mosquitto_takeover`). The embedded broker asks the registry at every CONNECT; a revocation closes the
device's open connection, so its next CONNECT is checked again. See deploy/mosquitto/README.md.

NATS (SLMOPS_NATS_USERS_FILE): the same, with a users file every node includes and a reload of
each node (SLMOPS_NATS_PID_FILES); its hashes are bcrypt, so a device's stored hash is in the
format of the broker it was enrolled for. See deploy/nats/README.md.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlmodel import Session, col, select

from control_plane.config import Settings
from control_plane.fleet.credentials import BrokerCredentialSync, CredentialFile, MosquittoPasswordFile, mosquitto_hash
from control_plane.fleet.nats_users import NatsUsersFile, is_nats_hash
from control_plane.models import Device, DeviceStatus
from shared.mqtt.client import MqttClient
from shared.mqtt.errors import MqttError
from shared.mqtt.url import parse_broker_urls
from shared.topics import Topics

if TYPE_CHECKING:
    from control_plane.fleet.broker import EmbeddedBroker

log = logging.getLogger("slmops.broker_access")


class BrokerAccess:
    """Grants and revokes device credentials on whichever broker the control plane uses.

    `takeover(device_id)` closes a device's open Mosquitto connection whatever its credential: set
    when devices may hold certificates, because Mosquitto's SIGHUP re-checks a certificate
    client's identity but not the CRL, so a revoked certificate's live connection would stay open.
    """

    def __init__(
        self, password_file: BrokerCredentialSync | None = None, *, takeover: Callable[[str], None] | None = None
    ) -> None:
        self.password_file = password_file
        self.takeover = takeover
        self.embedded: EmbeddedBroker | None = None  # set once the fleet runtime started it

    @property
    def password_hash(self) -> Callable[[str], str]:
        """How a device's secret is hashed for this broker (`devices.mqtt_password_hash`)."""
        return self.password_file.hash_secret if isinstance(self.password_file, CredentialFile) else mosquitto_hash

    def grant(self, device_id: str, mqtt_password_hash: str) -> None:
        """Let a freshly enrolled device in (the embedded broker reads the registry itself)."""
        if self.password_file is not None:
            self.password_file.add_hash(device_id, mqtt_password_hash)

    def revoke(self, device_id: str) -> None:
        """Cut the device off now: drop its line and reload Mosquitto, or close its connection.

        Call after committing the registry change that ends its credential.
        """
        if self.password_file is not None:
            self.password_file.remove_device(device_id)
            if self.takeover is not None:
                # The CRL was rewritten before this call; the reload makes the reconnect that
                # follows the takeover fail its handshake (remove_device reloads only on a change).
                self.password_file.reload()
                self.takeover(device_id)
                log.info("closed the broker connection of revoked device %s", device_id)
        if self.embedded is not None and self.embedded.disconnect(device_id):
            log.info("closed the broker connection of revoked device %s", device_id)

    def rebuild(self, engine: sa.Engine) -> int:
        """Rewrite the password file from the registry (and reload); returns the devices written."""
        if self.password_file is None:
            return 0
        with Session(engine) as session:
            _adopt_unhashed(session, self.password_file.read())
            rows = session.exec(
                select(Device.id, Device.mqtt_password_hash).where(
                    col(Device.mqtt_password_hash).is_not(None),
                    col(Device.secret_hash).is_not(None),
                    Device.status != DeviceStatus.decommissioned,
                )
            ).all()
            session.commit()
        entries = {device_id: password_hash for device_id, password_hash in rows if password_hash}
        if isinstance(self.password_file, NatsUsersFile):
            entries = _nats_entries(entries)
        self.password_file.sync(entries)
        return len(entries)


def _adopt_unhashed(session: Session, file_entries: dict[str, str]) -> None:
    """Devices enrolled before the registry kept hashes (migration 0012) take their line from the
    current file, once; a device without a live credential never does."""
    if not file_entries:
        return
    unhashed = session.exec(
        select(Device).where(col(Device.mqtt_password_hash).is_(None), col(Device.secret_hash).is_not(None))
    ).all()
    for device in unhashed:
        if (password_hash := file_entries.get(device.id)) is not None:
            device.mqtt_password_hash = password_hash
            session.add(device)


def _nats_entries(entries: dict[str, str]) -> dict[str, str]:
    """Devices whose hash NATS can check; one enrolled for Mosquitto gets in after a rotation."""
    kept = {device_id: h for device_id, h in entries.items() if is_nats_hash(h) and "." not in device_id}
    if len(kept) < len(entries):
        left_out = len(entries) - len(kept)
        log.warning("%d device(s) hold no bcrypt hash or a dotted id: rotate their credentials", left_out)
    return kept


def password_file_for(settings: Settings) -> BrokerCredentialSync | None:
    """The external broker's users (Mosquitto's password file or NATS' users file), keeping the
    control plane's own user in it."""
    admins = {}
    if settings.mqtt_url:
        url = parse_broker_urls(settings.mqtt_url)[0]
        if url.username and url.password:
            admins[url.username] = url.password
    if settings.nats_users_file is not None:
        topics = Topics(settings.mqtt_topic_prefix)
        return NatsUsersFile(settings.nats_users_file, topics=topics, admins=admins, pid_files=settings.nats_pid_files)
    if settings.mqtt_password_file is None:
        return None
    return MosquittoPasswordFile(settings.mqtt_password_file, admins=admins, pid_file=settings.mqtt_pid_file)


def broker_password_hash(app: Any) -> Callable[[str], str]:
    """The hash a device's secret is stored as, for the broker this app keeps in step."""
    access: BrokerAccess | None = getattr(app.state, "broker_access", None)
    return access.password_hash if access is not None else mosquitto_hash


def mosquitto_takeover(settings: Settings) -> Callable[[str], None] | None:
    """With device certificates on an external Mosquitto: a takeover that closes a device's open
    connection. The control plane connects with the device's client id (Mosquitto's client ids
    are global across listeners, and the mTLS listener makes a device's id its certificate's CN),
    so the broker closes the device's connection (MQTT 3.1.1 [MQTT-3.1.4-2], MQTT 5 reason
    0x8E); a clean session discards the device's queued state; then it disconnects. Mosquitto
    2.0 has no other way to drop one client short of a broker plugin (dynamic security's kick)."""
    if not (settings.device_certificates and settings.mqtt_url):
        return None
    url = settings.mqtt_url
    tls = ssl.create_default_context(cafile=str(settings.mqtt_ca_file)) if settings.mqtt_ca_file else None

    def takeover(device_id: str) -> None:
        client = MqttClient(url, client_id=device_id, tls_context=tls)
        try:
            client.start(wait=True, timeout_s=10)
        except MqttError as exc:
            log.error("could not close the broker connection of revoked device %s: %s", device_id, exc)
            return
        client.stop(publish_offline=False)

    return takeover


def revoke_device_on_broker(app: Any, device_id: str) -> None:
    """Cut `device_id` off the broker now, whichever broker it is (decommission, token reissue).

    `app` is the FastAPI app (`request.app`); commit the registry change first.
    """
    device_ca = getattr(app.state, "device_ca", None)
    if device_ca is not None:  # the CRL first: the broker's reload below reads it too
        device_ca.revoke_device(device_id)
    access: BrokerAccess | None = getattr(app.state, "broker_access", None)
    if access is not None:
        access.revoke(device_id)


def grant_device_on_broker(app: Any, device: Device) -> None:
    """Let a device that has just enrolled (committed) in on the broker."""
    access: BrokerAccess | None = getattr(app.state, "broker_access", None)
    if access is not None and device.mqtt_password_hash:
        access.grant(device.id, device.mqtt_password_hash)


def complete_rotation_on_broker(app: Any, device: Device) -> None:
    """A completed rotation (committed): the certificates minted with older secrets are revoked
    (the agent renews with its new one) and the broker takes the new secret's hash."""
    device_ca = getattr(app.state, "device_ca", None)
    if device_ca is not None:  # the CRL first: the broker's reload in grant reads it too
        device_ca.revoke_device(device.id)
    grant_device_on_broker(app, device)
