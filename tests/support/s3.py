"""An S3 endpoint for tests: moto in server mode, over TLS, counting what it serves.

No S3 server runs on the test machines: `moto` (moto[server], its ThreadedMotoServer) answers the
S3 API in-process. Devices only follow https redirects to another host, so it serves https with a
self-signed certificate the clients are told to trust. A counting TCP proxy stands in front of
control-plane replicas to count the bytes each one served.
"""

from __future__ import annotations

import contextlib
import socket
import socketserver
import threading
from collections import Counter
from collections.abc import Iterable
from typing import Any

from moto.server import DomainDispatcherApplication, MotoRequestHandler, ThreadedMotoServer, create_backend_app
from werkzeug.serving import make_server

from shared.net import free_port

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


class CountingApp:
    """WSGI middleware: per request, (method, path, query) and the response bytes sent."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.requests: list[tuple[str, str, str]] = []
        self.bytes_out: Counter[str] = Counter()  # "METHOD path" -> body bytes served
        self._lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        method, path, query = environ["REQUEST_METHOD"], environ.get("PATH_INFO", ""), environ.get("QUERY_STRING", "")
        with self._lock:
            self.requests.append((method, path, query))
        for chunk in self.app(environ, start_response):
            with self._lock:
                self.bytes_out[f"{method} {path}"] += len(chunk)
            yield chunk


class TlsMotoServer(ThreadedMotoServer):
    """ThreadedMotoServer serving https, its requests counted."""

    def __init__(self, tls: tuple[str, str]) -> None:
        super().__init__(ip_address="127.0.0.1", port=free_port(), verbose=False)
        self.tls = tls
        self.counted = CountingApp(DomainDispatcherApplication(create_backend_app))
        self.url = f"https://127.0.0.1:{self._port}"

    def _server_entry(self) -> None:
        self._server = make_server(
            self._ip_address, self._port, self.counted, True, request_handler=MotoRequestHandler, ssl_context=self.tls
        )
        self._server_ready_event.set()
        self._server.serve_forever()


class CountingProxy:
    """A TCP proxy on a free loopback port to `target_port`: counts the bytes the target sent back
    and keeps what clients sent (request lines are read from it)."""

    def __init__(self, target_port: int) -> None:
        proxy = self

        class Relay(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                proxy._relay(self.request)

        self.target_port = target_port
        self.served = 0
        self.received = bytearray()
        self._lock = threading.Lock()
        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Relay)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def requests_for(self, prefix: bytes) -> int:
        with self._lock:
            return bytes(self.received).count(prefix)

    def _relay(self, client: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.target_port))
        to_target = threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True)
        to_target.start()
        self._pipe(upstream, client, True)
        to_target.join()

    def _pipe(self, source: socket.socket, sink: socket.socket, from_target: bool) -> None:
        try:
            while data := source.recv(65536):
                with self._lock:
                    if from_target:
                        self.served += len(data)
                    else:
                        self.received += data
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
