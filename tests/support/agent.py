"""Helpers for the agent tests: a real artifact server that can misbehave, and agent processes.

The artifact server speaks the control plane's artifact protocol (`GET /v1/artifacts/{sha256}`
with Range, Content-Range, ETag) and its enrollment endpoint, over real HTTP
(uvicorn in a thread: tests/support/server_thread.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from shared.desired import DesiredState
from shared.net import free_port
from tests.support.server_thread import ServerThread
from tests.support.waiting import wait_for

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Misbehaviour:
    """How the server serves one artifact. Defaults: correct."""

    corrupt: bool = False  # serve different bytes than the sha256 names
    wrong_content_range: int = 0  # answer the next N Range requests with a wrong Content-Range
    extra_bytes: int = 0  # append this many junk bytes past the declared size
    drop_after: int | None = None  # close the connection after this many body bytes, once
    bytes_per_s: float | None = None  # throttle


@dataclass
class ArtifactServer:
    files: dict[str, bytes] = field(default_factory=dict)
    behaviour: dict[str, Misbehaviour] = field(default_factory=dict)
    requests: list[dict[str, Any]] = field(default_factory=list)
    enrollment_tokens: dict[str, str] = field(default_factory=dict)  # token -> device_id
    credentials: dict[str, str] = field(default_factory=dict)  # device_id -> secret
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add(self, data: bytes, behaviour: Misbehaviour | None = None) -> str:
        sha = hashlib.sha256(data).hexdigest()
        self.files[sha] = data
        if behaviour is not None:
            self.behaviour[sha] = behaviour
        return sha

    def add_file(self, path: Path, behaviour: Misbehaviour | None = None) -> str:
        return self.add(path.read_bytes(), behaviour)

    def ranges_for(self, sha: str) -> list[str | None]:
        return [r["range"] for r in self.requests if r["sha"] == sha]

    async def _artifact(self, request: Request) -> Response:
        sha = request.path_params["sha"]
        auth = request.headers.get("authorization")
        self.requests.append({"sha": sha, "range": request.headers.get("range"), "auth": auth})
        if self.credentials and not self._authorized(auth):
            return JSONResponse({"code": "unauthorized"}, status_code=401)
        if sha not in self.files:
            return JSONResponse({"code": "artifact_not_found"}, status_code=404)
        data, how = self.files[sha], self.behaviour.get(sha, Misbehaviour())
        if how.corrupt:
            data = bytes(b ^ 0xFF for b in data[:64]) + data[64:]
        start, status = self._range_start(request, len(data))
        if start is None:
            return Response(status_code=416, headers={"Content-Range": f"bytes */{len(data)}"})
        headers = {"ETag": f'"{sha}"', "Accept-Ranges": "bytes"}
        if status == 206:
            claimed = start
            if how.wrong_content_range > 0:
                how.wrong_content_range -= 1
                claimed = start + 7
            headers["Content-Range"] = f"bytes {claimed}-{len(data) - 1}/{len(data)}"
        body = data[start:] + b"\0" * how.extra_bytes
        headers["Content-Length"] = str(len(body))
        return StreamingResponse(self._body(body, how), status_code=status, headers=headers)

    def _authorized(self, header: str | None) -> bool:
        import base64

        if not header or not header.startswith("Basic "):
            return False
        device_id, _, secret = base64.b64decode(header[6:]).decode().partition(":")
        return self.credentials.get(device_id) == secret

    @staticmethod
    def _range_start(request: Request, size: int) -> tuple[int | None, int]:
        header = request.headers.get("range")
        if not header:
            return 0, 200
        start = int(header.removeprefix("bytes=").split("-")[0])
        if start >= size:
            return None, 416
        return start, 206

    @staticmethod
    async def _body(body: bytes, how: Misbehaviour) -> AsyncIterator[bytes]:
        step = 64 * 1024
        sent = 0
        for offset in range(0, len(body), step):
            block = body[offset : offset + step]
            if how.drop_after is not None and sent + len(block) > how.drop_after:
                how.drop_after = None
                yield block[: max(0, how.drop_after or 0)]
                raise ConnectionResetError("dropping the connection on purpose")
            yield block
            sent += len(block)
            if how.bytes_per_s:
                await asyncio.sleep(len(block) / how.bytes_per_s)

    async def _enroll(self, request: Request) -> Response:
        body = await request.json()
        device_id = self.enrollment_tokens.pop(body.get("enrollment_token", ""), None)
        if device_id is None:
            problem = {
                "type": "about:blank",
                "title": "Unauthorized",
                "status": 401,
                "detail": "the enrollment token is not known",
                "code": "enrollment_token_invalid",
            }
            return JSONResponse(problem, status_code=401, media_type="application/problem+json")
        secret = f"secret-{device_id}"
        self.credentials[device_id] = secret
        answer = {"device_id": device_id, "device_secret": secret, "mqtt_url": None, "topic_prefix": "t"}
        return JSONResponse(answer, status_code=201)

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/artifacts/{sha}", self._artifact, methods=["GET"]),
                Route("/v1/devices/enroll", self._enroll, methods=["POST"]),
            ]
        )


@contextlib.contextmanager
def artifact_server() -> Iterator[ArtifactServer]:
    """An ArtifactServer on a real uvicorn in a thread, for as long as the block runs."""
    server = ArtifactServer()
    with ServerThread(server.app()) as thread:
        server.port = thread.port
        yield server


def desired_for(
    server: ArtifactServer,
    sha: str,
    *,
    model: str = "tiny",
    version: str = "1",
    fmt: str = "gguf",
    message_id: str | None = None,
    quantization: str | None = None,
    **runtime: Any,
) -> DesiredState:
    return DesiredState.model_validate(
        {
            "message_id": message_id or f"{model}-{version}-{time.monotonic_ns()}",
            "model": model,
            "version": version,
            "artifact": {
                "sha256": sha,
                "size_bytes": len(server.files[sha]),
                "format": fmt,
                "quantization": quantization,
            },
            "runtime": {"n_ctx": 256, **runtime},
        }
    )


def desired_for_artifact(*, model: str, version: str, sha256: str, size_bytes: int, fmt: str = "gguf") -> DesiredState:
    """A desired state whose artifact URL is the control plane's default `/v1/artifacts/{sha256}`."""
    return DesiredState.model_validate(
        {
            "message_id": f"{model}-{version}-{time.monotonic_ns()}",
            "model": model,
            "version": version,
            "artifact": {"sha256": sha256, "size_bytes": size_bytes, "format": fmt},
            "runtime": {"n_ctx": 256},
        }
    )


