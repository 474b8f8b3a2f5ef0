"""Attacks on a device's releases, one test per attack (python-tuf's style), on real agent processes
over a real Mosquitto started from deploy/mosquitto/: once through its TLS device listener (the
device logs in with its secret) and once through its mTLS listener (the device presents the
certificate the device CA signed). The attacker holds broker-admin rights (publishes any desired
state) or runs the artifact server; each test ends with the device serving its previous model and
an event naming the attack.

SLMOPS_TEST_UNVERIFIED=1 starts the agents without a pinned root (release verification off):
every test of a signature, serial, expiry or root check then fails, which shows the tests test the
verification. The two artifact-server tests (more bytes, other bytes) still pass: the download
stops at the size and checks the sha256 that the desired state names whether or not its release is
verified; what signing adds there is that the broker cannot change those two values, which the
forged-state tests cover.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

from control_plane.trust.device_ca import DeviceCA
from shared.desired import ArtifactRef, DesiredState
from shared.messages import EventMessage
from shared.releases import expires_in
from shared.topics import Topics
from slmops.tinymodels import write_tiny_gguf
from tests.support.agent import AgentProcess, ArtifactServer, Misbehaviour, artifact_server
from tests.support.agent_mqtt import DEVICE, SECRET, ControlPlane, write_credential
from tests.support.mosquitto import mosquitto_binary
from tests.support.mqtt import ClientFactory, clients, mtls_mosquitto
from tests.support.releases import Authority, past
from tests.support.tls import TestCA
from tests.support.waiting import wait_for

__all__ = ["clients"]  # fixture
pytestmark = [
    pytest.mark.mosquitto,
    pytest.mark.llama,
    pytest.mark.slow,
    pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed"),
]
UNVERIFIED = os.environ.get("SLMOPS_TEST_UNVERIFIED") == "1"


@dataclass(frozen=True)
class Broker:
    """A private Mosquitto: the admin's URL, and how an agent reaches its device listener."""

    admin_url: str
    device_url: str
    ca_file: Path
    device_ca: DeviceCA | None  # the mTLS listener: the agent presents a certificate it signed

    def provision(self, data_dir: Path) -> dict[str, Any]:
        """Write the device's credential (and certificate); the agent settings that use them."""
        write_credential(data_dir, Topics(), mqtt_url=self.device_url)
        if self.device_ca is None:
            return {"ca_bundle": str(self.ca_file)}
        key = ec.generate_private_key(ec.SECP256R1())  # made on the device, as at enrollment
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, DEVICE)])
        csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
        cert = self.device_ca.sign(csr.public_bytes(serialization.Encoding.PEM), device_id=DEVICE)
        (data_dir / "device.crt").write_bytes(cert)
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        (data_dir / "device.key").write_bytes(pem)
        (data_dir / "device.key").chmod(0o600)
        return {"ca_bundle": str(self.ca_file), "x509_identity": True}


