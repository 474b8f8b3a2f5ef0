"""A small client for the control plane's REST API, used by the operator commands.

Where the server and token come from, first found wins: the `--server/--token` flags, the
`SLMOPS_SERVER`/`SLMOPS_TOKEN` environment, then `~/.config/slmops/cli.toml` (or the file named by
`SLMOPS_CLI_CONFIG`) with `server = "..."` and `token = "..."`.

ApiError             any failure the operator should read: one line, plus a hint keyed by `code`
  from a problem+json response (RFC 9457), a transport failure, or a missing token
"""

from __future__ import annotations

import hashlib
import os
import time
import tomllib
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slmops.errors import SlmopsError

if TYPE_CHECKING:  # httpx is imported on first use: `slmops agent` loads this module and must stay small
    import httpx

DEFAULT_SERVER = "http://127.0.0.1:8080"
CHUNK = 1024 * 1024
POST_ATTEMPTS = 3
_TOKEN_HINT = (
    "create a token on the server host with `slmops token create --role operator`, then pass it with "
    "--token or set SLMOPS_TOKEN"
)
# What to do next, per problem `code`. Placeholders are filled from the problem body's fields.
HINTS: dict[str, str] = {
    "unauthenticated": _TOKEN_HINT,
    "missing_token": _TOKEN_HINT,
    "forbidden": "this token's role is too low: create one with `slmops token create --role operator` "
    "(`--role admin` to create devices)",
    "model_not_found": "see the registered models with `slmops model list`, or create one with "
    "`slmops model create NAME`",
    "version_not_found": "see the model's versions with `slmops model show MODEL`",
    "artifact_not_found": "see the version's artifacts with `slmops model show MODEL VERSION`",
    "device_not_found": "see the devices with `slmops device list`",
    "rollout_not_found": "see the rollouts with `slmops rollout list`",
    "not_found": "check the name or id; `slmops model list`, `slmops device list` and `slmops rollout list` "
    "show what exists",
    "model_exists": "the name is taken: `slmops model show NAME` shows it; push versions to it",
    "version_exists": "versions are immutable: push the file under a new VERSION, or add it to this one as "
    "another variant with `slmops model push --add-artifact`",
    "device_exists": "the name is taken: `slmops device list` shows it",
    "rollout_conflict": "an active rollout covers some of these devices: watch it with "
    "`slmops rollout status {rollout_id} --watch` or stop it with `slmops rollout abort {rollout_id}`",
    "invalid_state": "see where the rollout stands with `slmops rollout status ID`: pause and promote act on "
    "running rollouts (promote not in the last stage), resume on paused ones; finished rollouts stay as they are",
    "validation_error": "check the arguments against `--help`",
    "invalid_selector": "a selector looks like key=value,key2!=value2",
    "sha256_mismatch": "the file changed or was damaged in transit; nothing was stored, push it again",
    "size_mismatch": "the upload was cut short; nothing was stored, push it again",
    "unrecognized_artifact": "push a GGUF, GGUF LoRA adapter or ONNX file",
    "payload_too_large": "the server refuses files this big: raise SLMOPS_MAX_UPLOAD_BYTES on the server",
    "insufficient_storage": "the server's disk is full: free space under its data directory",
    "idempotency_key_reused": "this VERSION was pushed before with other fields: push under a new VERSION",
    "quality_below_floor": "the version scores below the quality floor; pass --force to roll it out anyway",
    "connection_failed": "is the control plane running? start it with `slmops server`, or point --server "
    "(or SLMOPS_SERVER) at it",
    "too_many_points": "ask for fewer points: a larger --step or a shorter --since",
    "job_not_found": "the job id is unknown to this server (jobs are listed with the version they produced)",
    "enrollment_token_invalid": "issue a new enrollment token with `slmops device reissue-token ID`",
    "enrollment_token_expired": "issue a new enrollment token with `slmops device reissue-token ID`",
    "enrollment_token_used": "the device already enrolled; to enroll it again, `slmops device reissue-token ID`",
    "internal_error": "the server failed; its log has the details (request id {request_id})",
}

