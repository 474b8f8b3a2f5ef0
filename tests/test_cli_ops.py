"""The operator CLI against a real control plane on uvicorn: registry, devices, errors, configuration."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from shared.net import free_port
from slmops.cli.app import app as cli_app
from slmops.cli.client import CHUNK, MultipartFile, resolve_config
from tests.support.cli import (  # noqa: F401  (fixtures)
    HARDWARE,
    Cli,
    FlakyLink,
    admin_cli_fixture,
    bearer,
    cli_fixture,
    one_line,
    server_url_fixture,
)


def test_push_streams_verifies_and_replays(cli: Cli, tiny_gguf: Path, tiny_gguf_other: Path) -> None:
    digest = hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    assert cli.json("model", "create", "tiny", "--description", "a test model")["name"] == "tiny"
    first = cli("model", "push", "tiny", "1", str(tiny_gguf), "--metrics", '{"agreement": 0.97}', "--notes", "base")
    assert "sha256" in first.stderr and "upload tiny.gguf" in first.stderr  # both progress bars ran
    assert f"pushed tiny@1: sha256 {digest} verified" in one_line(first.stdout)

    # The same push again (as after an interrupted run) replays under its Idempotency-Key.
    again = cli("model", "push", "tiny", "1", str(tiny_gguf), "--metrics", '{"agreement": 0.97}', "--notes", "base")
    assert "already holds this file" in again.stdout and "upload" not in again.stderr  # nothing sent twice
    child = json.loads(
        cli(
            "model", "push", "tiny", "2", str(tiny_gguf_other), "--parent", "1",
            "--relation", "finetuned_from", "--min-ram-mb", "512", "--cpu-arch", "x86_64,aarch64", "-o", "json",
        ).stdout
    )  # fmt: skip
    assert child["parent"] == {"model": "tiny", "version": "1", "relation": "finetuned_from"}
    assert child["artifacts"][0]["min_ram_mb"] == 512
    assert child["artifacts"][0]["cpu_arch"] == ["x86_64", "aarch64"]

    shown = cli.json("model", "show", "tiny")
    assert [v["version"] for v in shown["versions"]] == ["1", "2"]  # the replay made no duplicate
    v1 = cli.json("model", "show", "tiny", "1")
    assert v1["artifacts"][0]["sha256"] == digest
    assert v1["artifacts"][0]["size_bytes"] == tiny_gguf.stat().st_size
    assert v1["eval_metrics"] == {"agreement": 0.97} and v1["notes"] == "base"
    assert [m["name"] for m in cli.json("model", "list")] == ["tiny"]
    table = one_line(cli("model", "show", "tiny").stdout)
    assert "finetuned_from tiny@1" in table and digest[:16] in table


def test_push_of_other_bytes_under_a_taken_version_is_refused(cli: Cli, tiny_gguf: Path, tiny_gguf_other: Path) -> None:
    cli("model", "create", "tiny")
    cli("model", "push", "tiny", "1", str(tiny_gguf))
    refused = cli("model", "push", "tiny", "1", str(tiny_gguf_other), code=1)
    assert "version_exists" in refused.stderr
    assert "push the file under a new VERSION" in one_line(refused.stderr)
    versions = cli.json("model", "show", "tiny")["versions"]
    assert len(versions) == 1 and len(versions[0]["artifacts"]) == 1


def test_push_adds_a_variant_to_an_existing_version(cli: Cli, tiny_gguf: Path, tiny_gguf_other: Path) -> None:
    cli("model", "create", "tiny")
    missing = one_line(cli("model", "push", "tiny", "1", str(tiny_gguf), "--add-artifact", code=1).stderr)
    assert "version_not_found" in missing and "slmops model show MODEL" in missing
    cli("model", "push", "tiny", "1", str(tiny_gguf))
    variant = ["--add-artifact", "--quantization", "Q8_0", "--min-ram-mb", "2048", "--accelerators", "npu"]
    added = cli.json("model", "push", "tiny", "1", str(tiny_gguf_other), *variant)
    assert [(a["quantization"], a["min_ram_mb"], a["accelerators"]) for a in added["artifacts"]][-1] == (
        "Q8_0",
        2048,
        ["npu"],
    )
    again = cli("model", "push", "tiny", "1", str(tiny_gguf_other), *variant)
    assert "already holds this file" in again.stdout
    assert len(cli.json("model", "show", "tiny", "1")["artifacts"]) == 2


def test_push_retries_a_lost_response_and_the_server_replays_it(cli: Cli, server_url: str, tiny_gguf: Path) -> None:
    cli("model", "create", "tiny")
    link = FlakyLink(server_url, break_upload="response")
    try:
        result = cli("model", "push", "tiny", "1", str(tiny_gguf), SLMOPS_SERVER=link.url)
    finally:
        link.close()
    assert "upload interrupted" in result.stderr and "already holds this file" in result.stdout
    keys = {line for post in link.posts for line in post.split(b"\r\n") if line.lower().startswith(b"idempotency-key")}
    assert len(link.posts) == 2 and len(keys) == 1  # the retry sent the same key ...
    assert b"idempotent-replayed: true" in b"".join(link.responses).lower()  # ... and the server replayed
    assert [v["version"] for v in cli.json("model", "show", "tiny")["versions"]] == ["1"]


def test_push_cut_mid_upload_keeps_nothing_partial(cli: Cli, server_url: str, settings: Any, tiny_gguf: Path) -> None:
    cli("model", "create", "tiny")
    link = FlakyLink(server_url, break_upload="request", cut_after=tiny_gguf.stat().st_size // 2)
    try:
        result = cli("model", "push", "tiny", "1", str(tiny_gguf), "-o", "json", SLMOPS_SERVER=link.url)
    finally:
        link.close()
    assert "upload interrupted" in result.stderr and len(link.posts) == 2
    assert b"idempotent-replayed" not in b"".join(link.responses).lower()  # the cut upload created nothing
    pushed = json.loads(result.stdout)
    assert pushed["artifacts"][0]["sha256"] == hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    stored = [p for p in settings.blob_dir.rglob("*") if p.is_file()]
    assert [p.stat().st_size for p in stored] == [tiny_gguf.stat().st_size]  # no half file left behind


def test_create_commands_retry_a_lost_answer_without_doing_it_twice(
    cli: Cli, admin_cli: Cli, server_url: str, tiny_gguf: Path
) -> None:
    cli("model", "create", "tiny")
    cli("model", "push", "tiny", "1", str(tiny_gguf))
    device = _through_lossy_link(admin_cli, server_url, b"POST /v1/devices ", "device", "create", "edge-1")
    # The replayed answer carries the enrollment token the server made the first time: it works.
    enrolled = httpx.post(
        f"{server_url}/v1/devices/enroll", json={"enrollment_token": device["enrollment_token"], "hardware": HARDWARE}
    )
    assert enrolled.status_code == 201, enrolled.text
    rollout = _through_lossy_link(cli, server_url, b"POST /v1/rollouts ", "rollout", "create", "tiny", "1")
    assert rollout["state"] == "running"
    assert len(cli.json("device", "list")) == 1 and len(cli.json("rollout", "list")) == 1


def _through_lossy_link(cli: Cli, server_url: str, post: bytes, *command: str) -> Any:
    link = FlakyLink(server_url, break_upload="response", post=post)
    try:
        result = json.loads(cli(*command, "-o", "json", SLMOPS_SERVER=link.url).stdout)
    finally:
        link.close()
    assert link.broken.is_set() and len(link.posts) == 2  # the first answer was lost, then a retry
    assert b"idempotent-replayed: true" in b"".join(link.responses).lower()
    return result


def test_device_create_list_show(admin_cli: Cli, cli: Cli) -> None:
    created = admin_cli("device", "create", "edge-1", "--label", "region=eu", "--label", "tier=canary")
    output = one_line(created.stdout)
    assert "enrollment token" in output and "SLMOPS_AGENT_ENROLLMENT_TOKEN" in output
    second = admin_cli.json("device", "create", "edge-2", "-l", "region=us")
    assert second["enrollment_token"] and second["labels"] == {"region": "us"}

    eu = cli.json("device", "list", "--selector", "region=eu")
    assert [d["name"] for d in eu] == ["edge-1"]
    assert {d["name"] for d in cli.json("device", "list")} == {"edge-1", "edge-2"}
    assert cli.json("device", "list", "--status", "online") == []
    assert len(cli.json("device", "list", "--limit", "1")) == 1
    assert "1 devices (more left: --limit 0 lists all)" in cli("device", "list", "--limit", "1").stdout
    fresh = admin_cli.json("device", "reissue-token", second["id"])
    assert fresh["enrollment_token"] != second["enrollment_token"]
    stale = httpx.post(
        admin_cli.env["SLMOPS_SERVER"] + "/v1/devices/enroll",
        json={"enrollment_token": second["enrollment_token"], "hardware": HARDWARE},
    )
    assert stale.status_code == 401  # the reissued token replaced the first one
    shown = cli.json("device", "show", second["id"])
    assert shown["name"] == "edge-2" and "enrollment_token" not in shown
    assert "region=us" in cli("device", "show", second["id"]).stdout


def test_errors_say_what_to_do_next(cli: Cli, server_url: str, viewer_headers: dict[str, str], tiny_gguf: Path) -> None:
    unauthenticated = cli("model", "list", code=1, SLMOPS_TOKEN="not-a-token")
    message = one_line(unauthenticated.stderr)
    assert "unauthenticated" in message and "slmops token create --role operator" in message

    missing = one_line(cli("model", "show", "nope", code=1).stderr)
    assert "model_not_found" in missing and "slmops model list" in missing

    forbidden = cli("model", "create", "x", code=1, SLMOPS_TOKEN=bearer(viewer_headers))
    assert "forbidden" in forbidden.stderr and "--role operator" in one_line(forbidden.stderr)

    unknown = one_line(cli("rollout", "status", "does-not-exist", code=1).stderr)
    assert "rollout_not_found" in unknown and "slmops rollout list" in unknown

    bad_stage = one_line(cli("rollout", "create", "m", "1", "--stage", "canary", code=1).stderr)
    assert "name:percent%[:bake_s]" in bad_stage

    cli("model", "create", "lonely")
    no_devices = one_line(cli("rollout", "create", "lonely", "1", code=1).stderr)
    assert "version_not_found" in no_devices  # the version is checked first
    cli("model", "push", "lonely", "1", str(tiny_gguf))
    no_devices = one_line(cli("rollout", "create", "lonely", "1", "--selector", "region=mars", code=1).stderr)
    assert "validation_error" in no_devices and "slmops device list --selector 'region=mars'" in no_devices

    bad_since = one_line(cli("telemetry", "version", "m", "1", "--since", "yesterday", code=1).stderr)
    assert "is not a duration like 30s, 5m, 6h or 2d" in bad_since

    no_server = cli("model", "list", code=1, SLMOPS_SERVER=f"http://127.0.0.1:{free_port()}")
    assert "connection_failed" in no_server.stderr and "slmops server" in no_server.stderr


def test_server_and_token_from_the_config_file(
    server_url: str, operator_headers: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "cli.toml"
    config.write_text(f'server = "{server_url}/"\ntoken = "{bearer(operator_headers)}"\n')
    for name in ("SLMOPS_SERVER", "SLMOPS_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLMOPS_CLI_CONFIG", str(config))
    assert resolve_config() == resolve_config(None, None)
    assert resolve_config().server == server_url
    result = CliRunner().invoke(cli_app, ["model", "list", "-o", "json"], env={"SLMOPS_CLI_CONFIG": str(config)})
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout) == []
    # Environment beats the file, flags beat both.
    monkeypatch.setenv("SLMOPS_TOKEN", "from-env")
    assert resolve_config().token == "from-env"
    assert resolve_config("http://elsewhere:1", "from-flag") == type(resolve_config())(
        "http://elsewhere:1", "from-flag"
    )


def test_login_checks_the_token_then_saves_it_for_later_commands(
    server_url: str, operator_headers: dict[str, str], tmp_path: Path
) -> None:
    config = tmp_path / "conf" / "cli.toml"
    runner, env = CliRunner(), {"SLMOPS_CLI_CONFIG": str(config), "SLMOPS_SERVER": None, "SLMOPS_TOKEN": None}
    refused = runner.invoke(cli_app, ["login", "--server", server_url, "--token", "wrong"], env=env)
    assert refused.exit_code == 1 and "unauthenticated" in refused.stderr and not config.exists()
    token = bearer(operator_headers)
    saved = runner.invoke(cli_app, ["login", "--server", server_url + "/", "--token", token], env=env)
    assert saved.exit_code == 0, saved.stderr
    assert config.stat().st_mode & 0o777 == 0o600
    listed = runner.invoke(cli_app, ["model", "list", "-o", "json"], env=env)
    assert listed.exit_code == 0 and json.loads(listed.stdout) == []


def test_multipart_body_streams_in_bounded_chunks(tmp_path: Path) -> None:
    path = tmp_path / "blob.bin"
    path.write_bytes(bytes(range(256)) * (3 * CHUNK // 256 + 7))
    body = MultipartFile(path, {"version": "1", "sha256": "0" * 64})
    seen: list[int] = []
    chunks = list(body.iter_chunks(seen.append))
    assert max(len(c) for c in chunks) <= CHUNK  # never the whole file in memory
    assert sum(seen) == path.stat().st_size
    raw = b"".join(chunks)
    assert len(raw) == len(body)
    assert path.read_bytes() in raw and raw.endswith(f"--{body.boundary}--\r\n".encode())
