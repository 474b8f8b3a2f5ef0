"""The operator CLI (`slmops model|device|rollout ...`) against a real control plane served by uvicorn."""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from click.testing import Result
from typer.testing import CliRunner

import slmops.cli.ops  # noqa: F401  (registers the commands)
from control_plane.api.main import create_app
from control_plane.config import Settings
from shared.topics import Topics
from slmops.cli.app import app as cli_app
from slmops.cli.client import CHUNK, MultipartFile, resolve_config
from slmops.simulator import SimBehaviour
from tests.fleet_helpers import TelemetryPump, start_sim_devices, wait_for

MOSQUITTO = "mqtt://127.0.0.1:1883"
HARDWARE = {"cpu_model": "test", "cpu_cores": 4, "ram_mb": 4096, "arch": "x86_64"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def _serve(application: Any) -> Iterator[str]:
    """The app on a real uvicorn server (its lifespan included) in a thread, on a free port."""
    server = uvicorn.Server(uvicorn.Config(application, host="127.0.0.1", port=_free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture
def server_url(app) -> Iterator[str]:  # type: ignore[no-untyped-def]
    with _serve(app) as url:
        yield url


class FlakyLink:
    """A TCP proxy to the server that fails on purpose.

    `break_upload="response"` loses the answer to the first POST starting with `post`, `"request"` cuts
    its body after `cut_after` bytes;
    `go_down()` hangs up every connection, open or new, until `go_up()`. It keeps the head of every
    upload and every upload response, so tests can see the Idempotency-Key on the wire.
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
        _hang_up(*self._open)

    def go_down(self) -> None:
        self.down.set()
        _hang_up(*self._open)

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
                _hang_up(conn)
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
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
            _hang_up(client, upstream)

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
                    _hang_up(client, upstream)
                    return
                upstream.sendall(data)
        except OSError:
            pass


def _hang_up(*sockets: socket.socket) -> None:
    # shutdown() before close(): a close alone neither wakes the other thread's recv() nor sends the FIN.
    for sock in sockets:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()


def _bearer(headers: dict[str, str]) -> str:
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


@pytest.fixture
def cli(server_url: str, operator_headers: dict[str, str], tmp_path: Path) -> Cli:
    return Cli(server_url, _bearer(operator_headers), tmp_path)


@pytest.fixture
def admin_cli(server_url: str, admin_headers: dict[str, str], tmp_path: Path) -> Cli:
    return Cli(server_url, _bearer(admin_headers), tmp_path)


def _one_line(text: str) -> str:
    """The output on one line, table borders dropped, so a row reads 'gate result value limit'."""
    return " ".join(text.translate(str.maketrans("│┃", "  ")).split())


def test_push_streams_verifies_and_replays(cli: Cli, tiny_gguf: Path, tiny_gguf_other: Path) -> None:
    digest = hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    assert cli.json("model", "create", "tiny", "--description", "a test model")["name"] == "tiny"
    first = cli("model", "push", "tiny", "1", str(tiny_gguf), "--metrics", '{"agreement": 0.97}', "--notes", "base")
    assert "sha256" in first.stderr and "upload tiny.gguf" in first.stderr  # both progress bars ran
    assert f"pushed tiny@1: sha256 {digest} verified" in _one_line(first.stdout)

    # The same push again (as after an interrupted run) replays under its Idempotency-Key.
    again = cli("model", "push", "tiny", "1", str(tiny_gguf), "--metrics", '{"agreement": 0.97}', "--notes", "base")
    assert "already holds this file" in again.stdout and "upload" not in again.stderr  # nothing sent twice
    child = json.loads(
        cli(
            "model", "push", "tiny", "2", str(tiny_gguf_other), "--parent", "1",
            "--relation", "finetuned_from", "--min-ram-mb", "512", "--cpu-arch", "x86_64,aarch64", "-o", "json",
        ).stdout
    )  # fmt: skip
    assert child["parent"] == {"model": "tiny", "version": "1", "relation": "finetuned_from"}
    assert child["artifacts"][0]["min_ram_mb"] == 512
    assert child["artifacts"][0]["cpu_arch"] == ["x86_64", "aarch64"]

    shown = cli.json("model", "show", "tiny")
    assert [v["version"] for v in shown["versions"]] == ["1", "2"]  # the replay made no duplicate
    v1 = cli.json("model", "show", "tiny", "1")
    assert v1["artifacts"][0]["sha256"] == digest
    assert v1["artifacts"][0]["size_bytes"] == tiny_gguf.stat().st_size
    assert v1["eval_metrics"] == {"agreement": 0.97} and v1["notes"] == "base"
    assert [m["name"] for m in cli.json("model", "list")] == ["tiny"]
    table = _one_line(cli("model", "show", "tiny").stdout)
    assert "finetuned_from tiny@1" in table and digest[:16] in table


def test_push_of_other_bytes_under_a_taken_version_is_refused(cli: Cli, tiny_gguf: Path, tiny_gguf_other: Path) -> None:
    cli("model", "create", "tiny")
    cli("model", "push", "tiny", "1", str(tiny_gguf))
    refused = cli("model", "push", "tiny", "1", str(tiny_gguf_other), code=1)
    assert "version_exists" in refused.stderr
    assert "push the file under a new VERSION" in _one_line(refused.stderr)
    versions = cli.json("model", "show", "tiny")["versions"]
    assert len(versions) == 1 and len(versions[0]["artifacts"]) == 1


def test_push_adds_a_variant_to_an_existing_version(cli: Cli, tiny_gguf: Path, tiny_gguf_other: Path) -> None:
    cli("model", "create", "tiny")
    missing = _one_line(cli("model", "push", "tiny", "1", str(tiny_gguf), "--add-artifact", code=1).stderr)
    assert "version_not_found" in missing and "slmops model show MODEL" in missing
    cli("model", "push", "tiny", "1", str(tiny_gguf))
    variant = ["--add-artifact", "--quantization", "Q8_0", "--min-ram-mb", "2048", "--accelerators", "npu"]
    added = cli.json("model", "push", "tiny", "1", str(tiny_gguf_other), *variant)
    assert [(a["quantization"], a["min_ram_mb"], a["accelerators"]) for a in added["artifacts"]][-1] == (
        "Q8_0",
        2048,
        ["npu"],
    )
    again = cli("model", "push", "tiny", "1", str(tiny_gguf_other), *variant)
    assert "already holds this file" in again.stdout
    assert len(cli.json("model", "show", "tiny", "1")["artifacts"]) == 2


def test_push_retries_a_lost_response_and_the_server_replays_it(cli: Cli, server_url: str, tiny_gguf: Path) -> None:
    cli("model", "create", "tiny")
    link = FlakyLink(server_url, break_upload="response")
    try:
        result = cli("model", "push", "tiny", "1", str(tiny_gguf), SLMOPS_SERVER=link.url)
    finally:
        link.close()
    assert "upload interrupted" in result.stderr and "already holds this file" in result.stdout
    keys = {line for post in link.posts for line in post.split(b"\r\n") if line.lower().startswith(b"idempotency-key")}
    assert len(link.posts) == 2 and len(keys) == 1  # the retry sent the same key ...
    assert b"idempotent-replayed: true" in b"".join(link.responses).lower()  # ... and the server replayed
    assert [v["version"] for v in cli.json("model", "show", "tiny")["versions"]] == ["1"]


def test_push_cut_mid_upload_keeps_nothing_partial(cli: Cli, server_url: str, settings: Any, tiny_gguf: Path) -> None:
    cli("model", "create", "tiny")
    link = FlakyLink(server_url, break_upload="request", cut_after=tiny_gguf.stat().st_size // 2)
    try:
        result = cli("model", "push", "tiny", "1", str(tiny_gguf), "-o", "json", SLMOPS_SERVER=link.url)
    finally:
        link.close()
    assert "upload interrupted" in result.stderr and len(link.posts) == 2
    assert b"idempotent-replayed" not in b"".join(link.responses).lower()  # the cut upload created nothing
    pushed = json.loads(result.stdout)
    assert pushed["artifacts"][0]["sha256"] == hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    stored = [p for p in settings.blob_dir.rglob("*") if p.is_file()]
    assert [p.stat().st_size for p in stored] == [tiny_gguf.stat().st_size]  # no half file left behind


def test_create_commands_retry_a_lost_answer_without_doing_it_twice(
    cli: Cli, admin_cli: Cli, server_url: str, tiny_gguf: Path
) -> None:
    cli("model", "create", "tiny")
    cli("model", "push", "tiny", "1", str(tiny_gguf))
    device = _through_lossy_link(admin_cli, server_url, b"POST /v1/devices ", "device", "create", "edge-1")
    # The replayed answer carries the enrollment token the server made the first time: it works.
    enrolled = httpx.post(
        f"{server_url}/v1/devices/enroll", json={"enrollment_token": device["enrollment_token"], "hardware": HARDWARE}
    )
    assert enrolled.status_code == 201, enrolled.text
    rollout = _through_lossy_link(cli, server_url, b"POST /v1/rollouts ", "rollout", "create", "tiny", "1")
    assert rollout["state"] == "running"
    assert len(cli.json("device", "list")) == 1 and len(cli.json("rollout", "list")) == 1


def _through_lossy_link(cli: Cli, server_url: str, post: bytes, *command: str) -> Any:
    link = FlakyLink(server_url, break_upload="response", post=post)
    try:
        result = json.loads(cli(*command, "-o", "json", SLMOPS_SERVER=link.url).stdout)
    finally:
        link.close()
    assert link.broken.is_set() and len(link.posts) == 2  # the first answer was lost, then a retry
    assert b"idempotent-replayed: true" in b"".join(link.responses).lower()
    return result


def test_device_create_list_show(admin_cli: Cli, cli: Cli) -> None:
    created = admin_cli("device", "create", "edge-1", "--label", "region=eu", "--label", "tier=canary")
    output = _one_line(created.stdout)
    assert "enrollment token" in output and "SLMOPS_AGENT_ENROLLMENT_TOKEN" in output
    second = admin_cli.json("device", "create", "edge-2", "-l", "region=us")
    assert second["enrollment_token"] and second["labels"] == {"region": "us"}

    eu = cli.json("device", "list", "--selector", "region=eu")
    assert [d["name"] for d in eu] == ["edge-1"]
    assert {d["name"] for d in cli.json("device", "list")} == {"edge-1", "edge-2"}
    assert cli.json("device", "list", "--status", "online") == []
    assert len(cli.json("device", "list", "--limit", "1")) == 1
    assert "1 devices (more left: --limit 0 lists all)" in cli("device", "list", "--limit", "1").stdout
    fresh = admin_cli.json("device", "reissue-token", second["id"])
    assert fresh["enrollment_token"] != second["enrollment_token"]
    stale = httpx.post(
        admin_cli.env["SLMOPS_SERVER"] + "/v1/devices/enroll",
        json={"enrollment_token": second["enrollment_token"], "hardware": HARDWARE},
    )
    assert stale.status_code == 401  # the reissued token replaced the first one
    shown = cli.json("device", "show", second["id"])
    assert shown["name"] == "edge-2" and "enrollment_token" not in shown
    assert "region=us" in cli("device", "show", second["id"]).stdout


def _enroll(admin_cli: Cli, name: str, labels: list[str]) -> dict[str, Any]:
    """Create a device with the CLI, then enroll it as its agent would (REST); returns its credential."""
    created = admin_cli.json("device", "create", name, *[f"--label={label}" for label in labels])
    response = httpx.post(
        admin_cli.env["SLMOPS_SERVER"] + "/v1/devices/enroll",
        json={"enrollment_token": created["enrollment_token"], "hardware": HARDWARE},
    )
    assert response.status_code == 201, response.text
    return dict(response.json())


def _enrolled_device(admin_cli: Cli, name: str, labels: list[str]) -> str:
    return str(_enroll(admin_cli, name, labels)["device_id"])


def test_rollout_lifecycle(cli: Cli, admin_cli: Cli, tiny_gguf: Path, tmp_path: Path) -> None:
    cli("model", "create", "tiny")
    cli("model", "push", "tiny", "1", str(tiny_gguf))
    _enrolled_device(admin_cli, "edge-1", ["region=eu"])
    _enrolled_device(admin_cli, "edge-2", ["region=us"])
    rollout = cli.json(
        "rollout", "create", "tiny", "1", "--selector", "region=eu", "--stage", "canary:1:0",
        "--stage", "fleet:100%:30", "--manual", "--max-p95-ratio", "1.2", "--min-samples", "5",
    )  # fmt: skip
    assert rollout["state"] == "running" and rollout["promotion"] == "manual"
    assert [(s["name"], s["count"], s["percent"], s["min_bake_s"]) for s in rollout["stages"]] == [
        ("canary", 1, None, 0),
        ("fleet", None, 100, 30),
    ]
    status = cli.json("rollout", "status", rollout["id"])
    assert sum(status["devices"].values()) == 1  # only the region=eu device is a target
    view = _one_line(cli("rollout", "status", rollout["id"]).stdout)
    assert "tiny@1" in view and "1/2 canary" in view and "0/2 stages done" in view

    assert cli.json("rollout", "pause", rollout["id"])["state"] == "paused"
    twice = _one_line(cli("rollout", "pause", rollout["id"], code=1).stderr)
    assert "invalid_state" in twice and "resume on paused ones" in twice
    assert cli.json("rollout", "resume", rollout["id"])["state"] == "running"
    assert cli.json("rollout", "promote", rollout["id"])["stage"] == "fleet"
    assert cli("rollout", "abort", rollout["id"]).stdout.startswith(f"rollout {rollout['id']}: aborted")
    assert [r["state"] for r in cli.json("rollout", "list")] == ["aborted"]
    finished = cli("rollout", "status", rollout["id"], "--watch", code=3)  # aborted: not completed
    assert "aborted" in finished.stdout

    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"stages": [{"name": "all", "percent": 100, "min_bake_s": 0}], "gates": {}}))
    again = cli.json("rollout", "create", "tiny", "1", "--plan", str(plan), "--max-error-rate", "0.01")
    assert [s["name"] for s in again["stages"]] == ["all"] and again["promotion"] == "auto"
    assert sum(again["devices"].values()) == 2


def test_watch_waits_out_an_unreachable_control_plane(
    cli: Cli, admin_cli: Cli, server_url: str, operator_headers: dict[str, str], tiny_gguf: Path
) -> None:
    cli("model", "create", "tiny")
    cli("model", "push", "tiny", "1", str(tiny_gguf))
    _enrolled_device(admin_cli, "edge-1", [])
    rollout_id = cli.json("rollout", "create", "tiny", "1")["id"]
    link = FlakyLink(server_url)

    def outage_then_abort() -> None:
        # Without a fleet runtime nothing advances the rollout: the link fails while we watch, then an
        # operator aborts it and the link comes back.
        try:
            # A second request means the first was answered: the watch loop runs (a failure at the very
            # start is reported at once, as a wrong --server should be).
            wait_for(lambda: link.requests >= 2, what="the watch polling through the link")
            link.go_down()
            wait_for(lambda: link.refused >= 2, what="the watch retrying during the outage")
        finally:
            httpx.post(f"{server_url}/v1/rollouts/{rollout_id}/abort", headers=operator_headers).raise_for_status()
            link.go_up()

    operator = threading.Thread(target=outage_then_abort)
    operator.start()
    try:
        watched = cli("rollout", "status", rollout_id, "--watch", "--interval", "0.05", "-o", "json", code=3,
                      SLMOPS_SERVER=link.url)  # fmt: skip
    finally:
        operator.join()
        link.close()
    assert json.loads(watched.stdout)["state"] == "aborted"
    assert link.refused >= 2  # it kept trying instead of giving up with an error


def test_errors_say_what_to_do_next(cli: Cli, server_url: str, viewer_headers: dict[str, str], tiny_gguf: Path) -> None:
    unauthenticated = cli("model", "list", code=1, SLMOPS_TOKEN="not-a-token")
    message = _one_line(unauthenticated.stderr)
    assert "unauthenticated" in message and "slmops token create --role operator" in message

    missing = _one_line(cli("model", "show", "nope", code=1).stderr)
    assert "model_not_found" in missing and "slmops model list" in missing

    forbidden = cli("model", "create", "x", code=1, SLMOPS_TOKEN=_bearer(viewer_headers))
    assert "forbidden" in forbidden.stderr and "--role operator" in _one_line(forbidden.stderr)

    unknown = _one_line(cli("rollout", "status", "does-not-exist", code=1).stderr)
    assert "rollout_not_found" in unknown and "slmops rollout list" in unknown

    bad_stage = _one_line(cli("rollout", "create", "m", "1", "--stage", "canary", code=1).stderr)
    assert "name:percent%[:bake_s]" in bad_stage

    cli("model", "create", "lonely")
    no_devices = _one_line(cli("rollout", "create", "lonely", "1", code=1).stderr)
    assert "version_not_found" in no_devices  # the version is checked first
    cli("model", "push", "lonely", "1", str(tiny_gguf))
    no_devices = _one_line(cli("rollout", "create", "lonely", "1", "--selector", "region=mars", code=1).stderr)
    assert "validation_error" in no_devices and "slmops device list --selector 'region=mars'" in no_devices

    bad_since = _one_line(cli("telemetry", "version", "m", "1", "--since", "yesterday", code=1).stderr)
    assert "is not a duration like 30s, 5m, 6h or 2d" in bad_since

    no_server = cli("model", "list", code=1, SLMOPS_SERVER=f"http://127.0.0.1:{_free_port()}")
    assert "connection_failed" in no_server.stderr and "slmops server" in no_server.stderr


def test_server_and_token_from_the_config_file(
    server_url: str, operator_headers: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "cli.toml"
    config.write_text(f'server = "{server_url}/"\ntoken = "{_bearer(operator_headers)}"\n')
    for name in ("SLMOPS_SERVER", "SLMOPS_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLMOPS_CLI_CONFIG", str(config))
    assert resolve_config() == resolve_config(None, None)
    assert resolve_config().server == server_url
    result = CliRunner().invoke(cli_app, ["model", "list", "-o", "json"], env={"SLMOPS_CLI_CONFIG": str(config)})
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout) == []
    # Environment beats the file, flags beat both.
    monkeypatch.setenv("SLMOPS_TOKEN", "from-env")
    assert resolve_config().token == "from-env"
    assert resolve_config("http://elsewhere:1", "from-flag") == type(resolve_config())(
        "http://elsewhere:1", "from-flag"
    )


def test_login_checks_the_token_then_saves_it_for_later_commands(
    server_url: str, operator_headers: dict[str, str], tmp_path: Path
) -> None:
    config = tmp_path / "conf" / "cli.toml"
    runner, env = CliRunner(), {"SLMOPS_CLI_CONFIG": str(config), "SLMOPS_SERVER": None, "SLMOPS_TOKEN": None}
    refused = runner.invoke(cli_app, ["login", "--server", server_url, "--token", "wrong"], env=env)
    assert refused.exit_code == 1 and "unauthenticated" in refused.stderr and not config.exists()
    token = _bearer(operator_headers)
    saved = runner.invoke(cli_app, ["login", "--server", server_url + "/", "--token", token], env=env)
    assert saved.exit_code == 0, saved.stderr
    assert config.stat().st_mode & 0o777 == 0o600
    listed = runner.invoke(cli_app, ["model", "list", "-o", "json"], env=env)
    assert listed.exit_code == 0 and json.loads(listed.stdout) == []


def test_multipart_body_streams_in_bounded_chunks(tmp_path: Path) -> None:
    path = tmp_path / "blob.bin"
    path.write_bytes(bytes(range(256)) * (3 * CHUNK // 256 + 7))
    body = MultipartFile(path, {"version": "1", "sha256": "0" * 64})
    seen: list[int] = []
    chunks = list(body.iter_chunks(seen.append))
    assert max(len(c) for c in chunks) <= CHUNK  # never the whole file in memory
    assert sum(seen) == path.stat().st_size
    raw = b"".join(chunks)
    assert len(raw) == len(body)
    assert path.read_bytes() in raw and raw.endswith(f"--{body.boundary}--\r\n".encode())


@pytest.fixture
def fleet_url(tmp_path: Path, db_url: str, engine: Any, app: Any) -> Iterator[tuple[str, Settings]]:
    """A control plane with its fleet runtime (controller, MQTT ingest) on the real Mosquitto."""
    settings = Settings(
        data_dir=tmp_path / "fleet",
        database_url=db_url,
        mqtt_url=MOSQUITTO,
        mqtt_topic_prefix=f"slmops-test/{uuid.uuid4().hex[:10]}",
        controller_tick_s=0.1,
        mqtt_client_id=f"cp-{uuid.uuid4().hex[:8]}",
    )
    with _serve(create_app(settings, engine=engine)) as url:
        yield url, settings  # the `app` fixture empties the tables afterwards


@pytest.mark.mosquitto
def test_watch_a_real_rollout_complete_then_roll_back(
    fleet_url: tuple[str, Settings],
    operator_headers: dict[str, str],
    admin_headers: dict[str, str],
    tiny_gguf: Path,
    tiny_gguf_other: Path,
    tmp_path: Path,
) -> None:
    url, settings = fleet_url
    cli, admin_cli = Cli(url, _bearer(operator_headers), tmp_path), Cli(url, _bearer(admin_headers), tmp_path)
    cli("model", "create", "tiny")
    cli("model", "push", "tiny", "1", str(tiny_gguf))
    cli("model", "push", "tiny", "2", str(tiny_gguf_other))
    creds = [_enroll(admin_cli, f"edge-{i}", ["region=eu"]) for i in range(2)]
    behaviour = SimBehaviour(latency_ms=lambda v: {"1": 40.0, "2": 200.0}[v], requests_per_window=10)
    devices = start_sim_devices(MOSQUITTO, Topics(settings.mqtt_topic_prefix), creds, behaviour)
    fast = ["--stage", "canary:1:0.3", "--stage", "fleet:100%:0.3", "--min-samples", "10"]
    try:
        with TelemetryPump(devices):
            wait_for(lambda: len(cli.json("device", "list", "--status", "online")) == 2, what="devices online")
            first = cli.json("rollout", "create", "tiny", "1", *fast, "--manual")
            waiting = wait_for(
                lambda: cli.json("rollout", "status", first["id"])["state"] == "waiting_promotion",
                what="the canary's gates to pass",
            )
            assert waiting and "gates passed: promote with" in _one_line(cli("rollout", "status", first["id"]).stdout)
            assert cli.json("rollout", "promote", first["id"])["stage"] == "fleet"
            done = _one_line(cli("rollout", "status", first["id"], "--watch", "--interval", "0.2").stdout)
            assert "completed" in done and "2/2 stages done" in done and "min_activated_fraction pass" in done

            second = cli.json("rollout", "create", "tiny", "2", *fast, "--max-p95-ratio", "1.5")
            failed = cli("rollout", "status", second["id"], "--watch", "--interval", "0.2", code=3)
            view = _one_line(failed.stdout)
            assert "rolled_back" in view and "last gate evaluation: fail" in view
            assert "max_p95_latency_ratio fail" in view  # the check that decided it, with value and limit
            # The rolled-back canary returns to v1 (stopping a simulated device mid-apply races its timer).
            wait_for(lambda: {d.current_version for d in devices} == {"1"}, what="devices back on v1")
            wait_for(lambda: _running(cli) == [("tiny", "1", 2)], what="the control plane sees both on v1")
            _fleet_telemetry_shows_the_rollback(cli, creds[0]["device_id"])
    finally:
        for device in devices:
            device.stop()
    final = cli.json("rollout", "status", second["id"])
    ratio = next(c for c in final["last_evaluation"]["details"]["checks"] if c["gate"] == "max_p95_latency_ratio")
    assert ratio["result"] == "fail" and ratio["limit"] == 1.5
    history = cli.json("rollout", "evaluations", second["id"])
    assert history[0]["result"] == "fail" and history[0] == final["last_evaluation"]  # newest first
    table = _one_line(cli("rollout", "evaluations", second["id"]).stdout)
    assert f"max_p95_latency_ratio {ratio['value']:g} / 1.5" in table


def _fleet_telemetry_shows_the_rollback(cli: Cli, device_id: str) -> None:
    summary = cli.json("telemetry", "summary")
    assert summary["devices"] == 2 and summary["online"] == 2
    assert "2 devices (online 2)" in _one_line(cli("telemetry", "summary").stdout)
    v2 = cli.json("telemetry", "version", "tiny", "2", "--since", "10m", "--step", "1m")
    served = [p for p in v2["points"] if p["requests"]]
    assert served and all(p["latency_p95_ms"] > 100 for p in served)  # the canary's slow version (200 ms)
    table = _one_line(cli("telemetry", "version", "tiny", "1", "--since", "10m", "--step", "1m").stdout)
    assert "tiny@1, every 60s" in table and "p95 ms" in table
    device = cli.json("telemetry", "device", device_id, "--since", "10m", "--step", "1m")
    assert device["device_id"] == device_id and any(p["requests"] for p in device["points"])


def _running(cli: Cli) -> list[tuple[str, str, int]]:
    return [(v["model"], v["version"], v["devices"]) for v in cli.json("telemetry", "summary")["by_version"]]
