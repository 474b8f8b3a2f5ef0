"""deploy/compose.yaml, the production shape for Docker users: parsed and checked, never run here
(no images can be pulled on the test machines)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from control_plane.config import Settings
from tests.support.haproxy import CONFIG as HAPROXY_CONFIG
from tests.support.haproxy import haproxy_binary

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
DOTENV = {
    "PUBLIC_HOST": "slmops.example.com",
    "POSTGRES_PASSWORD": "pg-secret",
    "MINIO_ROOT_PASSWORD": "minio-secret",
    "CP_MQTT_PASSWORD": "mqtt-secret",
}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return dict(yaml.safe_load((DEPLOY / "compose.yaml").read_text()))


def _env(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment as compose hands it over, with the .env values filled in."""
    return {k: re.sub(r"\$\{(\w+)\}", lambda m: DOTENV[m.group(1)], str(v)) for k, v in service["environment"].items()}


def _replicas(compose: dict[str, Any]) -> dict[str, dict[str, str]]:
    return {name: _env(s) for name, s in compose["services"].items() if name.startswith("control-plane-")}


def test_compose_describes_the_production_shape(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"postgres", "minio", "haproxy", "nats-1", "nats-2", "nats-3"} <= set(services)
    assert len(_replicas(compose)) == 2
    for node in ("nats-1", "nats-2", "nats-3"):
        assert services[node]["command"] == ["-c", f"/etc/nats/{node}.conf"]  # deploy/nats/<node>.conf
    assert "./haproxy/haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro" in services["haproxy"]["volumes"]


def test_every_replica_setting_is_one_the_control_plane_reads(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Settings ignores unknown variables, so a misspelt name would be lost silently."""
    fields = set(Settings.model_fields)
    replicas = _replicas(compose)
    for env in replicas.values():
        names = {k.removeprefix("SLMOPS_").lower() for k in env if k.startswith("SLMOPS_")}
        assert names <= fields, names - fields
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        settings = Settings()
        assert (settings.environment, settings.blob_store, settings.host) == ("production", "s3", "127.0.0.1")
        assert settings.public_url == "https://slmops.example.com:8443"
    shared_keys = {(e["SLMOPS_RELEASE_KEY_FILE"], e["SLMOPS_ROOT_METADATA_FILE"]) for e in replicas.values()}
    assert len(shared_keys) == 1  # devices verify whichever replica leads
    for own in ("SLMOPS_PORT", "SLMOPS_MQTT_CLIENT_ID", "SLMOPS_DATABASE_URL"):  # one broker session each
        assert len({e[own] for e in replicas.values()}) == len(replicas), own


def test_haproxy_balances_exactly_the_replicas(compose: dict[str, Any]) -> None:
    haproxy = _env(compose["services"]["haproxy"])
    backends = {v for k, v in haproxy.items() if k.startswith("SLMOPS_REPLICA_")}
    assert backends == {f"127.0.0.1:{e['SLMOPS_PORT']}" for e in _replicas(compose).values()}
    haproxy.pop("SLMOPS_LB_BIND_OPTIONS")  # its certificate exists on the Docker host only
    checked = subprocess.run(
        [haproxy_binary(), "-c", "-f", str(HAPROXY_CONFIG)], env=haproxy, capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_nats_nodes_read_the_shipped_configs(compose: dict[str, Any]) -> None:
    if not (DEPLOY / "nats").is_dir():
        pytest.skip("deploy/nats/ arrives with the clustered broker tier (issue 24, branch nats)")
    for node in ("nats-1", "nats-2", "nats-3"):
        assert (DEPLOY / "nats" / f"{node}.conf").is_file()
        text = (DEPLOY / "nats" / f"{node}.conf").read_text()
        store = re.search(r'store_dir:\s*"?([^"\s]+)', text)
        pid = re.search(r'pid_file:\s*"?([^"\s]+)', text)
        assert store and pid
        mounts = [v.split(":")[1] for v in compose["services"][node]["volumes"]]
        assert store.group(1) in mounts and str(Path(pid.group(1)).parent) in mounts
