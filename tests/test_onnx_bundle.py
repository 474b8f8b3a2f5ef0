"""ONNX model folders with external data: packed by the CLI, checked by the registry, unpacked and served by agents."""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import tarfile
from pathlib import Path

import httpx
import onnx
import openai
import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from edge_agent.download import Downloader
from edge_agent.errors import InsufficientSpaceError
from edge_agent.store import ModelStore
from shared.desired import ArtifactRef, DesiredState
from shared.formats.onnx_bundle import BundleError, check_folder, pack_folder
from slmops.cli import tiny  # noqa: F401  (registers `model make-tiny`)
from slmops.cli.app import app as cli_app
from slmops.tinymodels import write_tiny_onnx, write_tiny_onnx_folder
from tests import test_lora_rollout
from tests.support.agent import AgentProcess
from tests.support.assign import assign_version
from tests.support.cli import (  # noqa: F401  (fixtures)
    Cli,
    admin_cli_fixture,
    bearer,
    cli_fixture,
    one_line,
    server_url_fixture,
)
from tests.test_lora_rollout import _roll_out, _start_agent

rollout_fleet = test_lora_rollout.fleet  # a control plane on Mosquitto, as a fixture of this name


@pytest.fixture(name="onnx_folder", scope="module")
def onnx_folder_fixture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_onnx_folder(tmp_path_factory.mktemp("onnx-folder") / "tiny-ext", seed=0)


def _copy(folder: Path, dest: Path) -> Path:
    return Path(shutil.copytree(folder, dest))


def _relocate(folder: Path, location: str) -> None:
    """Point every external tensor of the folder's graph at `location`."""
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    (folder / "model.onnx").write_bytes(model.SerializeToString())