class AgentProcess:
    """A real agent daemon (`python -m edge_agent --config`) with its own data dir and port."""

    def __init__(self, data_dir: Path, *, control_plane_url: str | None = None, **settings: Any) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.config = data_dir.parent / f"{data_dir.name}.toml"
        values: dict[str, Any] = {
            "data_dir": str(data_dir),
            "listen_port": self.port,
            "threads": 1,
            "download_backoff_s": 0.05,
            "watch_interval_s": 0.2,
            **settings,
        }
        if control_plane_url:
            values["control_plane_url"] = control_plane_url
        self.config.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))
        self.proc: subprocess.Popen[bytes] | None = None
        self.command = [sys.executable, "-m", "edge_agent", "--config", str(self.config)]
        self.cwd = REPO  # another folder (and command) runs an installed agent instead of this checkout's
        self.log = data_dir.parent / f"{data_dir.name}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, env_extra: dict[str, str] | None = None) -> AgentProcess:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
        env = {k: v for k, v in env.items() if not k.startswith("SLMOPS_AGENT_") or k in (env_extra or {})}
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.command,
                cwd=self.cwd,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        wait_for(
            lambda: self._alive(),
            what=f"agent on {self.url} to answer /healthz",
            proc=self.proc,
            log=self.log,
        )
        return self

    def _alive(self) -> bool:
        try:
            return httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.terminate()
        return self.proc.wait(timeout=20)

    def state_file_phase(self) -> str:
        return json.loads((self.data_dir / "state.json").read_text())["phase"]

    def admin(self) -> httpx.Client:
        token = (self.data_dir / "admin.token").read_text().strip()
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {token}"}, timeout=120)

    def state(self) -> dict[str, Any]:
        with self.admin() as client:
            return client.get("/v1/admin/state").json()["state"]

    def apply(self, desired: DesiredState, *, wait: bool = True) -> httpx.Response:
        with self.admin() as client:
            return client.post("/v1/admin/desired", params={"wait": wait}, json=desired.model_dump(mode="json"))

    def wait_ready(self, timeout_s: float = 60) -> dict[str, Any]:
        def ready() -> bool:
            try:
                return httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, what="agent ready", timeout_s=timeout_s, proc=self.proc, log=self.log)
        return httpx.get(f"{self.url}/readyz", timeout=2).json()
