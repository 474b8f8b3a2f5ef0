"""A LoRA adapter rolled out to real agents through the real control plane, Mosquitto and llama.cpp:
a device that already runs the base downloads only the adapter's bytes, the others base plus adapter."""

from __future__ import annotations

import base64
import json
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from control_plane.api.main import create_app
from control_plane.config import Settings
from slmops.tinymodels import write_tiny_gguf, write_tiny_lora_gguf
from tests.support.agent import AgentProcess
from tests.support.server_thread import ServerThread
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.llama, pytest.mark.mosquitto, pytest.mark.slow]

MOSQUITTO = "mqtt://127.0.0.1:1883"
# Only the activation gate decides: no telemetry is needed for a stage to pass.
ACTIVATION_ONLY = {
    "stages": [{"name": "all", "percent": 100, "min_bake_s": 0}],
    "gates": {"max_p95_latency_ratio": None, "max_error_rate": None, "min_activated_fraction": 1.0},
}


class ArtifactBytes:
    """ASGI wrapper counting the artifact bytes the control plane sends, per (device id, sha256)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.sent: Counter[tuple[str, str]] = Counter()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith("/v1/artifacts/"):
            await self.app(scope, receive, send)
            return
        auth = dict(scope["headers"]).get(b"authorization", b"").decode()
        device = ""
        if auth.lower().startswith("basic "):
            device = base64.b64decode(auth[6:]).decode().partition(":")[0]
        key = (device, path.rsplit("/", 1)[1])

        async def counting(message: Message) -> None:
            if message["type"] == "http.response.body":
                self.sent[key] += len(message.get("body", b""))
            await send(message)

        await self.app(scope, receive, counting)


@pytest.fixture
def fleet(tmp_path: Path, db_url: str, engine: Any, app: Any) -> Iterator[tuple[str, ArtifactBytes]]:
    settings = Settings(
        data_dir=tmp_path / "cp",
        database_url=db_url,
        mqtt_url=MOSQUITTO,
        mqtt_topic_prefix=f"slmops-test/{uuid.uuid4().hex[:10]}",
        mqtt_client_id=f"cp-{uuid.uuid4().hex[:8]}",
        controller_tick_s=0.1,
    )
    counted = ArtifactBytes(create_app(settings, engine=engine))
    with ServerThread(counted, lifespan="on") as server:
        yield f"http://127.0.0.1:{server.port}", counted  # the `app` fixture empties the tables afterwards


def _upload(url: str, headers: dict[str, str], path: Path, **fields: str) -> dict[str, Any]:
    with path.open("rb") as fh:
        response = httpx.post(
            f"{url}/v1/models/tiny/versions", data=fields, files={"file": fh}, headers=headers, timeout=60
        )
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


def _start_agent(url: str, admin: dict[str, str], tmp_path: Path, slot: str) -> tuple[str, AgentProcess]:
    created = httpx.post(f"{url}/v1/devices", json={"name": f"edge-{slot}", "labels": {"slot": slot}}, headers=admin)
    assert created.status_code == 201, created.text
    device = created.json()
    agent = AgentProcess(tmp_path / f"agent-{slot}", control_plane_url=url, enrollment_token=device["enrollment_token"])
    return device["id"], agent.start()


def _roll_out(url: str, headers: dict[str, str], version: str, selector: str = "") -> dict[str, Any]:
    body = {"model": "tiny", "version": version, "selector": selector, **ACTIVATION_ONLY}
    created = httpx.post(f"{url}/v1/rollouts", json=body, headers=headers)
    assert created.status_code == 201, created.text
    rollout_id = created.json()["id"]

    def finished() -> dict[str, Any] | None:
        rollout = httpx.get(f"{url}/v1/rollouts/{rollout_id}", headers=headers).json()
        return rollout if rollout["state"] in ("completed", "rolled_back", "failed") else None

    return wait_for(finished, what=f"rollout of {version}", timeout_s=120)


def test_an_adapter_rollout_downloads_only_the_adapter_where_the_base_runs(  # type: ignore[no-untyped-def]
    fleet, admin_headers, operator_headers, tiny_gguf: Path, tiny_lora_gguf: Path, tmp_path: Path
) -> None:
    pytest.importorskip("llama_cpp")
    url, counted = fleet
    other_base = write_tiny_gguf(tmp_path / "small.gguf", seed=3, size="small")
    bad_lora = write_tiny_lora_gguf(other_base, tmp_path / "bad-lora.gguf")
    httpx.post(f"{url}/v1/models", json={"name": "tiny"}, headers=operator_headers).raise_for_status()
    base = _upload(url, operator_headers, tiny_gguf, version="1.0")["artifacts"][0]
    adapter_version = _upload(
        url, operator_headers, tiny_lora_gguf, version="1.0-lora", parent="1.0", relation="adapter_of"
    )
    adapter = adapter_version["artifacts"][0]
    assert adapter["format"] == "gguf-lora" and adapter_version["parent"]["relation"] == "adapter_of"

    a_id, agent_a = _start_agent(url, admin_headers, tmp_path, "a")
    b_id, agent_b = _start_agent(url, admin_headers, tmp_path, "b")
    try:
        # Device a runs the base first.
        assert _roll_out(url, operator_headers, "1.0", "slot=a")["state"] == "completed"
        assert counted.sent[(a_id, base["sha256"])] == base["size_bytes"]
        counted.sent.clear()

        rollout = _roll_out(url, operator_headers, "1.0-lora")
        assert rollout["state"] == "completed", rollout
        # a held the base: only the adapter crossed the wire. b got both.
        assert dict(counted.sent) == {
            (a_id, adapter["sha256"]): adapter["size_bytes"],
            (b_id, base["sha256"]): base["size_bytes"],
            (b_id, adapter["sha256"]): adapter["size_bytes"],
        }
        for agent in (agent_a, agent_b):
            state = agent.state()
            assert state["phase"] in ("on_trial", "committed"), state
            assert state["current"]["version"] == "1.0-lora" and state["current"]["sha256"] == base["sha256"]
            # The agent's own record of what it serves: the base with the adapter loaded on top.
            serving = json.loads((agent.data_dir / "state.json").read_text())["current"]
            assert serving["artifact"]["sha256"] == base["sha256"]
            assert serving["adapter"]["sha256"] == adapter["sha256"]
            assert (agent.data_dir / "store" / "sha256" / adapter["sha256"]).stat().st_size == adapter["size_bytes"]
            ai = openai.OpenAI(base_url=f"{agent.url}/v1", api_key="unused", max_retries=0)
            reply = ai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
            assert reply.usage.completion_tokens == 4
        devices = httpx.get(f"{url}/v1/devices", headers=operator_headers).json()["data"]
        assert {d["current_version"] for d in devices} == {"1.0-lora"}

        # An adapter made for another base fails a's activation: the rollout rolls back, a keeps serving.
        _upload(url, operator_headers, bad_lora, version="1.0-bad", parent="1.0", relation="adapter_of")
        failed = _roll_out(url, operator_headers, "1.0-bad", "slot=a")
        assert failed["state"] == "rolled_back", failed
        wait_for(lambda: agent_a.state()["phase"] in ("activation_failed", "committed"), what="a settles")
        state = agent_a.state()
        assert state["current"]["version"] == "1.0-lora" and state["serving"], state
        ai = openai.OpenAI(base_url=f"{agent_a.url}/v1", api_key="unused", max_retries=0)
        assert ai.completions.create(model="tiny", prompt="hi", max_tokens=2).usage.completion_tokens == 2
    finally:
        agent_a.stop()
        agent_b.stop()
