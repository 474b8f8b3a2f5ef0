"""`slmops model push`: stream a file into the registry, sha256-verified, safe to run again.

A push first hashes the file, then asks whether the version already holds those bytes (a re-run
after success uploads nothing). The upload is one streamed multipart request carrying the declared
sha256 and an Idempotency-Key derived from (model, version, sha256): when the connection breaks, the
retry either replays the server's stored answer (the first upload did land) or uploads afresh (the
server kept nothing of a cut upload).

A folder (an ONNX graph with external data files, as Olive and optimum export large models) is
checked and packed into a deterministic tar first (`shared.formats.onnx_bundle`), which is then pushed like
a file: the same folder gives the same bytes, so re-running the push stays safe.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from shared.hashing import file_sha256
from slmops.cli.app import model_app
from slmops.cli.client import ApiClient, ApiError, MultipartFile, push_idempotency_key
from slmops.cli.ops_common import (
    Output,
    OutputOpt,
    ServerOpt,
    TokenOpt,
    api,
    artifacts_table,
    console,
    emit_json,
    err,
    parse_json_object,
)

if TYPE_CHECKING:
    from rich.progress import Progress

PUSH_ATTEMPTS = 3


@model_app.command("push")
def model_push(
    name: str,
    version: str,
    file: Annotated[
        Path,
        typer.Argument(exists=True, readable=True, help="GGUF or ONNX file, or ONNX model folder with external data."),
    ],
    add_artifact: Annotated[
        bool, typer.Option("--add-artifact", help="Add FILE as another variant of an existing VERSION.")
    ] = False,
    quantization: Annotated[str | None, typer.Option(help="e.g. Q8_0, F16 (default: read from the file)")] = None,
    parent: Annotated[str | None, typer.Option(help="Parent version, or model@version.")] = None,
    relation: Annotated[
        str | None, typer.Option(help="quantized_from, distilled_from, finetuned_from or adapter_of")
    ] = None,
    notes: Annotated[str | None, typer.Option(help="Free text shown with the version.")] = None,
    metrics: Annotated[str | None, typer.Option(help='Evaluation metrics, a JSON object: {"ppl": 7.1}')] = None,
    min_ram_mb: Annotated[int | None, typer.Option(help="Least device RAM this artifact needs.")] = None,
    cpu_arch: Annotated[str | None, typer.Option(help="Comma separated, e.g. x86_64,aarch64")] = None,
    accelerators: Annotated[str | None, typer.Option(help="Comma separated, e.g. cuda,npu")] = None,
    provenance: Annotated[
        str | None, typer.Option(help='Where it came from, a JSON object: {"tool": "olive", "run": "..."}')
    ] = None,
    teacher: Annotated[str | None, typer.Option(help="Distillation: the teacher model.")] = None,
    dataset: Annotated[str | None, typer.Option(help="Distillation or fine-tuning dataset.")] = None,
    method: Annotated[str | None, typer.Option(help="e.g. distillation, lora, qlora, full fine-tune")] = None,
    server: ServerOpt = None,
    token: TokenOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Upload FILE as VERSION of model NAME: streamed, sha256-verified, safe to run again.

    FILE may be a folder holding one .onnx graph and the external data files it names.
    """
    parse_json_object("--metrics", metrics)
    origin = parse_json_object("--provenance", provenance) or {}
    origin |= {k: v for k, v in (("teacher", teacher), ("dataset", dataset), ("method", method)) if v}
    fields = {
        "version": version,
        "quantization": quantization,
        "parent": parent,
        "relation": relation,
        "notes": notes,
        "eval_metrics": metrics,
        "provenance": json.dumps(origin) if origin else None,
        "min_ram_mb": None if min_ram_mb is None else str(min_ram_mb),
        "cpu_arch": cpu_arch,
        "accelerators": accelerators,
    }
    with api(server, token) as client, _as_file(file) as upload:
        sha256 = _hash_with_progress(upload)
        form = {"sha256": sha256} | {k: v for k, v in fields.items() if v is not None}
        result, replayed = _push(client, name, version, MultipartFile(upload, form), sha256, add_artifact)
    if output is Output.json:
        emit_json(result)
        return
    if replayed:
        console.print(f"[bold]{name}@{version}[/bold] already holds this file (sha256 {sha256}); nothing duplicated")
    else:
        console.print(f"pushed [bold]{name}@{version}[/bold]: sha256 {sha256} verified by the server")
    console.print(artifacts_table([result]))


