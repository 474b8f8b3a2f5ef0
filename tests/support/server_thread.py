"""uvicorn serving an ASGI app on a free loopback port, in a daemon thread, for tests.

It fails loudly when the server does not stop: one left running (a control plane, leader on the
shared test database) would go on publishing desired states and ingesting into the next test.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Literal

import uvicorn

from shared.net import free_port


class ServerThread:
    def __init__(
        self,
        app: Any,
        *,
        lifespan: Literal["auto", "on", "off"] = "off",
        stop_timeout_s: float = 15,
        tls: tuple[str, str] | None = None,  # (certificate file, key file): serve https
    ) -> None:
        self.port = free_port()
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.stop_timeout_s = stop_timeout_s
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            lifespan=lifespan,
            # Open keep-alive or streaming connections (a browser's) must not hold the shutdown up.
            timeout_graceful_shutdown=max(1, int(stop_timeout_s / 3)),
            ssl_certfile=tls[0] if tls else None,
            ssl_keyfile=tls[1] if tls else None,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise AssertionError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=self.stop_timeout_s)
        if self.thread.is_alive():
            raise AssertionError(f"uvicorn on port {self.port} did not stop within {self.stop_timeout_s} s")
