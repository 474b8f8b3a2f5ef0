"""`slmops model evaluate` and the registry form of `slmops model quantize` (a control-plane job).

Evaluation runs on this machine: both artifacts are downloaded (cached by sha256), measured each in
its own process, compared, printed, and stored on the variant's version and artifact over REST.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.markup import escape

from slmops.cli.app import model_app
from slmops.cli.client import ApiClient
from slmops.cli.ops_common import Output, OutputOpt, ServerOpt, TokenOpt, api, console, emit_json, usage_error

JOB_POLL_S = 0.5


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "slmops" / "artifacts"


def _evaluable(version: dict[str, Any], sha256: str | None) -> dict[str, Any]:
    for artifact in version["artifacts"]:
        if artifact["format"] in ("gguf", "onnx", "onnx-tar") and (sha256 is None or artifact["sha256"] == sha256):
            return artifact  # type: ignore[no-any-return]
    usage_error("not_evaluable", f"{version['model']}@{version['version']} has no GGUF or ONNX artifact to evaluate")


def download_artifact(client: ApiClient, artifact: dict[str, Any], into: Path) -> Path:
    """The artifact's bytes in `into` (reused when already there and intact)."""
    path = into / f"{artifact['sha256']}.{artifact['format']}"
    if path.is_file() and path.stat().st_size == artifact["size_bytes"]:
        return path
    into.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(path.suffix + ".part")
    digest = hashlib.sha256()
    url = artifact["download_url"]
    headers = {} if url.startswith("http") else {"Authorization": f"Bearer {client.config.token}"}
    full = url if url.startswith("http") else client.config.server + url
    with httpx.stream("GET", full, headers=headers, timeout=60, follow_redirects=True) as response:
        response.raise_for_status()
        with partial.open("wb") as out:
            for chunk in response.iter_bytes(1 << 20):
                digest.update(chunk)
                out.write(chunk)
    if digest.hexdigest() != artifact["sha256"]:
        partial.unlink(missing_ok=True)
        usage_error("sha256_mismatch", f"downloaded bytes of {artifact['sha256']} do not match their digest")
    partial.replace(path)
    return path


def local_model(client: ApiClient, artifact: dict[str, Any], into: Path) -> Path:
    """What a runtime loads: the downloaded file, or the .onnx graph of an unpacked ONNX model folder."""
    path = download_artifact(client, artifact, into)
    if artifact["format"] != "onnx-tar":
        return path
    from shared.formats.onnx_bundle import extract_bundle, find_graph

    folder = into / artifact["sha256"]
    if not folder.is_dir():
        staging = into / f".{artifact['sha256']}.{os.getpid()}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        extract_bundle(path, staging)
        staging.replace(folder)
    return find_graph(folder)


def _parent_ref(version: dict[str, Any], against: str | None) -> tuple[str, str]:
    if against:
        model, _, name = against.rpartition("@")
        return model or version["model"], name
    if version.get("parent"):
        return version["parent"]["model"], version["parent"]["version"]
    usage_error("no_parent", f"{version['model']}@{version['version']} has no parent; pass --against VERSION")


def _measure_pair(
    client: ApiClient, variant: dict[str, Any], parent: dict[str, Any], artifact: str | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metrics, the variant artifact measured): both downloaded, each measured in its own process."""
    from slmops.modelopt.compare import evaluate_files

    parent_artifact = _evaluable(parent, None)
    parent_path = local_model(client, parent_artifact, cache_dir())
    adapter = next((a for a in variant["artifacts"] if a["format"] == "gguf-lora"), None)
    if adapter is not None and artifact in (None, adapter["sha256"]):
        # An adapter is measured as the parent (its base) with the adapter loaded on top.
        measured, variant_path = adapter, parent_path
        lora_path: Path | None = download_artifact(client, adapter, cache_dir())
    else:
        measured, lora_path = _evaluable(variant, artifact), None
        variant_path = local_model(client, measured, cache_dir())
    if measured["format"].startswith("onnx") != parent_artifact["format"].startswith("onnx"):
        usage_error("not_comparable", "variant and parent are in different formats")
    metrics = evaluate_files(
        str(variant_path),
        str(parent_path),
        parent_artifact["format"],
        variant_fmt=None if lora_path else measured["format"],  # an adapter runs on its base's format
        lora_path=str(lora_path) if lora_path else None,
        relation=(variant.get("parent") or {}).get("relation"),
    )
    return metrics, measured


@model_app.command("evaluate")
def evaluate(
    model: Annotated[str, typer.Argument(help="Model name.")],
    version: Annotated[str, typer.Argument(help="The variant to evaluate.")],
    against: Annotated[str | None, typer.Option("--against", help="Parent (version or model@version).")] = None,
    artifact: Annotated[str | None, typer.Option("--artifact", help="sha256 of the variant's artifact.")] = None,
    store: Annotated[bool, typer.Option("--store/--no-store", help="Save the metrics in the registry.")] = True,
    server: ServerOpt = None,
    token: TokenOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Measure a version next to its parent on this machine (speed, memory, quality) and store the metrics."""
    from slmops.modelopt.compare import format_table

    with api(server, token) as client:
        variant = client.get(f"/v1/models/{model}/versions/{version}")
        parent_model, parent_version = _parent_ref(variant, against)
        parent = client.get(f"/v1/models/{parent_model}/versions/{parent_version}")
        metrics, measured = _measure_pair(client, variant, parent, artifact)
        against_ref = f"{parent_model}@{parent_version}"
        if store:
            body = {"metrics": metrics, "artifact_sha256": measured["sha256"], "against": against_ref}
            client.request("PUT", f"/v1/models/{model}/versions/{version}/eval-metrics", json=body)
    if output is Output.json:
        emit_json(metrics | {"evaluated_against": against_ref})
        return
    console.print(escape(format_table(metrics, f"{model}@{version}", against_ref)), highlight=False)


def quantize_registry_version(
    model: str, version: str, to: str, new_version: str | None, wait: bool, server: str | None, token: str | None
) -> None:
    """Start `POST .../quantize` and follow the job until it ends (unless --no-wait)."""
    with api(server, token) as client:
        body = {"to": to, **({"version": new_version} if new_version else {})}
        job = client.post(f"/v1/models/{model}/versions/{version}/quantize", body)
        console.print(f"job {job['id']}: {escape(job['target'])}", highlight=False)
        while wait and job["state"] in ("queued", "running"):
            time.sleep(JOB_POLL_S)
            job = client.get(f"/v1/jobs/{job['id']}")
    if not wait:
        return
    if job["state"] != "succeeded":
        usage_error("job_failed", f"quantize job {job['id']} failed: {job.get('error')}")
    result = job["result"]
    console.print(
        f"registered {escape(result['model'])}@{escape(result['version'])}: {result['parent_size_bytes']:,} -> "
        f"{result['size_bytes']:,} bytes ({result['size_reduction']:.1%} smaller), sha256 {result['sha256']}",
        highlight=False,
    )
