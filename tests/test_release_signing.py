"""Signed releases from the control plane: keys, one release per version and step, re-signing, and
the configuration errors either side refuses to start with."""

from __future__ import annotations

import stat
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlmodel import Session, select
from typer.testing import CliRunner

import slmops.cli.keys  # noqa: F401  (registers the commands)
from control_plane.api.main import create_app
from control_plane.config import Settings
from control_plane.models import DesiredStateRow
from control_plane.rollouts import assign
from control_plane.rollouts.resign import resign_due
from control_plane.trust import releases
from control_plane.trust.releases import ReleaseSigner, SigningConfigError, read_root_chain
from shared.desired import DesiredState
from shared.releases import Release, Root, check_desired, update_root, verify_release
from slmops.cli.app import app as cli_app
from tests.support.assign import assign_version
from tests.support.fleet import enroll_devices, upload_version
from tests.support.waiting import wait_for


def _verified(state: DesiredState, chain_file: Path, *, highest: int | None = None) -> Release:
    chain = read_root_chain(chain_file)
    root = update_root(Root.model_validate(chain[0].signed), state.roots, now=datetime.now(UTC))
    assert state.release is not None
    release = verify_release(root, state.release, now=datetime.now(UTC), highest_serial=highest)
    check_desired(release, state)
    return release


def _upload(client: TestClient, headers: dict[str, str], path: Path) -> None:
    assert client.post("/v1/models", json={"name": "m"}, headers=headers).status_code == 201
    upload_version(client, headers, "m", "1.0", path)


def test_keys_init_writes_private_keys_for_the_owner_only_and_never_overwrites(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(cli_app, ["keys", "init", "--out", str(tmp_path / "keys")])
    assert result.exit_code == 0, result.output
    for name in ("root.key", "release.key"):
        assert stat.S_IMODE((tmp_path / "keys" / name).stat().st_mode) == 0o600
    assert Root.model_validate(read_root_chain(tmp_path / "keys" / "root.json")[0].signed).version == 1
    again = runner.invoke(cli_app, ["keys", "init", "--out", str(tmp_path / "keys")])
    assert again.exit_code != 0 and "not overwriting" in again.output
    rotated = runner.invoke(cli_app, ["keys", "rotate-root", "--dir", str(tmp_path / "keys"), "--new-root-key"])
    assert rotated.exit_code == 0, rotated.output
    chain = read_root_chain(tmp_path / "keys" / "root.json")
    first = Root.model_validate(chain[0].signed)
    assert update_root(first, chain, now=datetime.now(UTC)).version == 2


def test_a_release_key_outside_the_root_is_refused_at_start(tmp_path: Path, db_url: str, engine: sa.Engine) -> None:
    for name in ("a", "b"):
        releases.init_keys(tmp_path / name)
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=db_url,
        fleet_enabled=False,
        release_key_file=tmp_path / "a" / "release.key",
        root_metadata_file=tmp_path / "b" / "root.json",
    )
    with pytest.raises(SigningConfigError, match="not a release key"):
        create_app(settings, engine=engine)
    with pytest.raises(SigningConfigError, match="production"):
        ReleaseSigner.from_settings(settings.model_copy(update={"release_key_file": None, "root_metadata_file": None,
                                                               "environment": "production"}))  # fmt: skip


def test_production_refuses_to_turn_signing_off(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="SLMOPS_RELEASE_SIGNING"):
        Settings(data_dir=tmp_path, database_url="postgresql://x@h/db", environment="production", release_signing=False)


def test_desired_states_name_a_signed_release_and_a_rollback_is_a_higher_serial(
    client: TestClient, admin_headers: dict[str, str], engine: sa.Engine, tiny_gguf: Path, settings: Settings
) -> None:
    _upload(client, admin_headers, tiny_gguf)
    (device,) = enroll_devices(client, admin_headers, [("d1", {})])
    chain_file = settings.data_dir / "keys" / "root.json"  # development keys, made at start
    state = DesiredState.model_validate(assign_version(engine, device["device_id"], model="m", version="1.0"))
    first = _verified(state, chain_file)
    assert (first.model, first.version, first.artifacts[0].sha256) == ("m", "1.0", state.artifact.sha256)
    restored = DesiredState.model_validate(assign.restore_desired(state.model_dump(mode="json")))
    assert _verified(restored, chain_file, highest=first.serial).serial > first.serial
    withdrawn = DesiredState.model_validate(assign.unload_desired(state.model_dump(mode="json")))
    assert withdrawn.unload and _verified(withdrawn, chain_file).unload


