"""The quality floor end to end: quantize real tiny models as control-plane jobs (CLI), evaluate them
against their parent on this machine (CLI), then see rollouts below the floor refused unless forced."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

import slmops.cli.ops  # noqa: F401  (registers the operator commands)
import slmops.cli.tiny  # noqa: F401  (registers `model quantize`)
from slmops.cli.app import app as cli_app
from tests.support.server_thread import ServerThread

pytestmark = pytest.mark.llama

HARDWARE = {"cpu_model": "test", "cpu_cores": 4, "ram_mb": 4096, "arch": "x86_64"}


def _cli(url: str, token: str, *args: str) -> str:
    result = CliRunner().invoke(cli_app, [*args, "--server", url, "--token", token])
    assert result.exit_code == 0, result.output
    return result.output


def _enroll(url: str, admin: dict[str, str], slots: list[str]) -> None:
    for slot in slots:
        created = httpx.post(f"{url}/v1/devices", json={"name": f"dev-{slot}", "labels": {"slot": slot}}, headers=admin)
        token = created.json()["enrollment_token"]
        enrolled = httpx.post(f"{url}/v1/devices/enroll", json={"enrollment_token": token, "hardware": HARDWARE})
        assert enrolled.status_code == 201, enrolled.text


def _rollout(url: str, headers: dict[str, str], version: str, slot: str, **plan: Any) -> httpx.Response:
    body = {"model": "tiny", "version": version, "selector": f"slot={slot}", **plan}
    return httpx.post(f"{url}/v1/rollouts", json=body, headers=headers)


def test_rollouts_below_the_quality_floor_are_refused_unless_forced(  # type: ignore[no-untyped-def]
    app, admin_headers, operator_headers, tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("llama_cpp")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    token = operator_headers["Authorization"].removeprefix("Bearer ")
    with ServerThread(app) as server:
        url = f"http://127.0.0.1:{server.port}"
        httpx.post(f"{url}/v1/models", json={"name": "tiny"}, headers=operator_headers).raise_for_status()
        with tiny_gguf.open("rb") as fh:
            up = httpx.post(
                f"{url}/v1/models/tiny/versions", data={"version": "1.0"}, files={"file": fh}, headers=operator_headers
            )
        assert up.status_code == 201, up.text
        for quant in ("Q8_0", "Q4_0"):
            out = _cli(url, token, "model", "quantize", "tiny", "1.0", "--to", quant)
            assert f"registered tiny@1.0-{quant.lower()}" in out and "smaller" in out
        metrics = {}
        for version in ("1.0-q8_0", "1.0-q4_0"):
            table = _cli(url, token, "model", "evaluate", "tiny", version)
            assert "perplexity" in table and "tiny@1.0" in table
            stored = httpx.get(f"{url}/v1/models/tiny/versions/{version}", headers=operator_headers).json()
            metrics[version] = stored["eval_metrics"]
            assert stored["artifacts"][0]["eval_metrics"]["quality_retention"] == metrics[version]["quality_retention"]
            assert metrics[version]["evaluated_against"] == "tiny@1.0"
        # Measured on real models: Q8_0 keeps the parent's predictions, Q4_0 loses about a fifth.
        assert metrics["1.0-q8_0"]["quality_retention"] >= 0.9 > metrics["1.0-q4_0"]["quality_retention"] > 0.5

        _enroll(url, admin_headers, ["a", "b", "c", "d"])
        refused = _rollout(url, operator_headers, "1.0-q4_0", "a")
        assert refused.status_code == 422, refused.text
        problem = refused.json()
        assert problem["code"] == "quality_below_floor"
        assert problem["quality_retention"] == metrics["1.0-q4_0"]["quality_retention"]
        assert problem["min_quality_retention"] == 0.9 and problem["evaluated_against"] == "tiny@1.0"
        assert httpx.get(f"{url}/v1/rollouts", headers=operator_headers).json()["data"] == []

        assert _rollout(url, operator_headers, "1.0-q4_0", "a", force=True).status_code == 201
        assert _rollout(url, operator_headers, "1.0-q8_0", "b").status_code == 201
        # The same through the CLI: refused with the code, then accepted under a lower floor.
        args = ["rollout", "create", "tiny", "1.0-q4_0", "--selector", "slot=c", "--server", url, "--token", token]
        refused_cli = CliRunner().invoke(cli_app, args)
        assert refused_cli.exit_code == 1 and "quality_below_floor" in refused_cli.output
        _cli(url, token, "rollout", "create", *args[2:4], "--selector", "slot=c", "--min-quality-retention", "0.5")
        # A version never evaluated has nothing to be refused for.
        assert _rollout(url, operator_headers, "1.0", "d").status_code == 201


def test_evaluate_json_output_and_a_version_without_parent(  # type: ignore[no-untyped-def]
    app, operator_headers, tiny_onnx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    token = operator_headers["Authorization"].removeprefix("Bearer ")
    with ServerThread(app) as server:
        url = f"http://127.0.0.1:{server.port}"
        httpx.post(f"{url}/v1/models", json={"name": "tiny"}, headers=operator_headers).raise_for_status()
        with tiny_onnx.open("rb") as fh:
            httpx.post(
                f"{url}/v1/models/tiny/versions", data={"version": "1"}, files={"file": fh}, headers=operator_headers
            ).raise_for_status()
        orphan = CliRunner().invoke(cli_app, ["model", "evaluate", "tiny", "1", "--server", url, "--token", token])
        assert orphan.exit_code == 1 and "no_parent" in orphan.output
        _cli(url, token, "model", "quantize", "tiny", "1", "--to", "int8")
        out = _cli(url, token, "model", "evaluate", "tiny", "1-int8", "--against", "1", "-o", "json", "--no-store")
        metrics = json.loads(out)
        assert 0.5 < metrics["argmax_agreement"] <= 1.0 and metrics["max_abs_diff"] > 0
        stored = httpx.get(f"{url}/v1/models/tiny/versions/1-int8", headers=operator_headers).json()
        assert "quality_retention" not in stored["eval_metrics"]  # --no-store


def test_push_records_the_provenance_of_a_distilled_model(  # type: ignore[no-untyped-def]
    app, operator_headers, tiny_gguf: Path, tiny_gguf_other: Path
) -> None:
    token = operator_headers["Authorization"].removeprefix("Bearer ")
    with ServerThread(app) as server:
        url = f"http://127.0.0.1:{server.port}"
        _cli(url, token, "model", "create", "tiny")
        _cli(url, token, "model", "push", "tiny", "teacher-1", str(tiny_gguf))
        _cli(
            url, token, "model", "push", "tiny", "student-1", str(tiny_gguf_other),
            "--parent", "teacher-1", "--relation", "distilled_from", "--teacher", "tiny@teacher-1",
            "--dataset", "maintenance-logs-v2", "--method", "distillation", "--provenance", '{"tool": "olive"}',
        )  # fmt: skip
        version = httpx.get(f"{url}/v1/models/tiny/versions/student-1", headers=operator_headers).json()
        assert version["parent"] == {"model": "tiny", "version": "teacher-1", "relation": "distilled_from"}
        assert version["provenance"] == {
            "tool": "olive",
            "teacher": "tiny@teacher-1",
            "dataset": "maintenance-logs-v2",
            "method": "distillation",
        }


def test_evaluate_an_adapter_version_against_its_base(  # type: ignore[no-untyped-def]
    app, operator_headers, tiny_gguf: Path, tiny_lora_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("llama_cpp")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    token = operator_headers["Authorization"].removeprefix("Bearer ")
    with ServerThread(app) as server:
        url = f"http://127.0.0.1:{server.port}"
        _cli(url, token, "model", "create", "tiny")
        _cli(url, token, "model", "push", "tiny", "1.0", str(tiny_gguf))
        _cli(url, token, "model", "push", "tiny", "1.0-lora", str(tiny_lora_gguf), "--parent", "1.0",
             "--relation", "adapter_of")  # fmt: skip
        _cli(url, token, "model", "evaluate", "tiny", "1.0-lora")
        version = httpx.get(f"{url}/v1/models/tiny/versions/1.0-lora", headers=operator_headers).json()
        metrics = version["eval_metrics"]
        assert metrics["retention_basis"] == "perplexity_ratio" and metrics["quality_retention"] > 0
        assert version["artifacts"][0]["format"] == "gguf-lora"
        assert version["artifacts"][0]["eval_metrics"]["quality_retention"] == metrics["quality_retention"]