# More precise hints when the problem body carries a given field: (code, field) -> hint.
FIELD_HINTS: dict[tuple[str, str], str] = {
    ("validation_error", "selector"): "no enrolled device matches: see the candidates with "
    "`slmops device list --selector '{selector}'`; devices enroll when their agent starts with its token",
}


class ApiError(SlmopsError):
    """A failed call, with the problem's stable `code` and what to do next."""

    def __init__(self, code: str, detail: str, *, status: int | None = None, fields: dict[str, Any] | None = None):
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.status = status
        self.fields = fields or {}

    @property
    def hint(self) -> str | None:
        template = next((h for (code, key), h in FIELD_HINTS.items() if code == self.code and key in self.fields), None)
        if self.code == "not_found" and self.detail == "Not Found":  # no such route, not a missing resource
            template = "this server has no such endpoint: it may be older than this CLI; upgrade the control plane"
        template = template or HINTS.get(self.code)
        if template is None:
            return None
        return template.format_map(_Missing(self.fields))

    def one_line(self) -> str:
        where = f"HTTP {self.status}, " if self.status else ""
        text = f"{self.detail} ({where}{self.code})"
        errors = self.fields.get("errors")
        if isinstance(errors, list) and errors:
            text += ": " + "; ".join(_describe_error(e) for e in errors[:3])
        return text


class _Missing(dict[str, Any]):
    def __missing__(self, key: str) -> str:
        return key.upper()


def _describe_error(error: Any) -> str:
    if not isinstance(error, dict):
        return str(error)
    loc = ".".join(str(p) for p in error.get("loc", []) if p != "body")
    return f"{loc}: {error.get('msg', '')}" if loc else str(error.get("msg", ""))


@dataclass(frozen=True)
class ClientConfig:
    server: str
    token: str | None


def config_path() -> Path:
    explicit = os.environ.get("SLMOPS_CLI_CONFIG")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "slmops" / "cli.toml"


def resolve_config(server: str | None = None, token: str | None = None) -> ClientConfig:
    """Flags, then environment, then the config file, then the default local server."""
    file_values: dict[str, Any] = {}
    path = config_path()
    if path.is_file():
        try:
            file_values = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ApiError("invalid_config", f"{path} is not valid TOML: {exc}") from exc
    chosen_server = server or os.environ.get("SLMOPS_SERVER") or file_values.get("server") or DEFAULT_SERVER
    chosen_token = token or os.environ.get("SLMOPS_TOKEN") or file_values.get("token")
    return ClientConfig(server=str(chosen_server).rstrip("/"), token=str(chosen_token) if chosen_token else None)