def _push(
    client: ApiClient, name: str, version: str, body: MultipartFile, sha256: str, add_artifact: bool
) -> tuple[dict[str, Any], bool]:
    """(the version, whether the bytes were already there); refuses other bytes before uploading them."""
    existing = _existing_version(client, name, version)
    if existing is not None and _holds(existing, sha256):
        return existing, True
    if add_artifact:
        if existing is None:
            raise ApiError("version_not_found", f"{name}@{version} does not exist; push it without --add-artifact")
        _upload(client, f"/v1/models/{name}/versions/{version}/artifacts", body, name, version, sha256)
        return client.get(f"/v1/models/{name}/versions/{version}"), False
    if existing is not None:
        raise ApiError(
            "version_exists", f"{name}@{version} already exists with other bytes (--add-artifact adds a variant)"
        )
    return _upload(client, f"/v1/models/{name}/versions", body, name, version, sha256)


def _existing_version(client: ApiClient, name: str, version: str) -> dict[str, Any] | None:
    try:
        existing: dict[str, Any] = client.get(f"/v1/models/{name}/versions/{version}")
    except ApiError as exc:
        if exc.code == "version_not_found":
            return None
        raise
    return existing


def _holds(version: dict[str, Any], sha256: str) -> bool:
    return any(a["sha256"] == sha256 for a in version["artifacts"])


def _upload(
    client: ApiClient, path: str, body: MultipartFile, name: str, version: str, sha256: str
) -> tuple[dict[str, Any], bool]:
    """POST the body, retrying a broken connection with the same Idempotency-Key (replayed, not duplicated)."""
    key = push_idempotency_key(name, version, sha256)
    for attempt in range(1, PUSH_ATTEMPTS + 1):
        try:
            return _upload_once(client, path, body, key)
        except ApiError as exc:
            if exc.code == "version_exists":  # a concurrent push, or one whose key record expired
                existing = _existing_version(client, name, version)
                if existing is not None and _holds(existing, sha256):
                    return existing, True
            if exc.code != "connection_failed" or attempt == PUSH_ATTEMPTS:
                raise
            err.print(f"[yellow]upload interrupted ({exc.detail}); retrying ({attempt}/{PUSH_ATTEMPTS - 1})[/yellow]")
            time.sleep(attempt)
    raise AssertionError("unreachable")


def _upload_once(client: ApiClient, path: str, body: MultipartFile, key: str) -> tuple[dict[str, Any], bool]:
    with _progress() as progress:
        task = progress.add_task(f"upload {body.path.name}", total=body.path.stat().st_size)
        response = client.upload(path, body, idempotency_key=key, on_bytes=lambda n: progress.advance(task, n))
    return response.json(), response.headers.get("idempotent-replayed") == "true"


def _progress() -> Progress:
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err,
    )


@contextmanager
def _as_file(path: Path) -> Iterator[Path]:
    """`path` itself, or for a model folder a temporary deterministic tar of it."""
    if not path.is_dir():
        yield path
        return
    from shared.formats.onnx_bundle import BundleError, check_folder, pack_folder

    try:
        checked = check_folder(path)
    except BundleError as exc:
        raise ApiError("invalid_model_folder", f"{path}: {exc}") from exc
    with tempfile.TemporaryDirectory(prefix="slmops-push-") as tmp:
        bundle = Path(tmp) / f"{path.resolve().name}.onnx.tar"
        with _progress() as progress:
            task = progress.add_task(f"pack {path.name}", total=checked.unpacked_bytes)
            pack_folder(path, bundle, contents=checked, on_bytes=lambda n: progress.advance(task, n))
        err.print(f"packed {len(checked.files)} files ({checked.graph} and its external data) into one tar")
        yield bundle


def _hash_with_progress(file: Path) -> str:
    with _progress() as progress:
        task = progress.add_task("sha256", total=file.stat().st_size)
        return file_sha256(file, lambda n: progress.advance(task, n))
