"""X.509 device identities: the device CA signs a CSR as the device id, Mosquitto's mTLS listener
keys its ACLs on the certificate, and a revoked certificate is refused after a CRL reload."""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import time
import uuid
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from fastapi.testclient import TestClient

from control_plane.api.main import create_app
from control_plane.config import Settings
from control_plane.fleet.credentials import signal_from_pid_file
from control_plane.trust.device_ca import DeviceCA, DeviceCAError
from edge_agent.agent import Agent
from edge_agent.mqtt.channel import MqttChannel
from edge_agent.settings import load_settings
from shared.messages import EventMessage, encode
from shared.mqtt.client import MqttClient
from shared.topics import Topics
from tests.support.mosquitto import mosquitto_binary
from tests.support.mqtt import Collector, mtls_mosquitto
from tests.support.server_thread import ServerThread
from tests.support.tls import TestCA
from tests.support.waiting import wait_for


def _csr(common_name: str = "whatever-the-device-says") -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
    return key, csr.public_bytes(serialization.Encoding.PEM)


def test_device_ca_signs_a_csr_as_the_device_id(tmp_path: Path) -> None:
    ca = DeviceCA.load_or_create(tmp_path / "device-ca")
    key, csr = _csr()
    cert = x509.load_pem_x509_certificate(ca.sign(csr, device_id="edge-7"))
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "edge-7"
    assert cert.issuer == ca.certificate.subject
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()  # type: ignore[union-attr]
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert (tmp_path / "device-ca" / "ca.key").stat().st_mode & 0o777 == 0o600
    again = DeviceCA.load_or_create(tmp_path / "device-ca")  # the same CA after a restart
    assert again.certificate == ca.certificate


def test_device_ca_refuses_a_malformed_or_forged_csr(tmp_path: Path) -> None:
    ca = DeviceCA.load_or_create(tmp_path / "device-ca")
    with pytest.raises(DeviceCAError) as malformed:
        ca.sign(b"-----BEGIN CERTIFICATE REQUEST-----\nnope\n-----END CERTIFICATE REQUEST-----\n", device_id="d")
    assert malformed.value.code == "csr_invalid"
    _, csr = _csr()
    forged = csr.replace(csr[-80:-60], bytes(reversed(csr[-80:-60])))  # signature no longer matches
    with pytest.raises(DeviceCAError) as bad_signature:
        ca.sign(forged, device_id="d")
    assert bad_signature.value.code == "csr_invalid"
    with pytest.raises(DeviceCAError):
        ca.sign(b"x" * 70_000, device_id="d")  # bounded before parsing


def _write_identity(folder: Path, ca: DeviceCA, device_id: str) -> tuple[Path, Path]:
    key, csr = _csr()
    cert_file, key_file = folder / f"{device_id}.crt", folder / f"{device_id}.key"
    cert_file.write_bytes(ca.sign(csr, device_id=device_id))
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    key_file.write_bytes(pem)
    return cert_file, key_file


def _context(server_ca: Path, identity: tuple[Path, Path] | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(server_ca))
    if identity is not None:
        context.load_cert_chain(*identity)
    return context


def _connack(port: int, context: ssl.SSLContext, client_id: str) -> int | None:
    """CONNACK return code of a bare MQTT 3.1.1 CONNECT over TLS; None when the broker hangs up."""
    name = client_id.encode()
    variable = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(name).to_bytes(2, "big") + name
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                tls.sendall(bytes([0x10, len(variable)]) + variable)
                answer = tls.recv(4)
    except (ssl.SSLError, ConnectionError):
        return None
    return answer[3] if len(answer) == 4 and answer[0] == 0x20 else None


needs_mosquitto = pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed")


