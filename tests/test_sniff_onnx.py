"""The ONNX upload sniff: malformed external data entries and unnamed types are refused or named, never a 500."""

from __future__ import annotations

import tarfile
from pathlib import Path

import onnx
import pytest

from control_plane.errors import DomainError
from control_plane.services.sniff import sniff_artifact
from shared.desired import BUNDLE_FORMAT
from slmops.tinymodels import write_tiny_onnx_folder

MALFORMED_ENTRIES = {
    "offset not a number": {"offset": "abc"},
    "length not a number": {"length": "1e3"},
    "negative offset": {"offset": "-64"},
    "no location": {"location": ""},
}


def _edit_entries(graph: Path, entries: dict[str, str]) -> None:
    """Add `entries` to the external data of the graph's first external tensor (a later key wins)."""
    model = onnx.load(str(graph), load_external_data=False)
    tensor = next(t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    for key, value in entries.items():
        tensor.external_data.add(key=key, value=value)
    graph.write_bytes(model.SerializeToString())


def _bundle(folder: Path, dest: Path) -> Path:
    with tarfile.open(dest, "w") as tar:
        for path in sorted(folder.iterdir()):
            tar.add(path, arcname=path.name)
    return dest


@pytest.mark.parametrize("case", sorted(MALFORMED_ENTRIES))
def test_malformed_external_data_entries_are_refused(tmp_path: Path, case: str) -> None:
    folder = write_tiny_onnx_folder(tmp_path / "model", seed=0)
    _edit_entries(folder / "model.onnx", MALFORMED_ENTRIES[case])
    for path in (_bundle(folder, tmp_path / "model.tar"), folder / "model.onnx"):
        with pytest.raises(DomainError) as refused:
            sniff_artifact(path)
        assert refused.value.code == "unrecognized_artifact", path.name


def test_a_well_formed_bundle_is_still_accepted(tmp_path: Path) -> None:
    folder = write_tiny_onnx_folder(tmp_path / "model", seed=0)
    fmt, meta = sniff_artifact(_bundle(folder, tmp_path / "model.tar"))
    assert fmt == BUNDLE_FORMAT and meta["external_data"] == ["model.onnx.data"]


def test_an_input_type_onnx_cannot_name_is_kept_as_its_number(tiny_onnx: Path, tmp_path: Path) -> None:
    model = onnx.load(str(tiny_onnx))
    model.graph.input[0].type.tensor_type.elem_type = 999
    path = tmp_path / "odd.onnx"
    path.write_bytes(model.SerializeToString())
    fmt, meta = sniff_artifact(path)
    assert fmt == "onnx" and meta["inputs"][0]["elem_type"] == "999"
