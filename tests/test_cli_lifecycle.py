"""The lifecycle commands against a real control plane on uvicorn: relabel, deprecate, recall, delete, gc."""

from __future__ import annotations

from pathlib import Path

import pytest

from control_plane.config import Settings
from slmops.cli.app import app as cli_app
from slmops.tinymodels.gguf_tiny import write_tiny_gguf
from tests.support.cli import (  # noqa: F401  (fixtures)
    Cli,
    admin_cli_fixture,
    cli_fixture,
    enrolled_device,
    one_line,
    server_url_fixture,
)


@pytest.fixture
def settings(tmp_path: Path, db_url: str) -> Settings:
    return Settings(data_dir=tmp_path / "data", database_url=db_url, fleet_enabled=False, blob_gc_grace_s=0)


def test_device_update_and_relabel(admin_cli: Cli, cli: Cli) -> None:
    device = enrolled_device(admin_cli, "edge-1", ["tier=main", "region=eu"])
    enrolled_device(admin_cli, "edge-2", ["tier=main", "region=us"])
    updated = cli.json("device", "update", device, "--name", "edge-one", "--label", "tier=canary")
    assert updated["name"] == "edge-one" and updated["labels"] == {"tier": "canary"}
    result = cli("device", "relabel", "--selector", "tier=main", "--set", "tier=canary", "--remove", "region")
    assert "1 device(s) matched 'tier=main'" in result.stdout
    assert {d["name"] for d in cli.json("device", "list", "--selector", "tier=canary")} == {"edge-one", "edge-2"}
    assert "give --name or at least one --label" in cli("device", "update", device, code=1).stderr
    rotating = admin_cli("device", "rotate-credential", device, "--grace-s", "60").stdout
    assert "fetches a new secret" in rotating
    assert cli.json("device", "show", device)["rotation_requested_at"]
    declined = admin_cli.runner.invoke(cli_app, ["device", "decommission", device], env=admin_cli.env, input="n\n")
    assert declined.exit_code == 1 and cli.json("device", "show", device)["status"] != "decommissioned"
    assert "is decommissioned" in admin_cli("device", "decommission", device, "--yes").stdout
    assert cli.json("device", "show", device)["status"] == "decommissioned"


def test_deprecate_recall_delete_and_gc(admin_cli: Cli, cli: Cli, tmp_path: Path) -> None:
    cli("model", "create", "m")
    for version in ("1", "2", "3"):
        cli("model", "push", "m", version, str(write_tiny_gguf(tmp_path / f"{version}.gguf", seed=20 + int(version))))
    device = enrolled_device(admin_cli, "edge-1", [])
    started = cli.json("rollout", "create", "m", "1", "--stage", "all:100%:0")
    assert started["devices"] == {"assigned": 1} and device
    assert "m@2 is deprecated" in cli("model", "deprecate", "m", "2").stdout
    refused = cli("model", "delete", "m", "1", code=1)
    assert "version_in_use" in refused.stderr and "edge-1" in refused.stderr
    assert "m@3 is recalled" in cli("model", "recall", "m", "3").stdout  # no device runs it: no rollout
    cli("model", "retention", "m", "--keep", "1")
    # 3 is the newest, 1 is meant to run on the device: only 2 goes.
    dry = one_line(cli("model", "gc", "--dry-run").stdout)
    assert "versions past retention: m@2; would free" in dry
    planned = admin_cli.json("model", "gc", "--dry-run")
    assert planned["bytes_freed"] == sum(b["size_bytes"] for b in planned["blobs"]) > 0
    assert admin_cli.json("model", "gc")["bytes_freed"] == planned["bytes_freed"]
    assert admin_cli.json("model", "gc", "--dry-run")["bytes_freed"] == 0


def test_rollout_create_takes_windows_rate_and_abort_threshold(admin_cli: Cli, cli: Cli, tmp_path: Path) -> None:
    cli("model", "create", "m")
    cli("model", "push", "m", "1", str(write_tiny_gguf(tmp_path / "1.gguf", seed=31)))
    enrolled_device(admin_cli, "edge-1", ["tz=Europe/Stockholm"])
    created = cli.json(
        "rollout", "create", "m", "1", "--window", "01:00-05:00", "--window", "23:00-23:30",
        "--timezone", "Europe/Berlin", "--max-per-minute", "30", "--abort-percent", "20", "--abort-min-failed", "3",
    )  # fmt: skip
    shown = admin_cli.json("rollout", "status", created["id"])
    assert shown["maintenance"]["windows"][1] == {"start": "23:00", "end": "23:30"}
    assert shown["maintenance"]["timezone"] == "Europe/Berlin" and shown["max_per_minute"] == 30
    assert shown["abort"] == {"failed_percent": 20, "min_failed": 3}
    bad = cli("rollout", "create", "m", "1", "--window", "01:00", code=1)
    assert "HH:MM-HH:MM" in bad.stderr
    zone = cli("rollout", "create", "m", "1", "--window", "01:00-02:00", "--timezone", "Mars/Base", code=1)
    assert "unknown timezone" in zone.stderr