def _tar(dest: Path, files: dict[str, bytes], *, link: str | None = None) -> Path:
    with tarfile.open(dest, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if link is not None:
            info = tarfile.TarInfo(link)
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
    return dest


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_pack_is_deterministic_and_refuses_broken_folders(onnx_folder: Path, tmp_path: Path) -> None:
    first = pack_folder(onnx_folder, tmp_path / "a.tar")
    again = write_tiny_onnx_folder(tmp_path / "rewritten", seed=0)  # new files, new mtimes, same content
    pack_folder(again, tmp_path / "b.tar")
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    assert first.graph == "model.onnx" and set(first.files) == {"model.onnx", "model.onnx.data"}
    assert first.external_data == {"model.onnx.data": first.files["model.onnx.data"]}

    per_tensor = check_folder(write_tiny_onnx_folder(tmp_path / "per-tensor", one_file=False))
    assert len(per_tensor.external_data) == 7 and set(per_tensor.external_data) < set(per_tensor.files)

    missing = _copy(onnx_folder, tmp_path / "missing")
    (missing / "model.onnx.data").unlink()
    short = _copy(onnx_folder, tmp_path / "short")
    (short / "model.onnx.data").write_bytes((onnx_folder / "model.onnx.data").read_bytes()[:1000])
    escaping = _copy(onnx_folder, tmp_path / "escaping")
    _relocate(escaping, "../model.onnx.data")
    two_graphs = _copy(onnx_folder, tmp_path / "two-graphs")
    shutil.copy(two_graphs / "model.onnx", two_graphs / "other.onnx")
    inline = tmp_path / "inline"
    inline.mkdir()
    onnx.save_model(onnx.load(str(onnx_folder / "model.onnx")), str(inline / "model.onnx"))
    for folder, why in [
        (missing, "'model.onnx.data', which is missing"),
        (short, "holds 1000 bytes"),
        (escaping, "unsafe path '../model.onnx.data'"),
        (two_graphs, "exactly one top-level .onnx file (found: model.onnx, other.onnx)"),
        (inline, "keeps all its weights inside"),
    ]:
        with pytest.raises(BundleError, match=re.escape(why)):
            check_folder(folder)


def test_make_tiny_writes_a_folder_with_external_data(tmp_path: Path) -> None:
    out = tmp_path / "made"
    args = ["model", "make-tiny", "--format", "onnx", "--external-data", "--out", str(out), "--seed", "3"]
    result = CliRunner().invoke(cli_app, args)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.onnx.data"]
    assert check_folder(out).external_data
    refused = CliRunner().invoke(cli_app, ["model", "make-tiny", "--external-data", "--out", str(tmp_path / "x")])
    assert refused.exit_code == 2 and "ONNX models only" in refused.output


def test_registry_refuses_broken_and_malicious_bundles(client, operator_headers, onnx_folder, tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert client.post("/v1/models", json={"name": "bundles"}, headers=operator_headers).status_code == 201
    good = _files(onnx_folder)
    cases = {
        "no-data": {"model.onnx": good["model.onnx"]},
        "short-data": {**good, "model.onnx.data": good["model.onnx.data"][:-4]},
        "traversal": {**good, "../evil.sh": b"#!/bin/sh\n"},
        "absolute": {**good, "/etc/cron.d/evil": b"* * * * * root true\n"},
        "no-graph": {"model.onnx.data": good["model.onnx.data"]},
        "bad-graph": {**good, "model.onnx": b"\x08garbage"},
    }
    bundles = {name: _tar(tmp_path / f"{name}.tar", files) for name, files in cases.items()}
    bundles["symlink"] = _tar(tmp_path / "symlink.tar", good, link="passwd")
    for version, bundle in enumerate(bundles.values()):
        with bundle.open("rb") as fh:
            response = client.post(
                "/v1/models/bundles/versions",
                data={"version": str(version)},
                files={"file": (bundle.name, fh, "application/x-tar")},
                headers=operator_headers,
            )
        assert response.status_code == 422, (bundle.name, response.text)
        assert response.json()["code"] == "unrecognized_artifact", bundle.name
    assert client.get("/v1/models/bundles/versions", headers=operator_headers).json()["data"] == []


def test_cli_pushes_a_folder_with_provenance_and_replays(cli: Cli, onnx_folder: Path, tmp_path: Path) -> None:
    cli("model", "create", "tiny-ext")
    push = ("model", "push", "tiny-ext", "1", str(onnx_folder), "--teacher", "tiny-big", "--method", "distillation")
    first = cli(*push)
    assert "pack tiny-ext" in first.stderr and "upload tiny-ext.onnx.tar" in first.stderr
    assert "packed 2 files" in one_line(first.stderr)
    version = cli.json("model", "show", "tiny-ext", "1")
    assert version["provenance"] == {"teacher": "tiny-big", "method": "distillation"}
    (artifact,) = version["artifacts"]
    sizes = {p.name: p.stat().st_size for p in onnx_folder.iterdir()}
    assert artifact["format"] == "onnx-tar" and artifact["quantization"] == "fp32"
    meta = artifact["file_metadata"]
    assert meta["files"] == sizes and meta["unpacked_bytes"] == sum(sizes.values())
    assert meta["graph"] == "model.onnx" and meta["external_data"] == ["model.onnx.data"]
    assert [i["name"] for i in meta["inputs"]] == ["input_ids"]

    again = cli(*push)  # the same folder packs to the same bytes: nothing uploaded twice
    assert "already holds this file" in again.stdout and "upload" not in again.stderr

    broken = _copy(onnx_folder, tmp_path / "broken")
    (broken / "model.onnx.data").unlink()
    refused = cli("model", "push", "tiny-ext", "2", str(broken), code=1)
    assert "invalid_model_folder" in refused.stderr and "is missing" in one_line(refused.stderr)
    assert [v["version"] for v in cli.json("model", "show", "tiny-ext")["versions"]] == ["1"]


@pytest.mark.slow
def test_agent_deploys_unpacks_serves_and_collects_bundles(  # type: ignore[no-untyped-def]
    cli: Cli, admin_cli: Cli, server_url: str, tmp_path: Path, engine
) -> None:
    cli("model", "create", "tiny-ext")
    artifacts = []
    for seed in range(3):
        folder = write_tiny_onnx_folder(tmp_path / f"seed{seed}", seed=seed)
        artifacts.append(cli.json("model", "push", "tiny-ext", str(seed + 1), str(folder))["artifacts"][0])
    device = admin_cli.json("device", "create", "edge-ext")
    agent = AgentProcess(
        tmp_path / "data", control_plane_url=server_url, enrollment_token=device["enrollment_token"], keep_versions=2
    )
    agent.start()
    try:
        for number, artifact in enumerate(artifacts[:2], start=1):
            _deploy(agent, str(number), artifact, engine, device["id"])
        unpacked = agent.data_dir / "store" / "unpacked"
        first, second, third = (a["sha256"] for a in artifacts)
        assert (unpacked / second / "model.onnx.data").stat().st_size == artifacts[1]["file_metadata"]["files"][
            "model.onnx.data"
        ]
        _assert_serves(agent)

        agent.stop()  # a lost folder is unpacked again from its blob, after the blob is re-verified
        shutil.rmtree(unpacked / second)
        agent.start().wait_ready()
        assert (unpacked / second / "model.onnx").is_file()
        _assert_serves(agent)

        # Current and previous are kept; the first goes, folder and all.
        _deploy(agent, "3", artifacts[2], engine, device["id"])
        assert sorted(p.name for p in unpacked.iterdir()) == sorted([second, third])
        assert not (agent.data_dir / "store" / "sha256" / first).exists()
    finally:
        agent.stop()


@pytest.mark.slow
def test_a_pushed_folder_is_evaluated_against_its_parent(cli: Cli, onnx_folder: Path, tmp_path: Path) -> None:
    tiny_onnx = write_tiny_onnx(tmp_path / "tiny.onnx", seed=0)
    cli("model", "create", "tiny-ext")
    cli("model", "push", "tiny-ext", "1", str(tiny_onnx))  # the same weights, inside one file
    cli("model", "push", "tiny-ext", "2", str(onnx_folder), "--parent", "1", "--relation", "distilled_from")
    out = cli("model", "evaluate", "tiny-ext", "2", "-o", "json", XDG_CACHE_HOME=str(tmp_path / "cache"))
    metrics = json.loads(out.stdout)
    assert metrics["format"] == "onnx-tar" and metrics["argmax_agreement"] == 1.0
    assert metrics["max_abs_diff"] < 1e-4 and metrics["quality_retention"] == pytest.approx(1.0, abs=1e-3)
    assert metrics["size_bytes"] == sum(p.stat().st_size for p in onnx_folder.iterdir())
    assert metrics["parent_size_bytes"] == tiny_onnx.stat().st_size
    stored = cli.json("model", "show", "tiny-ext", "2")
    assert stored["artifacts"][0]["eval_metrics"]["argmax_agreement"] == 1.0, stored


@pytest.mark.mosquitto
@pytest.mark.slow
def test_a_rollout_ships_a_pushed_folder_to_a_real_agent(  # type: ignore[no-untyped-def]
    rollout_fleet, admin_headers, operator_headers, onnx_folder: Path, tmp_path: Path
) -> None:
    url, counted = rollout_fleet
    cli = Cli(url, bearer(operator_headers), tmp_path)
    cli("model", "create", "tiny")
    artifact = cli.json("model", "push", "tiny", "1", str(onnx_folder))["artifacts"][0]
    device_id, agent = _start_agent(url, admin_headers, tmp_path, "a")
    try:
        assert _roll_out(url, operator_headers, "1")["state"] == "completed"
        assert counted.sent[(device_id, artifact["sha256"])] == artifact["size_bytes"]  # one tar crossed the wire
        assert agent.state()["current"]["version"] == "1"
        assert (agent.data_dir / "store" / "unpacked" / artifact["sha256"] / "model.onnx.data").is_file()
        ai = openai.OpenAI(base_url=f"{agent.url}/v1", api_key="unused", max_retries=0)
        reply = ai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert reply.choices[0].message.content
    finally:
        agent.stop()


def _deploy(agent: AgentProcess, version: str, artifact: dict, engine: sa.Engine, device_id: str) -> None:  # type: ignore[type-arg]
    # Devices fetch what they are assigned and run what its signed release covers.
    desired = DesiredState.model_validate(assign_version(engine, device_id, model="tiny-ext", version=version))
    assert desired.artifact.sha256 == artifact["sha256"]
    state = agent.apply(desired).json()
    assert state["phase"] == "on_trial", state


def _assert_serves(agent: AgentProcess) -> None:
    ai = openai.OpenAI(base_url=f"{agent.url}/v1", api_key="unused", max_retries=0)
    reply = ai.chat.completions.create(model="tiny-ext", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert reply.choices[0].message.content
    result = httpx.post(f"{agent.url}/v1/infer", json={"model": "tiny-ext", "inputs": {"input_ids": [[1, 75, 76]]}})
    assert result.status_code == 200, result.text
    assert len(result.json()["outputs"]["logits"][0][0]) == 259


def test_store_unpacks_only_verified_bundles_and_removes_folders_with_blobs(onnx_folder: Path, tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "agent", keep_versions=1)
    staged = tmp_path / "bundle.tar"
    pack_folder(onnx_folder, staged)
    sha = hashlib.sha256(staged.read_bytes()).hexdigest()
    store.install(staged, sha)
    graph = store.unpack(sha)
    assert graph == store.unpacked_path(sha) / "model.onnx"
    assert store.used_bytes() == store.path_for(sha).stat().st_size + sum(
        p.stat().st_size for p in onnx_folder.iterdir()
    )
    with store.path_for(sha).open("r+b") as blob:  # bit rot: the blob no longer matches its name
        blob.seek(1000)
        blob.write(b"\xff")
    assert not store.verify(sha)
    assert not store.unpacked_path(sha).exists() and not store.has(sha)

    evil = _tar(tmp_path / "evil.tar", {**_files(onnx_folder), "../escaped": b"x"})
    evil_sha = hashlib.sha256(evil.read_bytes()).hexdigest()
    store.install(evil, evil_sha)
    with pytest.raises(BundleError, match="unsafe path"):
        store.unpack(evil_sha)
    assert list(store.unpacked.iterdir()) == [] and not (store.unpacked.parent / "escaped").exists()

    (store.unpacked / ("f" * 64)).mkdir()  # a folder whose blob is gone: collected with the next prune
    store.prune(protected=[evil_sha])
    assert list(store.unpacked.iterdir()) == []


def test_a_bundle_counts_twice_against_the_store_quota(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "agent", quota_bytes=3000)
    with httpx.Client() as client:
        downloader = Downloader(store, client=client)
        for fmt, fits in (("onnx", True), ("onnx-tar", False)):
            artifact = ArtifactRef(sha256="a" * 64, size_bytes=2000, format=fmt)  # type: ignore[arg-type]
            if fits:
                downloader.check_space(artifact, protected=())
                continue
            with pytest.raises(InsufficientSpaceError) as refused:
                downloader.check_space(artifact, protected=())
            assert refused.value.code == "quota_exceeded" and "4000 bytes on disk" in str(refused.value)