@pytest.fixture(scope="module", params=["tls", "mtls"])
def broker(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """The shipped Mosquitto with a test-made server certificate: the device listener with
    passwords (`tls`) or the mTLS listener with a device CA (`mtls`)."""
    folder = tmp_path_factory.mktemp(f"broker-{request.param}")
    server_ca = TestCA(folder / "server-ca")
    device_ca = DeviceCA.load_or_create(folder / "device-ca")
    process, device_port, mtls_port = mtls_mosquitto(folder / "broker", server_ca.issue("broker"), device_ca.folder)
    process.start(devices={DEVICE: SECRET})
    try:
        if request.param == "tls":
            yield Broker(process.admin_url, f"mqtts://127.0.0.1:{device_port}", server_ca.ca_file, None)
        else:
            yield Broker(process.admin_url, f"mqtts://127.0.0.1:{mtls_port}", server_ca.ca_file, device_ca)
    finally:
        process.stop()


@pytest.fixture(scope="module")
def artifacts() -> Iterator[ArtifactServer]:
    with artifact_server() as server:
        yield server


@pytest.fixture(scope="module")
def models(artifacts: ArtifactServer, tmp_path_factory: pytest.TempPathFactory) -> list[ArtifactRef]:
    """Four tiny GGUF models, as artifact references the artifact server serves."""
    folder = tmp_path_factory.mktemp("models")
    refs = []
    for seed in (41, 42, 43, 44):
        sha = artifacts.add_file(write_tiny_gguf(folder / f"m{seed}.gguf", seed=seed))
        refs.append(ArtifactRef(sha256=sha, size_bytes=len(artifacts.files[sha]), format="gguf"))
    return refs


class Device:
    """A real agent process pinned to `authority`'s root, and the broker admin's view of it."""

    def __init__(
        self, tmp_path: Path, authority: Authority, cp: ControlPlane, artifacts: ArtifactServer, broker: Broker
    ) -> None:
        self.authority, self.cp = authority, cp
        data_dir = tmp_path / "agent"
        settings = broker.provision(data_dir)
        root_file = tmp_path / "root.json"
        root_file.write_text(json.dumps([authority.chain[0].model_dump(mode="json")]))
        if not UNVERIFIED:
            settings["root_metadata_file"] = str(root_file)
        self.process = AgentProcess(data_dir, control_plane_url=artifacts.url, trial_requests=1000, **settings).start()

    def send(self, desired: DesiredState) -> None:
        self.cp.publish_desired(desired)

    def wait_serving(self, version: str) -> None:
        def serving() -> bool:
            try:
                ready = httpx.get(f"{self.process.url}/readyz", timeout=2)
            except httpx.HTTPError:
                return False
            return ready.status_code == 200 and ready.json()["version"] == version

        wait_for(serving, timeout_s=60, what=lambda: self.process.log.read_text()[-2000:])

    def wait_event(self, kind: str, reason: str, message_id: str | None = None) -> EventMessage:
        def found() -> EventMessage | None:
            events = self.cp.events(kind)
            if message_id is not None:
                events = [e for e in events if e.detail.get("desired_message_id") == message_id]
            return next((e for e in events if e.detail.get("reason") == reason), None)

        wait_for(lambda: found() is not None, timeout_s=60, what=lambda: [e.kind for e in self.cp.events()])
        event = found()
        assert event is not None
        return event

    def refused(self, desired: DesiredState, reason: str) -> EventMessage:
        """Send `desired`; the device refuses it for `reason` and still serves what it served."""
        before = httpx.get(f"{self.process.url}/readyz", timeout=5).json()
        self.send(desired)
        event = self.wait_event("release_refused", reason, desired.message_id)
        self.cp.wait_state(lambda s: s.desired_message_id == desired.message_id and s.phase == "download_failed")
        after = httpx.get(f"{self.process.url}/readyz", timeout=5).json()
        assert (after["model"], after["version"]) == (before["model"], before["version"])
        return event


@pytest.fixture
def device(
    tmp_path: Path, clients: ClientFactory, artifacts: ArtifactServer, models: list[ArtifactRef], broker: Broker
) -> Iterator[Device]:
    """A device serving model m 1 (release serial 1) under a fresh authority, over `broker`."""
    cp = ControlPlane(clients(broker.admin_url, protocol="3.1.1"), Topics())
    authority = Authority()
    made = Device(tmp_path, authority, cp, artifacts, broker)
    try:
        made.send(authority.desired(models[0], version="1"))
        made.wait_serving("1")
        yield made
    finally:
        made.process.stop()
        cp.clear()


def _tampered(desired: DesiredState, **signed: Any) -> DesiredState:
    assert desired.release is not None
    release = desired.release.model_copy(update={"signed": {**desired.release.signed, **signed}})
    return desired.model_copy(update={"release": release})


def test_forged_desired_state_without_a_release_is_refused(device: Device, models: list[ArtifactRef]) -> None:
    """The review's attack: a broker admin publishes a desired state naming a never-registered model."""
    forged = DesiredState(message_id="evil", model="m-evil", version="6.6.6", artifact=models[3])
    event = device.refused(forged, "unknown_key")
    assert event.model == "m-evil" and "no signed release" in event.message


def test_release_signed_by_the_attackers_key_is_refused(device: Device, models: list[ArtifactRef]) -> None:
    forged = device.authority.desired(models[3], version="6.6.6", key=Ed25519PrivateKey.generate())
    device.refused(forged, "unknown_key")


def test_release_altered_after_signing_is_refused(device: Device, models: list[ArtifactRef]) -> None:
    genuine = device.authority.desired(models[1], version="2")
    evil = models[3].model_dump(exclude={"schema_version", "url", "quantization"})
    forged = _tampered(genuine, artifacts=[evil]).model_copy(update={"artifact": models[3]})
    device.refused(forged, "bad_signature")


def test_replay_of_an_older_release_is_refused(device: Device, models: list[ArtifactRef]) -> None:
    old = device.authority.desired(models[1], version="1.5")  # serial 2, never sent: captured by the attacker
    device.send(device.authority.desired(models[2], version="2"))  # serial 3
    device.wait_serving("2")
    device.refused(old.model_copy(update={"message_id": "replayed"}), "rollback")


def test_rollback_survives_an_agent_restart(device: Device, models: list[ArtifactRef]) -> None:
    old = device.authority.desired(models[1], version="1.5")
    device.send(device.authority.desired(models[2], version="2"))
    device.wait_serving("2")
    device.process.stop()
    device.process.start()
    device.wait_serving("2")
    device.refused(old.model_copy(update={"message_id": "replayed-after-restart"}), "rollback")


def test_expired_release_is_refused(device: Device, models: list[ArtifactRef]) -> None:
    device.refused(device.authority.desired(models[1], version="2", expires=past()), "expired")


def test_root_rotation_is_followed(device: Device, models: list[ArtifactRef]) -> None:
    device.authority.rotate(root_key=Ed25519PrivateKey.generate())
    device.send(device.authority.desired(models[1], version="2"))  # carries the chain: root 1 -> root 2
    device.wait_serving("2")
    trust = json.loads((device.process.data_dir / "trust.json").read_text())
    assert trust["root"]["version"] == 2
    verified = [e.detail for e in device.cp.events("release_verified")]
    assert [(d["serial"], d["root_version"]) for d in verified] == [(1, 1), (2, 2)]


def test_release_signed_by_a_revoked_key_is_refused(device: Device, models: list[ArtifactRef]) -> None:
    revoked = device.authority.release_key
    device.authority.rotate()  # a new release key; the old one is no longer listed
    device.send(device.authority.desired(models[1], version="2"))
    device.wait_serving("2")
    stolen = device.authority.desired(models[2], version="3", key=revoked)
    device.refused(stolen.model_copy(update={"roots": device.authority.chain[:1]}), "unknown_key")


def test_a_fast_forward_with_a_leaked_release_key_ends_when_the_key_is_revoked(
    device: Device, models: list[ArtifactRef]
) -> None:
    """The holder of a leaked release key signs a huge serial: every genuine release would then be
    a rollback. Revoking the key (a root update) makes the device forget the serials it signed."""
    device.send(device.authority.desired(models[3], version="6.6.6", serial=2**62))
    device.wait_serving("6.6.6")
    device.authority.rotate()  # the operator revokes the leaked key
    device.send(device.authority.desired(models[1], version="2", serial=2))
    device.wait_serving("2")
    trust = json.loads((device.process.data_dir / "trust.json").read_text())
    assert trust["serials"] == {"m": 2}


def test_artifact_server_sending_more_bytes_than_signed_is_refused(
    device: Device, models: list[ArtifactRef], artifacts: ArtifactServer
) -> None:
    artifacts.behaviour[models[1].sha256] = Misbehaviour(extra_bytes=3_000_000)
    try:
        device.refused(device.authority.desired(models[1], version="2"), "size_exceeded")
    finally:
        artifacts.behaviour.pop(models[1].sha256)
    store = device.process.data_dir / "store"
    assert not (store / "sha256" / models[1].sha256).exists()
    assert all(p.stat().st_size <= models[1].size_bytes for p in store.rglob(f"{models[1].sha256}*"))


def test_artifact_server_sending_other_bytes_is_refused(
    device: Device, models: list[ArtifactRef], artifacts: ArtifactServer
) -> None:
    artifacts.behaviour[models[2].sha256] = Misbehaviour(corrupt=True)
    try:
        device.refused(device.authority.desired(models[2], version="2"), "mismatch")
    finally:
        artifacts.behaviour.pop(models[2].sha256)


def test_release_for_one_model_naming_another_models_artifact_is_refused(
    device: Device, models: list[ArtifactRef]
) -> None:
    """Mix-and-match: model m's state carries the (valid) release of model other, or names an
    artifact its own release does not list."""
    other = device.authority.desired(models[3], model="other", version="9")
    mine = device.authority.desired(models[1], version="2")
    device.refused(mine.model_copy(update={"release": other.release, "message_id": "mixed-1"}), "mismatch")
    device.refused(mine.model_copy(update={"artifact": models[3], "message_id": "mixed-2"}), "mismatch")


def test_device_reports_a_stale_release_and_keeps_serving(device: Device, models: list[ArtifactRef]) -> None:
    short = device.authority.desired(models[1], version="2", expires=expires_in(10))
    device.send(short)
    device.wait_serving("2")
    device.wait_event("stale_release", "expired")
    device.cp.wait_state(lambda s: (s.reason or "").startswith("stale_release"))
    device.wait_serving("2")