@pytest.mark.mosquitto
@needs_mosquitto
def test_mtls_listener_keys_acls_on_the_certificate_and_honours_the_crl(tmp_path: Path) -> None:
    server_ca = TestCA(tmp_path / "server-ca")
    server = server_ca.issue("broker")
    device_ca = DeviceCA.load_or_create(tmp_path / "device-ca")
    broker, _, mtls_port = mtls_mosquitto(tmp_path / "broker", server, device_ca.folder)
    broker.start(devices={})
    topics = Topics()
    admin = MqttClient(broker.admin_url, client_id=f"admin-{uuid.uuid4().hex[:6]}")
    seen = Collector()
    admin.subscribe(f"{topics.prefix}/devices/+/events", seen)
    admin.start()
    identity = _write_identity(tmp_path, device_ca, "edge-7")
    device = MqttClient(
        f"mqtts://127.0.0.1:{mtls_port}", client_id="edge-7", tls_context=_context(server_ca.ca_file, identity)
    )
    try:
        assert _connack(mtls_port, _context(server_ca.ca_file, None), "anonymous") is None  # no certificate
        stranger = TestCA(tmp_path / "stranger").issue("edge-7", client=True)
        assert (
            _connack(mtls_port, _context(server_ca.ca_file, (stranger.cert_file, stranger.key_file)), "edge-7") is None
        )
        device.start()
        device.publish(topics.events("edge-7"), encode(EventMessage(kind="error", message="own topic")))
        device.publish(topics.events("edge-8"), encode(EventMessage(kind="error", message="forged")))
        device.publish(topics.events("edge-7"), encode(EventMessage(kind="error", message="marker")))
        wait_for(lambda: len(seen.payloads()) >= 2)
        assert [t for t, _ in seen.items] == [topics.events("edge-7")] * 2  # the ACL keyed on the certificate's CN
        device.stop(publish_offline=False)
        assert _connack(mtls_port, _context(server_ca.ca_file, identity), "edge-7") == 0
        device_ca.revoke(identity[0].read_bytes())
        signal_from_pid_file(broker.pid_file)()
        wait_for(lambda: _connack(mtls_port, _context(server_ca.ca_file, identity), "edge-7") is None)
        other = _write_identity(tmp_path, device_ca, "edge-9")
        assert _connack(mtls_port, _context(server_ca.ca_file, other), "edge-9") == 0  # others unaffected
    finally:
        device.stop(publish_offline=False)
        admin.stop(publish_offline=False)
        broker.stop()


@pytest.mark.mosquitto
@needs_mosquitto
@pytest.mark.parametrize("cut_off", ["enrollment-token", "decommission"])
def test_agent_enrolls_with_a_csr_and_connects_with_its_certificate(
    tmp_path, db_url, engine, admin_headers, monkeypatch, cut_off
) -> None:  # type: ignore[no-untyped-def]
    """Enrollment signs the agent's CSR; the agent connects to the mTLS listener with the key it
    made itself; reissuing its token or decommissioning it revokes the certificate at the broker
    and closes the connection it has open (the CRL alone stops only new connections)."""
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    server_ca = TestCA(tmp_path / "server-ca")
    server = server_ca.issue("broker")
    ca_dir = tmp_path / "cp" / "device-ca"
    DeviceCA.load_or_create(ca_dir)  # the broker reads its files at start
    broker, _, mtls_port = mtls_mosquitto(tmp_path / "broker", server, ca_dir)
    broker.start(devices={})
    settings = Settings(  # type: ignore[call-arg]
        data_dir=tmp_path / "cp",
        database_url=db_url,
        mqtt_url=broker.admin_url,
        device_mqtt_url=f"mqtts://127.0.0.1:{mtls_port}",
        mqtt_password_file=broker.credentials.path,
        mqtt_pid_file=broker.pid_file,
        device_certificates=True,
        mqtt_topic_prefix=Topics().prefix,
    )
    try:
        with ServerThread(create_app(settings, engine=engine), lifespan="on") as cp:
            created = httpx.post(
                f"{cp.url}/v1/devices", json={"name": f"x509-{uuid.uuid4().hex[:6]}"}, headers=admin_headers
            )
            device_id = created.json()["id"]
            agent = Agent(
                load_settings(
                    data_dir=tmp_path / "agent",
                    control_plane_url=cp.url,
                    enrollment_token=created.json()["enrollment_token"],
                    ca_bundle=str(server_ca.ca_file),
                    x509_identity=True,
                )
            )
            agent.enroll()
            cert_file, key_file = agent.settings.client_cert_path, agent.settings.client_key_path
            assert key_file.stat().st_mode & 0o777 == 0o600
            cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
            assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == device_id
            channel = MqttChannel.for_agent(agent)
            assert channel is not None
            channel.start(wait=True, timeout_s=15)
            identity = (cert_file, key_file)
            try:
                online = lambda: httpx.get(f"{cp.url}/v1/devices/{device_id}", headers=admin_headers).json()["status"]  # noqa: E731
                wait_for(lambda: online() == "online")
                assert channel.device.client.connected
                httpx.post(f"{cp.url}/v1/devices/{device_id}/{cut_off}", headers=admin_headers).raise_for_status()
                wait_for(lambda: not channel.device.client.connected, what="the live connection stayed open")
                assert _connack(mtls_port, _context(server_ca.ca_file, identity), device_id) is None
                time.sleep(3)  # the agent keeps trying: every reconnect is refused at the handshake
                assert not channel.device.client.connected
            finally:
                channel.stop()
                agent.stop()
    finally:
        broker.stop()