class ApiClient:
    """JSON calls with Bearer auth; every failure becomes an ApiError."""

    def __init__(self, config: ClientConfig, *, transport: httpx.BaseTransport | None = None, timeout: float = 30):
        self.config = config
        import httpx

        headers = {"Authorization": f"Bearer {config.token}"} if config.token else {}
        self._http = httpx.Client(base_url=config.server, headers=headers, timeout=timeout, transport=transport)

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *_: object) -> None:
        self._http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        import httpx

        if not self.config.token:
            raise ApiError("missing_token", f"no API token for {self.config.server}")
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ApiError(
                "connection_failed", f"cannot reach the control plane at {self.config.server}: {exc}"
            ) from exc
        if response.is_error:
            raise _problem(response)
        return response

    def get(self, path: str, **params: Any) -> Any:
        clean = {k: v for k, v in params.items() if v is not None}
        return self.request("GET", path, params=clean).json()

    def patch(self, path: str, body: Any) -> Any:
        return self.request("PATCH", path, json=body).json()

    def delete(self, path: str) -> None:
        self.request("DELETE", path)

    def post(self, path: str, body: Any = None, *, idempotency_key: str | None = None) -> Any:
        return self.post_response(path, body, idempotency_key=idempotency_key).json()

    def post_response(self, path: str, body: Any = None, *, idempotency_key: str | None = None) -> httpx.Response:
        """With a key, a broken connection is retried: the server replays what it did instead of doing it twice."""
        if idempotency_key is None:
            return self.request("POST", path, json=body)
        for attempt in range(1, POST_ATTEMPTS + 1):
            try:
                return self.request("POST", path, json=body, headers={"Idempotency-Key": idempotency_key})
            except ApiError as exc:
                if exc.code != "connection_failed" or attempt == POST_ATTEMPTS:
                    raise
                time.sleep(0.5 * attempt)
        raise AssertionError("unreachable")

    def upload(
        self, path: str, body: MultipartFile, *, idempotency_key: str, on_bytes: Callable[[int], None]
    ) -> httpx.Response:
        """POST a streamed multipart body; the server may take a while to verify a large file at the end."""
        headers = {
            "Content-Type": body.content_type,
            "Content-Length": str(len(body)),
            "Idempotency-Key": idempotency_key,
        }
        import httpx

        timeout = httpx.Timeout(30, read=600)
        return self.request("POST", path, content=body.iter_chunks(on_bytes), headers=headers, timeout=timeout)

    def get_all(self, path: str, **params: Any) -> list[dict[str, Any]]:
        """Every item of a paginated listing ({data, next_cursor})."""
        return self.get_items(path, None, **params)[0]

    def get_items(self, path: str, max_items: int | None, **params: Any) -> tuple[list[dict[str, Any]], bool]:
        """Up to `max_items` (None: all) of a paginated listing, and whether more were left."""
        items: list[dict[str, Any]] = []
        cursor = None
        while True:
            wanted = 500 if max_items is None else min(500, max_items - len(items))
            page = self.get(path, cursor=cursor, limit=wanted, **params)
            items.extend(page["data"])
            cursor = page.get("next_cursor")
            if not cursor or (max_items is not None and len(items) >= max_items):
                return items, bool(cursor)


def _problem(response: httpx.Response) -> ApiError:
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        return ApiError("http_error", response.text[:200] or response.reason_phrase, status=response.status_code)
    fields = dict(body)
    fields.setdefault("request_id", response.headers.get("x-request-id", "?"))
    code = str(body.get("code") or "http_error")
    detail = str(body.get("detail") or body.get("title") or response.reason_phrase)
    return ApiError(code, detail, status=response.status_code, fields=fields)


def push_idempotency_key(model: str, version: str, sha256: str) -> str:
    """Stable for one (model, version, file): a retried push replays instead of failing as a duplicate."""
    return "push-" + hashlib.sha256(f"{model}\0{version}\0{sha256}".encode()).hexdigest()[:48]


@dataclass
class MultipartFile:
    """A multipart/form-data body streamed from disk: text fields first, then the file part.

    The length is known up front, so the request carries Content-Length and the server can refuse an
    oversized upload before reading it; memory stays at one chunk whatever the file size.
    """

    path: Path
    fields: dict[str, str]
    boundary: str = field(default_factory=lambda: f"slmops-{uuid.uuid4().hex}")

    @property
    def content_type(self) -> str:
        return f"multipart/form-data; boundary={self.boundary}"

    def _head(self) -> bytes:
        parts = [
            f'--{self.boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'
            for key, value in self.fields.items()
        ]
        filename = self.path.name.replace('"', "_")
        parts.append(
            f'--{self.boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        )
        return "".join(parts).encode()

    def _tail(self) -> bytes:
        return f"\r\n--{self.boundary}--\r\n".encode()

    def __len__(self) -> int:
        return len(self._head()) + self.path.stat().st_size + len(self._tail())

    def iter_chunks(self, on_bytes: Callable[[int], None] | None = None) -> Iterator[bytes]:
        head = self._head()
        yield head
        with self.path.open("rb") as fh:
            while block := fh.read(CHUNK):
                if on_bytes:
                    on_bytes(len(block))
                yield block
        yield self._tail()


def new_idempotency_key() -> str:
    """One per command run: its retries are replays, a second run is a new request."""
    return f"cli-{uuid.uuid4().hex}"