def test_releases_near_expiry_are_signed_again_once_for_every_device(
    client: TestClient, admin_headers: dict[str, str], engine: sa.Engine, tiny_gguf: Path, settings: Settings
) -> None:
    _upload(client, admin_headers, tiny_gguf)
    devices = enroll_devices(client, admin_headers, [("d1", {}), ("d2", {})])
    payloads = [assign_version(engine, d["device_id"], model="m", version="1.0") for d in devices]
    signer = releases.current()
    assert signer is not None
    with Session(engine) as session:
        assert resign_due(session, signer) == 0  # fresh: nothing to do
        later = datetime.now(UTC) + timedelta(seconds=signer.expiry_s * 0.75)
        assert resign_due(session, signer, now=later) == 2
        session.commit()
        rows = list(session.exec(select(DesiredStateRow)))
    serials = {DesiredState.model_validate(row.payload).release.signed["serial"] for row in rows}  # type: ignore[union-attr]
    assert len(serials) == 1 and serials.pop() > payloads[0]["release"]["signed"]["serial"]
    assert all(row.message_id not in {p["message_id"] for p in payloads} for row in rows)
    renewed = DesiredState.model_validate(rows[0].payload)
    assert _verified(renewed, settings.data_dir / "keys" / "root.json").expires > datetime.now(UTC) + timedelta(
        seconds=signer.expiry_s * 0.9
    )


@pytest.mark.mosquitto
def test_the_running_control_plane_re_signs_and_republishes_before_expiry(
    tmp_path: Path, db_url: str, engine: sa.Engine, tiny_gguf: Path, empty_tables: sa.Engine
) -> None:
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=db_url,
        mqtt_url="mqtt://127.0.0.1:1883",
        mqtt_topic_prefix=f"slmops-test/{uuid.uuid4().hex[:10]}",
        mqtt_client_id=f"cp-{uuid.uuid4().hex[:8]}",
        controller_tick_s=0.1,
        release_expiry_s=4,
    )
    with TestClient(create_app(settings, engine=engine)) as client:
        admin = {"Authorization": f"Bearer {_admin_token(engine)}"}
        _upload(client, admin, tiny_gguf)
        (device,) = enroll_devices(client, admin, [("d1", {})])
        first = assign_version(engine, device["device_id"], model="m", version="1.0")

        def republished() -> DesiredStateRow | None:
            with Session(engine) as session:
                row = session.get(DesiredStateRow, device["device_id"])
            renewed = (
                row is not None and row.payload["release"]["signed"]["serial"] > first["release"]["signed"]["serial"]
            )
            return row if renewed and row is not None and row.published_message_id == row.message_id else None

        row = wait_for(republished, timeout_s=30, what="a re-signed, published desired state")
    renewed = DesiredState.model_validate(row.payload)
    assert renewed.artifact == DesiredState.model_validate(first).artifact
    assert _verified(renewed, settings.data_dir / "keys" / "root.json").expires > datetime.now(UTC)


def _admin_token(engine: sa.Engine) -> str:
    from control_plane.models import Role
    from control_plane.services import auth

    with Session(engine) as session:
        _, plaintext = auth.create_token(session, name="admin", role=Role.admin)
        session.commit()
    return plaintext


def test_an_agent_with_an_unreadable_root_refuses_to_start(tmp_path: Path) -> None:
    from edge_agent.agent import Agent
    from edge_agent.settings import AgentSettings, ConfigError

    (tmp_path / "root.json").write_text('[{"signed": {"version": 1}, "signatures": "not a list"}]')
    agent = Agent(AgentSettings(data_dir=tmp_path / "agent", root_metadata_file=tmp_path / "root.json"))
    with pytest.raises(ConfigError, match="trusted root"):
        agent.enroll()