def test_a_bad_csr_leaves_the_enrollment_token_usable(tmp_path, db_url, engine, admin_headers) -> None:  # type: ignore[no-untyped-def]
    settings = Settings(data_dir=tmp_path / "cp", database_url=db_url, fleet_enabled=False, device_certificates=True)  # type: ignore[call-arg]
    with TestClient(create_app(settings, engine=engine)) as client:
        created = client.post("/v1/devices", json={"name": f"x509-{uuid.uuid4().hex[:6]}"}, headers=admin_headers)
        token = created.json()["enrollment_token"]
        refused = client.post("/v1/devices/enroll", json={"enrollment_token": token, "csr_pem": "not a csr"})
        assert refused.status_code == 422 and refused.json()["code"] == "csr_invalid"
        _, csr = _csr()
        answer = client.post("/v1/devices/enroll", json={"enrollment_token": token, "csr_pem": csr.decode()})
        assert answer.status_code == 201, answer.text
        assert "BEGIN CERTIFICATE" in answer.json()["client_certificate_pem"]


def test_revocations_survive_a_restart_and_an_old_crl_is_renewed(tmp_path: Path) -> None:
    ca = DeviceCA.load_or_create(tmp_path / "device-ca")
    _, csr = _csr()
    cert = ca.issue(csr, device_id="edge-3")
    assert ca.revoke_device("edge-3") == 1 and ca.revoke_device("edge-3") == 0
    serial = x509.load_pem_x509_certificate(cert).serial_number
    ca._write_crl({serial: ca.certificate.not_valid_before_utc}, validity=dt.timedelta(days=10))  # ageing CRL
    renewed = x509.load_pem_x509_crl(DeviceCA.load_or_create(tmp_path / "device-ca").crl_file.read_bytes())
    assert renewed.get_revoked_certificate_by_serial_number(serial) is not None
    assert renewed.next_update_utc is not None and renewed.next_update_utc - renewed.last_update_utc > dt.timedelta(
        days=300
    )


def _aged_copy(ca: DeviceCA, cert_file: Path) -> None:
    """Rewrite `cert_file` as if issued long ago: two days used, one left."""
    old = x509.load_pem_x509_certificate(cert_file.read_bytes())
    now = dt.datetime.now(dt.UTC)
    aged = (
        x509.CertificateBuilder()
        .subject_name(old.subject)
        .issuer_name(old.issuer)
        .public_key(old.public_key())  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=2))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(ca._key, hashes.SHA256())
    )
    cert_file.write_bytes(aged.public_bytes(serialization.Encoding.PEM))
    record = ca.folder / "issued" / old.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value  # type: ignore[operator]
    (record / f"{old.serial_number:x}.pem").unlink()  # the CA's record ages with it
    (record / f"{aged.serial_number:x}.pem").write_bytes(aged.public_bytes(serialization.Encoding.PEM))


