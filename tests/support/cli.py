"""What the CLI tests share: a real control plane on uvicorn, the CLI runner, a link that fails on purpose."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import Result
from typer.testing import CliRunner

import slmops.cli.ops  # noqa: F401  (registers the commands)
from slmops.cli.app import app as cli_app
from tests.support.server_thread import ServerThread

HARDWARE = {"cpu_model": "test", "cpu_cores": 4, "ram_mb": 4096, "arch": "x86_64"}


@contextlib.contextmanager
def serve(application: Any) -> Iterator[str]:
    """The app on a real uvicorn server (its lifespan included) in a thread, on a free port."""
    with ServerThread(application, lifespan="auto") as server:
        yield server.url


@pytest.fixture(name="server_url")
def server_url_fixture(app) -> Iterator[str]:  # type: ignore[no-untyped-def]
    with serve(app) as url:
        yield url


class FlakyLink:
    """A TCP proxy to the server that fails on purpose.

    `break_upload="response"` loses the answer to the first POST starting with `post`; `"request"` cuts
    that POST's body after `cut_after` bytes. `go_down()` hangs up every connection, open or new, until
    `go_up()`. It keeps the head of every such POST and of its answers, so tests can see the
    Idempotency-Key on the wire.
    """

    def __init__(
        self, upstream: str, *, break_upload: str | None = None, cut_after: int = 0, post: bytes = b"POST /v1/models/"
    ) -> None:
        self.upstream_port = int(upstream.rsplit(":", 1)[1])
        self.post = post
        self.break_upload = break_upload
        self.cut_after = cut_after
        self.broken = threading.Event()
        self.down = threading.Event()
        self.requests = 0
        self.refused = 0
        self.posts: list[bytes] = []
        self.responses: list[bytes] = []
        self._open: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._listener.close()
        hang_up(*self._open)

    def go_down(self) -> None:
        self.down.set()
        hang_up(*self._open)

    def go_up(self) -> None:
        self.down.clear()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            if self.down.is_set():
                self.refused += 1
                hang_up(conn)
                continue
            threading.Thread(target=self._serve_connection, args=(conn,), daemon=True).start()

    def _serve_connection(self, client: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        self._open += [client, upstream]
        posting = threading.Event()
        threading.Thread(target=self._forward_requests, args=(client, upstream, posting), daemon=True).start()
        try:
            while data := upstream.recv(65536):
                if posting.is_set():
                    self.responses.append(data)
                    if self.break_upload == "response" and not self.broken.is_set():
                        self.broken.set()  # the upload arrived, its answer never does
                        break
                client.sendall(data)
        except OSError:
            pass
        finally:
            hang_up(client, upstream)

    def _forward_requests(self, client: socket.socket, upstream: socket.socket, posting: threading.Event) -> None:
        sent = 0
        try:
            while data := client.recv(65536):
                if data.startswith((b"GET ", b"POST ")):
                    self.requests += 1
                if data.startswith(self.post):
                    self.posts.append(data[:2048])
                    posting.set()
                    sent = 0
                sent += len(data)
                cut = self.break_upload == "request" and posting.is_set() and sent > self.cut_after
                if cut and not self.broken.is_set():
                    self.broken.set()  # the link drops in the middle of the upload
                    hang_up(client, upstream)
                    return
                upstream.sendall(data)
        except OSError:
            pass


def hang_up(*sockets: socket.socket) -> None:
    # shutdown() before close(): a close alone neither wakes the other thread's recv() nor sends the FIN.
    for sock in sockets:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()


def bearer(headers: dict[str, str]) -> str:
    return headers["Authorization"].removeprefix("Bearer ")


class Cli:
    """Runs `slmops ...` in-process with the server and token in the environment, as an operator would."""

    def __init__(self, url: str, token: str, tmp_path: Path) -> None:
        self.env = {
            "SLMOPS_SERVER": url,
            "SLMOPS_TOKEN": token,
            "SLMOPS_CLI_CONFIG": str(tmp_path / "absent.toml"),
            "COLUMNS": "200",
        }
        self.runner = CliRunner()

    def __call__(self, *args: str, code: int = 0, **env: str) -> Result:
        result = self.runner.invoke(cli_app, list(args), env=self.env | env)
        assert result.exit_code == code, f"exit {result.exit_code}\n{result.stdout}\n{result.stderr}"
        return result

    def json(self, *args: str) -> Any:
        return json.loads(self(*args, "--output", "json").stdout)


@pytest.fixture(name="cli")
def cli_fixture(server_url: str, operator_headers: dict[str, str], tmp_path: Path) -> Cli:
    return Cli(server_url, bearer(operator_headers), tmp_path)


@pytest.fixture(name="admin_cli")
def admin_cli_fixture(server_url: str, admin_headers: dict[str, str], tmp_path: Path) -> Cli:
    return Cli(server_url, bearer(admin_headers), tmp_path)


def one_line(text: str) -> str:
    """The output on one line, table borders dropped, so a row reads 'gate result value limit'."""
    return " ".join(text.translate(str.maketrans("│┃", "  ")).split())


def enroll(admin_cli: Cli, name: str, labels: list[str]) -> dict[str, Any]:
    """Create a device with the CLI, then enroll it as its agent would (REST); returns its credential."""
    created = admin_cli.json("device", "create", name, *[f"--label={label}" for label in labels])
    response = httpx.post(
        admin_cli.env["SLMOPS_SERVER"] + "/v1/devices/enroll",
        json={"enrollment_token": created["enrollment_token"], "hardware": HARDWARE},
    )
    assert response.status_code == 201, response.text
    return dict(response.json())


def enrolled_device(admin_cli: Cli, name: str, labels: list[str]) -> str:
    return str(enroll(admin_cli, name, labels)["device_id"])
