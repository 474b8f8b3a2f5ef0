"""The agent against the real control plane: enrollment, then an artifact from the registry."""

from __future__ import annotations

import hashlib

import httpx
import openai
import pytest

from shared.desired import DesiredState
from tests.support.agent import AgentProcess, desired_for_artifact
from tests.support.assign import assign_version
from tests.support.server_thread import ServerThread

pytestmark = [pytest.mark.llama, pytest.mark.slow]


def test_agent_enrolls_and_serves_a_registry_artifact(  # type: ignore[no-untyped-def]
    app, admin_headers, operator_headers, tiny_gguf, tmp_path, engine
):
    with ServerThread(app, lifespan="on") as server:
        base = f"http://127.0.0.1:{server.port}"
        device = httpx.post(f"{base}/v1/devices", json={"name": "edge-1"}, headers=admin_headers).json()
        httpx.post(f"{base}/v1/models", json={"name": "tinyllama"}, headers=operator_headers).raise_for_status()
        with tiny_gguf.open("rb") as fh:
            uploaded = httpx.post(
                f"{base}/v1/models/tinyllama/versions",
                data={"version": "1.0.0"},
                files={"file": (tiny_gguf.name, fh, "application/octet-stream")},
                headers=operator_headers,
                timeout=60,
            )
        assert uploaded.status_code == 201, uploaded.text
        artifact = uploaded.json()["artifacts"][0]

        agent = AgentProcess(tmp_path / "data", control_plane_url=base, enrollment_token=device["enrollment_token"])
        agent.start()
        try:
            assert agent.state()["device_id"] == device["id"]
            assert (agent.data_dir / "credential.json").stat().st_mode & 0o777 == 0o600
            # Half the file is already here, as after an interrupted download: the agent resumes it.
            partial = agent.data_dir / "downloads" / f"{artifact['sha256']}.part"
            partial.write_bytes(tiny_gguf.read_bytes()[: artifact["size_bytes"] // 2])
            # A device fetches only what it is assigned, and runs only what the release signs.
            unsigned = desired_for_artifact(
                model="tinyllama", version="1.0.0", sha256=artifact["sha256"], size_bytes=artifact["size_bytes"]
            )
            refused = agent.apply(unsigned).json()
            assert refused["phase"] == "download_failed" and refused["reason"].startswith("release_refused"), refused
            desired = assign_version(engine, device["id"], model="tinyllama", version="1.0.0")
            state = agent.apply(DesiredState.model_validate(desired)).json()
            assert state["phase"] == "on_trial", state
            blob = agent.data_dir / "store" / "sha256" / artifact["sha256"]
            assert hashlib.sha256(blob.read_bytes()).hexdigest() == artifact["sha256"]
            ai = openai.OpenAI(base_url=f"{agent.url}/v1", api_key="unused", max_retries=0)
            reply = ai.chat.completions.create(
                model="tinyllama", messages=[{"role": "user", "content": "hi"}], max_tokens=4
            )
            assert reply.usage.completion_tokens == 4
        finally:
            agent.stop()