def test_agent_renews_its_certificate_before_expiry(tmp_path, db_url, engine, admin_headers) -> None:  # type: ignore[no-untyped-def]
    settings = Settings(data_dir=tmp_path / "cp", database_url=db_url, fleet_enabled=False, device_certificates=True)  # type: ignore[call-arg]
    with ServerThread(create_app(settings, engine=engine), lifespan="on") as cp:
        created = httpx.post(
            f"{cp.url}/v1/devices", json={"name": f"x509-{uuid.uuid4().hex[:6]}"}, headers=admin_headers
        )
        device_id = created.json()["id"]
        agent_settings = load_settings(
            data_dir=tmp_path / "agent",
            control_plane_url=cp.url,
            enrollment_token=created.json()["enrollment_token"],
            x509_identity=True,
        )
        Agent(agent_settings).enroll()
        cert_file = agent_settings.client_cert_path
        _aged_copy(DeviceCA.load_or_create(settings.device_ca_path), cert_file)
        key_before = agent_settings.client_key_path.read_bytes()
        agent = Agent(agent_settings)  # a restart: the stored credential, an ageing certificate
        renewals: list[int] = []
        agent.identity_listeners.append(lambda: renewals.append(1))  # how the MQTT channel reloads its context
        try:
            agent.enroll()
        finally:
            agent.stop()
        assert renewals == [1]
        renewed = x509.load_pem_x509_certificate(cert_file.read_bytes())
        assert renewed.not_valid_after_utc - dt.datetime.now(dt.UTC) > dt.timedelta(days=80)
        assert renewed.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == device_id
        assert agent_settings.client_key_path.read_bytes() == key_before  # the key never changes hands
        _, csr = _csr()
        as_admin = httpx.post(
            f"{cp.url}/v1/devices/me/certificate", json={"csr_pem": csr.decode()}, headers=admin_headers
        )
        assert as_admin.status_code == 403 and as_admin.json()["code"] == "forbidden"


def test_a_device_holds_at_most_two_certificates(tmp_path: Path) -> None:
    ca = DeviceCA.load_or_create(tmp_path / "device-ca")
    issued = [x509.load_pem_x509_certificate(ca.issue(_csr()[1], device_id="edge-4")) for _ in range(3)]
    crl = x509.load_pem_x509_crl(ca.crl_file.read_bytes())
    revoked = [crl.get_revoked_certificate_by_serial_number(c.serial_number) is not None for c in issued]
    assert revoked == [True, False, False]  # the third revoked the oldest
    newest = ca.newest("edge-4")
    assert newest is not None and newest.serial_number == issued[-1].serial_number


def _revoked(ca_dir: Path, pem: str) -> bool:
    crl = x509.load_pem_x509_crl((ca_dir / "ca.crl").read_bytes())
    serial = x509.load_pem_x509_certificate(pem.encode()).serial_number
    return crl.get_revoked_certificate_by_serial_number(serial) is not None


def test_renewal_waits_for_half_the_lifetime_and_a_rotation_revokes_old_certificates(  # type: ignore[no-untyped-def]
    tmp_path, db_url, engine, admin_headers
) -> None:
    settings = Settings(data_dir=tmp_path / "cp", database_url=db_url, fleet_enabled=False, device_certificates=True)  # type: ignore[call-arg]
    with TestClient(create_app(settings, engine=engine)) as client:
        created = client.post("/v1/devices", json={"name": f"x509-{uuid.uuid4().hex[:6]}"}, headers=admin_headers)
        token = created.json()["enrollment_token"]
        enrolled = client.post("/v1/devices/enroll", json={"enrollment_token": token, "csr_pem": _csr()[1].decode()})
        device_id, old = enrolled.json()["device_id"], enrolled.json()["device_secret"]
        first = enrolled.json()["client_certificate_pem"]
        early = client.post("/v1/devices/me/certificate", json={"csr_pem": _csr()[1].decode()}, auth=(device_id, old))
        assert early.status_code == 409 and early.json()["code"] == "certificate_not_due"
        asked = client.post(f"/v1/devices/{device_id}/rotate-credential", json={"grace_s": 60}, headers=admin_headers)
        assert asked.status_code == 202
        new = client.post("/v1/devices/me/credential", auth=(device_id, old)).json()["device_secret"]
        assert not _revoked(settings.device_ca_path, first)  # the rotation is not complete yet
        assert client.get("/v1/devices/me", auth=(device_id, new)).status_code == 200  # completes it
        assert _revoked(settings.device_ca_path, first)
        renewed = client.post("/v1/devices/me/certificate", json={"csr_pem": _csr()[1].decode()}, auth=(device_id, new))
        assert renewed.status_code == 201, renewed.text
        assert not _revoked(settings.device_ca_path, renewed.json()["client_certificate_pem"])
