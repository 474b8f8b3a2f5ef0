"""The agent as a process: settings, enrollment, sd_notify, the `slmops agent` CLI, the watched file."""

from __future__ import annotations

import configparser
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from edge_agent.settings import ConfigError, load_settings
from slmops.tinymodels import write_tiny_gguf
from tests.support.agent import REPO, AgentProcess, ArtifactServer, desired_for
from tests.support.server_thread import ServerThread
from tests.support.waiting import wait_for

SLMOPS = str(Path(sys.executable).with_name("slmops"))


@pytest.fixture
def artifacts() -> Iterator[ArtifactServer]:
    server = ArtifactServer()
    with ServerThread(server.app()) as thread:
        server.port = thread.port
        yield server


@pytest.fixture(scope="module")
def gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("m") / "tiny.gguf", seed=21)


def test_settings_come_from_toml_overridden_by_environment(tmp_path, monkeypatch) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(f'data_dir = "{tmp_path}/d"\nlisten_port = 9001\ndisk_quota_mb = 100\n')
    monkeypatch.setenv("SLMOPS_AGENT_LISTEN_PORT", "9002")
    settings = load_settings(config)
    assert settings.listen_port == 9002 and settings.disk_quota_mb == 100
    assert settings.data_dir == tmp_path / "d" and settings.listen_host == "127.0.0.1"


