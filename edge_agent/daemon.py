"""`slmops agent --config FILE`: the agent process, shaped like uvicorn's Server for systemd.

Start-up: settings -> enrollment -> HTTP server listening -> READY=1 -> recovery of the stored model
(readyz 503 until it serves) -> reconcile. SIGTERM stops gracefully (uvicorn's handler); WATCHDOG=1
is sent from the event loop, so a wedged loop gets the process restarted by systemd.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import uvicorn
from fastapi import FastAPI

from edge_agent import sdnotify
from edge_agent.agent import Agent
from edge_agent.api.app import create_app
from edge_agent.credential import CredentialRotator
from edge_agent.fsutil import remove_stale_temps, write_atomic
from edge_agent.settings import AgentSettings
from edge_agent.sources import WatchedFileSource
from shared import logs

if TYPE_CHECKING:
    from edge_agent.mqtt.channel import MqttChannel

log = logging.getLogger(__name__)


def admin_token(path: Path) -> str:
    """The local admin token, created on first start (0600, readable by the agent's user only)."""
    if path.exists():
        return path.read_text().strip()
    token = secrets.token_urlsafe(32)
    write_atomic(path, token.encode(), mode=0o600)
    return token


def build(settings: AgentSettings) -> tuple[Agent, FastAPI]:
    # Every directory the agent writes into atomically; the credential and the watched file may
    # live outside its data dir.
    written = (settings.state_path, settings.credential_path, settings.desired_path, settings.admin_token_path)
    for directory in {path.parent for path in written}:
        if directory.is_dir():
            for leftover in remove_stale_temps(directory):
                log.info("removed %s, left by a write that did not finish", leftover)
    agent = Agent(settings)
    agent.add_source(WatchedFileSource(settings.desired_path, interval_s=settings.watch_interval_s))
    app = create_app(agent, admin_token=admin_token(settings.admin_token_path))

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        agent.start()
        channel = _mqtt_channel(agent)  # None without an MQTT URL and a device credential
        if channel is not None:
            channel.start()
        rotator = CredentialRotator(agent, channel, interval_s=settings.credential_check_s)
        if agent.credential is not None:
            rotator.start()
        watchdog = asyncio.create_task(_watchdog())
        sdnotify.notify("READY=1")
        log.info("agent listening on %s", settings.base_url)
        try:
            yield
        finally:
            sdnotify.notify("STOPPING=1")
            watchdog.cancel()
            if agent.credential is not None:
                rotator.stop()
            if channel is not None:
                channel.stop()  # says "offline" before the agent takes its model down
            agent.stop()

    app.router.lifespan_context = lifespan
    return agent, app


def _mqtt_channel(agent: Agent) -> MqttChannel | None:
    """The MQTT channel when a broker is configured; paho is imported only then (idle memory)."""
    credential = agent.credential
    if not (agent.settings.mqtt_url or (credential is not None and credential.mqtt_url)):
        return None
    from edge_agent.mqtt.channel import MqttChannel

    return MqttChannel.for_agent(agent)


async def _watchdog() -> None:
    interval = sdnotify.watchdog_interval_s()
    if interval is None:
        return
    while True:
        sdnotify.notify("WATCHDOG=1")
        await asyncio.sleep(interval)


def run(settings: AgentSettings) -> int:
    logs.configure(json_lines=settings.log_json, level=settings.log_level)
    agent, app = build(settings)
    agent.enroll()  # before listening: a refused enrollment is a start-up failure with a clear reason
    config = uvicorn.Config(
        app,
        host=settings.listen_host,
        port=settings.listen_port,
        log_config=None,  # keep our handlers (plain or JSON on stdout)
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=10,
    )
    server = uvicorn.Server(config)
    server.run()
    # uvicorn exits quietly when the port is taken or start-up failed; systemd must see a failure.
    return 0 if server.started else 1
