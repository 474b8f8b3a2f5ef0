"""`pip install 'slmops[agent]'` from a wheel: none of the server's packages, and the agent it installs
enrolls with a real control plane and comes online over MQTT, run from that venv alone."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlmodel import Session

from control_plane import db
from control_plane.api.main import create_app
from control_plane.config import Settings
from control_plane.models import Role
from control_plane.services import auth
from shared.net import free_port
from tests.support.agent import AgentProcess
from tests.support.agent_venv import REPO, build_wheel, clean_env, create_venv, installed_distributions, run_python
from tests.support.server_thread import ServerThread
from tests.support.waiting import wait_for

pytestmark = pytest.mark.slow

# The control plane's, the operator CLI's and the model runtimes' packages: a device gets none of them.
NOT_ON_A_DEVICE = {
    "sqlmodel", "sqlalchemy", "alembic", "psycopg", "psycopg-binary", "amqtt", "jinja2", "python-multipart",
    "swagger-ui-py", "boto3", "typer", "rich", "onnx", "onnxruntime", "numpy", "gguf", "llama-cpp-python",
}  # fmt: skip


@pytest.fixture(scope="module")
def agent_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("agent-install")
    return create_venv(work / "venv", build_wheel(work))


@pytest.fixture
def control_plane(tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """A control plane with its fleet runtime and embedded broker, on its own SQLite database."""
    url = f"sqlite:///{tmp_path / 'cp.db'}"
    db.upgrade(url)
    engine = db.make_engine(url)
    settings = Settings(  # type: ignore[call-arg]
        data_dir=tmp_path / "cp", database_url=url, mqtt_port=free_port(), controller_tick_s=0.2,
        mqtt_topic_prefix=f"slmops-test/{uuid.uuid4().hex[:8]}",
    )  # fmt: skip
    with Session(engine) as session:
        _, token = auth.create_token(session, name="admin", role=Role.admin)
        session.commit()
    try:
        with ServerThread(create_app(settings, engine=engine), lifespan="on") as server:
            yield server.url, {"Authorization": f"Bearer {token}"}
    finally:
        engine.dispose()


def test_the_agent_extra_installs_no_server_package(agent_venv: Path) -> None:
    installed = installed_distributions(agent_venv)
    assert {"slmops", "paho-mqtt", "fastapi", "uvicorn", "pydantic-settings"} <= installed
    assert installed & NOT_ON_A_DEVICE == set()
    where = run_python(agent_venv, "import edge_agent; print(edge_agent.__file__)")
    assert where.startswith(str(agent_venv)), where  # the wheel's code, not this checkout's
    # The operator CLI is an extra of its own: without it `slmops` says which one.
    cli = subprocess.run([agent_venv / "bin/slmops", "--help"], capture_output=True, text=True, env=clean_env())
    assert cli.returncode == 2 and "slmops[cli]" in cli.stderr


def test_the_installed_package_ships_the_systemd_unit(agent_venv: Path) -> None:
    """deploy/install-agent.sh installs the unit from the package, with no checkout on the device."""
    unit = "files('edge_agent').joinpath('systemd/slmops-agent.service')"
    shipped = run_python(agent_venv, f"from importlib.resources import files; print({unit}.read_text(), end='')")
    assert shipped == (REPO / "deploy/systemd/slmops-agent.service").read_text()
    assert "ExecStart=/opt/slmops/venv/bin/python -m edge_agent --config" in shipped


# Each way the daemon is started: the console script, systemd's ExecStart, the CLI's fast path.
ENTRY_POINTS = {
    "slmops-agent": ["slmops-agent"],
    "python -m edge_agent": ["python", "-m", "edge_agent"],
    "slmops agent": ["slmops", "agent"],
}


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_the_agent_only_install_enrolls_and_comes_online(
    agent_venv: Path,
    control_plane: tuple[str, dict[str, str]],
    entry: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    base, admin = control_plane
    device = httpx.post(f"{base}/v1/devices", json={"name": "edge-only"}, headers=admin).json()
    agent = AgentProcess(tmp_path / "agent", control_plane_url=base, enrollment_token=device["enrollment_token"])
    program, *args = ENTRY_POINTS[entry]
    agent.command = [str(agent_venv / "bin" / program), *args, "--config", str(agent.config)]
    agent.cwd = tmp_path
    monkeypatch.delenv("PYTHONPATH", raising=False)
    agent.start()
    try:
        assert agent.state()["device_id"] == device["id"]

        def online() -> dict | None:  # type: ignore[type-arg]
            row = httpx.get(f"{base}/v1/devices/{device['id']}", headers=admin).json()
            return row if row["status"] == "online" else None

        wait_for(lambda: online() is not None, what="the agent online over MQTT", proc=agent.proc, log=agent.log)
        row = online()
        assert row is not None and row["enrolled_at"] and row["last_seen"]
        assert row["hardware"].get("ram_mb", 0) > 0  # the agent's own report of its machine
    finally:
        agent.stop()