def test_invalid_settings_name_the_field(tmp_path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text("keep_versions = 1\nlisten_prot = 80\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(config)
    assert "keep_versions" in str(caught.value) or "listen_prot" in str(caught.value)
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "missing.toml")
    config.write_text('enrollment_token = "slmops_enr_abcdefgh"\n')
    with pytest.raises(ConfigError, match="control_plane_url"):
        load_settings(config)


def test_cli_reports_bad_config_and_exits_2(tmp_path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text("listen_port = 'not a port'\n")
    result = subprocess.run(
        [SLMOPS, "agent", "--config", str(config)],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "listen_port" in result.stderr


def test_importing_the_daemon_loads_no_inference_runtime() -> None:
    code = (
        "import sys, edge_agent.daemon, edge_agent.agent, edge_agent.api.app\n"
        "heavy = [m for m in ('llama_cpp', 'onnxruntime', 'control_plane') if m in sys.modules]\n"
        "print(','.join(heavy))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_first_start_enrolls_and_later_starts_reuse_the_credential(artifacts, gguf, tmp_path) -> None:
    artifacts.enrollment_tokens["slmops_enr_test-token-1"] = "dev-1"
    sha = artifacts.add_file(gguf)
    agent = AgentProcess(
        tmp_path / "data", control_plane_url=artifacts.url, enrollment_token="slmops_enr_test-token-1"
    ).start()
    try:
        credential = agent.data_dir / "credential.json"
        assert credential.stat().st_mode & 0o777 == 0o600
        assert agent.state()["device_id"] == "dev-1"
        # Artifacts now need the device credential (HTTP Basic), which the agent sends.
        assert agent.apply(desired_for(artifacts, sha)).json()["phase"] == "on_trial"
        assert artifacts.requests[-1]["auth"].startswith("Basic ")
    finally:
        agent.stop()
    agent.start()  # the token was one-time: only the stored credential can make this start work
    try:
        assert agent.state()["device_id"] == "dev-1"
        agent.wait_ready()
    finally:
        agent.stop()


def test_start_removes_temp_files_left_by_a_killed_write(artifacts, tmp_path) -> None:
    data, elsewhere = tmp_path / "data", tmp_path / "watched"
    data.mkdir()
    elsewhere.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # a process that has exited, as a killed writer has
    # What write_atomic leaves when kill -9 lands between creating its temp file and the rename,
    # beside the state file and beside a watched file configured outside the data dir.
    leftovers = [data / f".state.json.{dead_pid}.tmp", elsewhere / f".desired.json.{dead_pid}.tmp"]
    for leftover in leftovers:
        leftover.write_text("{half a st")
    live = data / f".desired.json.{os.getpid()}.tmp"  # a writer still running (this test): left to finish
    live.write_text("{in progress")
    unrelated = data / ".notes.tmp"  # not write_atomic's (no process id): left alone
    unrelated.write_text("mine")
    agent = AgentProcess(data, control_plane_url=artifacts.url, desired_file=str(elsewhere / "desired.json")).start()
    try:
        assert not any(p.exists() for p in leftovers)
        assert live.read_text() == "{in progress"
        assert unrelated.read_text() == "mine"
        assert "left by a write that did not finish" in agent.log.read_text()
    finally:
        agent.stop()


def test_refused_enrollment_stops_the_agent_with_the_code(artifacts, tmp_path) -> None:
    agent = AgentProcess(tmp_path / "data", control_plane_url=artifacts.url, enrollment_token="slmops_enr_unknown")
    with pytest.raises(AssertionError, match="enrollment_token_invalid"):
        agent.start()
    assert agent.proc is not None and agent.proc.returncode == 2
    assert not (agent.data_dir / "credential.json").exists()


def test_sd_notify_ready_and_watchdog(tmp_path) -> None:
    address = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(address)
        listener.settimeout(30)
        agent = AgentProcess(tmp_path / "data")
        agent.start(env_extra={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "400000"})
        try:
            received = {listener.recv(256).decode() for _ in range(3)}
            assert {"READY=1", "WATCHDOG=1"} <= received
        finally:
            agent.stop()


def test_cli_apply_status_rollback_against_a_running_agent(artifacts, gguf, tmp_path) -> None:
    first = artifacts.add_file(gguf)
    second = artifacts.add_file(write_tiny_gguf(tmp_path / "other.gguf", seed=22))
    agent = AgentProcess(tmp_path / "data", control_plane_url=artifacts.url).start()

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        command = [SLMOPS, "agent", *args, "--config", str(agent.config)]
        return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120, check=False)

    try:
        for sha, version in ((first, "1"), (second, "2")):
            desired = tmp_path / f"desired-{version}.json"
            desired.write_text(desired_for(artifacts, sha, version=version).model_dump_json())
            applied = cli("apply", "--desired", str(desired))
            assert applied.returncode == 0, applied.stderr
            assert "phase:    on_trial" in applied.stdout
        status = cli("status")
        assert f"current:  tiny 2 ({second[:12]})" in status.stdout
        rolled = cli("rollback")
        assert rolled.returncode == 0 and "phase:    rolled_back" in rolled.stdout
        assert httpx.get(f"{agent.url}/readyz").json()["version"] == "1"
        broken = tmp_path / "broken.json"
        broken.write_text('{"model": "x"}')
        refused = cli("apply", "--desired", str(broken))
        assert refused.returncode == 2 and "not a valid desired state" in refused.stderr
    finally:
        agent.stop()


def test_apply_without_a_running_agent_writes_the_watched_file(artifacts, gguf, tmp_path) -> None:
    sha = artifacts.add_file(gguf)
    agent = AgentProcess(tmp_path / "data", control_plane_url=artifacts.url)
    desired = tmp_path / "desired.json"
    desired.write_text(desired_for(artifacts, sha, version="7").model_dump_json())
    command = [SLMOPS, "agent", "apply", "--desired", str(desired), "--config", str(agent.config)]
    offline = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert offline.returncode == 0 and "agent not running" in offline.stdout
    assert (agent.data_dir / "desired.json").is_file()
    agent.start()
    try:
        assert agent.wait_ready()["version"] == "7"
    finally:
        agent.stop()


def test_systemd_unit_is_hardened_notify_service() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(REPO / "deploy/systemd/slmops-agent.service")
    service = unit["Service"]
    assert service["Type"] == "notify" and int(service["WatchdogSec"]) > 0
    assert service["Restart"] == "on-failure"
    assert service["User"] == "slmops-agent"
    assert service["NoNewPrivileges"] == "yes" and service["ProtectSystem"] == "strict"
    assert service["PrivateTmp"] == "yes" and service["ReadWritePaths"] == "/var/lib/slmops-agent"
    assert service["ExecStart"].endswith("python -m edge_agent --config /etc/slmops/agent.toml")
    assert os.access(REPO / "deploy/install-agent.sh", os.X_OK)


def test_slmops_agent_cli_runs_the_daemon_with_json_logs(tmp_path) -> None:
    agent = AgentProcess(tmp_path / "data")
    agent.command = [SLMOPS, "agent", "--config", str(agent.config), "--log-json"]
    agent.start()
    assert httpx.get(f"{agent.url}/readyz").status_code == 503
    agent.stop()
    lines = [line for line in agent.log.read_text().splitlines() if line.strip()]
    parsed = [json.loads(line) for line in lines]
    assert any(entry["msg"].startswith("agent listening") for entry in parsed)


def test_unparsable_desired_file_is_logged_and_ignored(artifacts, gguf, tmp_path) -> None:
    agent = AgentProcess(tmp_path / "data", control_plane_url=artifacts.url).start()
    try:
        (agent.data_dir / "desired.json").write_text("{ not json")
        wait_for(lambda: "ignoring desired-state file" in agent.log.read_text(), what="the bad file to be seen")
        assert httpx.get(f"{agent.url}/healthz").status_code == 200
    finally:
        agent.stop()
