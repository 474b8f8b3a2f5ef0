"""ONNX model folders with external data, shipped as one deterministic tar (`shared.desired.BUNDLE_FORMAT`).

Olive and optimum export large models as a .onnx graph whose initializers live in external data
files beside it. The registry stores one blob per artifact, so `slmops model push` packs such a
folder into an uncompressed tar with sorted names, mtime 0 and owner 0: the same folder always
gives the same bytes, hence the same sha256 (a re-run push is recognised, not duplicated). The
control plane checks a bundle before registering it, and the agent extracts one only after its
sha256 matched; both refuse links, devices, absolute paths and '..' members.

`onnx` is imported only where a graph is read, so the agent can extract bundles without it.
"""

from __future__ import annotations

import math
import os
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Any

from shared.errors import SharedError

if TYPE_CHECKING:
    import onnx

TAR_MAGIC = b"ustar"  # POSIX and GNU tar headers both carry it at offset 257
TAR_MAGIC_OFFSET = 257
MAX_GRAPH_BYTES = 2 * 1024**3  # protobuf's own limit: the graph itself must fit in one message


class BundleError(SharedError, ValueError):
    """The folder or tar is not a well-formed ONNX model with external data."""


@dataclass(frozen=True)
class BundleContents:
    graph: str  # the one top-level .onnx file
    files: dict[str, int]  # every file of the bundle (posix relative path) and its size
    external_data: dict[str, int]  # each external data file the graph names, and the least size it needs

    @property
    def unpacked_bytes(self) -> int:
        return sum(self.files.values())


def is_tar(head: bytes) -> bool:
    return head[TAR_MAGIC_OFFSET : TAR_MAGIC_OFFSET + len(TAR_MAGIC)] == TAR_MAGIC


def safe_relative(name: str) -> str:
    """`name` as a clean relative posix path; raises BundleError for absolute paths and '..'."""
    path = PurePosixPath(name)
    if not name or "\\" in name or path.is_absolute() or ".." in path.parts or path.parts in ((), (".",)):
        raise BundleError(f"unsafe path {name!r}: bundle paths must stay inside the model folder")
    return path.as_posix()


# -- reading a graph's external data references ---------------------------------------------------


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node: onnx.NodeProto) -> Iterator[onnx.TensorProto]:
    for attr in node.attribute:
        if attr.HasField("t"):
            yield attr.t
        yield from attr.tensors
        for sub in [attr.g] if attr.HasField("g") else []:
            yield from _graph_tensors(sub)
        for sub in attr.graphs:
            yield from _graph_tensors(sub)


def external_data_needs(model: onnx.ModelProto) -> dict[str, int]:
    """Each external data file the graph references and the least size its offsets and lengths imply."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    tensors = list(_graph_tensors(model.graph))
    for function in model.functions:
        for node in function.node:
            tensors.extend(_node_tensors(node))
    needs: dict[str, int] = {}
    for tensor in tensors:
        if not uses_external_data(tensor):
            continue
        info = _external_data_info(tensor, ExternalDataInfo)
        location = safe_relative(info.location)
        end = (info.offset or 0) + (info.length if info.length else _raw_bytes(tensor))
        needs[location] = max(needs.get(location, 0), end)
    return needs


def _external_data_info(tensor: onnx.TensorProto, parse: Callable[[onnx.TensorProto], Any]) -> Any:
    """onnx's reading of a tensor's external data entries; malformed entries raise BundleError."""
    try:
        info = parse(tensor)  # sets one attribute per entry key and int()s offset and length
    except (AttributeError, TypeError, ValueError) as exc:
        raise BundleError(f"tensor {tensor.name!r} has malformed external data entries: {exc}") from exc
    if not isinstance(info.location, str) or (info.offset or 0) < 0 or (info.length or 0) < 0:
        raise BundleError(f"tensor {tensor.name!r} has malformed external data entries")
    return info


def _raw_bytes(tensor: onnx.TensorProto) -> int:
    from onnx import helper

    try:
        itemsize = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, TypeError, ValueError):  # a type numpy cannot name: leave the size unchecked
        return 0
    return itemsize * math.prod(tensor.dims)


def _parse_graph(data: bytes, name: str) -> onnx.ModelProto:
    import onnx

    try:
        model = onnx.load_model_from_string(data)
    except Exception as exc:  # protobuf DecodeError and friends
        raise BundleError(f"{name} is not a valid ONNX model: {exc}") from exc
    if not model.graph.node and not model.graph.output:
        raise BundleError(f"the ONNX graph in {name} is empty")
    return model


def _check_external_data(model: onnx.ModelProto, graph: str, files: dict[str, int]) -> dict[str, int]:
    needs = external_data_needs(model)
    if not needs:
        raise BundleError(f"{graph} keeps all its weights inside; push the .onnx file itself, not a folder")
    for location, size in sorted(needs.items()):
        if location not in files:
            raise BundleError(f"{graph} needs external data file {location!r}, which is missing")
        if files[location] < size:
            raise BundleError(f"external data file {location!r} holds {files[location]} bytes; the graph needs {size}")
    return needs


def _top_level_graph(names: Iterable[str]) -> str:
    graphs = sorted(n for n in names if "/" not in n and n.endswith(".onnx"))
    if len(graphs) != 1:
        found = ", ".join(graphs) or "none"
        raise BundleError(f"an ONNX model folder needs exactly one top-level .onnx file (found: {found})")
    return graphs[0]


# -- the operator's side: folder -> tar ------------------------------------------------------------


def folder_files(folder: Path) -> dict[str, Path]:
    """Every file under `folder` by its posix relative path; symlinks to files count as their target."""
    files: dict[str, Path] = {}
    for path in sorted(folder.rglob("*")):
        if path.is_dir():
            continue
        relative = path.relative_to(folder).as_posix()
        if not path.is_file():
            raise BundleError(f"{relative} is not a regular file (broken link, socket or device)")
        files[safe_relative(relative)] = path
    return files


def check_folder(folder: Path) -> BundleContents:
    """Check a model folder as the control plane will check its tar; raises BundleError."""
    paths = folder_files(folder)
    graph = _top_level_graph(paths)
    if paths[graph].stat().st_size > MAX_GRAPH_BYTES:
        raise BundleError(f"{graph} is over 2 GB; its weights must live in external data files")
    sizes = {name: path.stat().st_size for name, path in paths.items()}
    model = _parse_graph(paths[graph].read_bytes(), graph)
    return BundleContents(graph, sizes, _check_external_data(model, graph, sizes))


def pack_folder(
    folder: Path,
    dest: Path,
    *,
    contents: BundleContents | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> BundleContents:
    """Write `folder` to `dest` as a deterministic tar (the same folder, the same bytes), checked first.

    `contents` is what `check_folder` already found, to skip checking twice.
    """
    contents = contents or check_folder(folder)
    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(contents.files):
            info = tarfile.TarInfo(name)
            info.size = contents.files[name]
            info.mode, info.mtime, info.uid, info.gid, info.uname, info.gname = 0o644, 0, 0, 0, "", ""
            with (folder / name).open("rb") as handle:
                tar.addfile(info, _Counting(handle, on_bytes) if on_bytes else handle)
    return contents


class _Counting:
    """A reader that reports how many bytes were read, for a progress bar."""

    def __init__(self, handle: IO[bytes], on_bytes: Callable[[int], None]) -> None:
        self._handle = handle
        self._on_bytes = on_bytes

    def read(self, size: int = -1) -> bytes:
        data = self._handle.read(size)
        self._on_bytes(len(data))
        return data


# -- the control plane's and the agent's side: tar -> checked contents ------------------------------


def checked_members(tar: tarfile.TarFile) -> dict[str, tarfile.TarInfo]:
    """The tar's files by clean name; links, devices, unsafe paths and duplicates raise BundleError."""
    members: dict[str, tarfile.TarInfo] = {}
    for member in tar.getmembers():
        name = safe_relative(member.name)
        if member.isdir():
            continue
        if not member.isfile():
            raise BundleError(f"bundle member {name!r} is not a regular file (links and devices are refused)")
        if name in members:
            raise BundleError(f"bundle member {name!r} appears twice")
        members[name] = member
    folders = {str(parent) for name in members for parent in PurePosixPath(name).parents}
    if clash := sorted(folders & set(members)):
        raise BundleError(f"bundle member {clash[0]!r} is both a file and a folder")
    return members


def inspect_bundle(path: Path) -> tuple[onnx.ModelProto, BundleContents]:
    """Check an uploaded bundle without loading its external data; raises BundleError."""
    try:
        with tarfile.open(path, "r:") as tar:
            members = checked_members(tar)
            graph = _top_level_graph(members)
            if members[graph].size > MAX_GRAPH_BYTES:
                raise BundleError(f"{graph} is over 2 GB; its weights must live in external data files")
            handle = tar.extractfile(members[graph])
            assert handle is not None  # a regular file always has a reader
            model = _parse_graph(handle.read(), graph)
        tar_bytes = path.stat().st_size
        if truncated := [n for n, m in members.items() if m.offset_data + m.size > tar_bytes]:
            raise BundleError(f"the tar is truncated: {truncated[0]!r} is cut short")
    except tarfile.TarError as exc:
        raise BundleError(f"not a readable tar: {exc}") from exc
    sizes = {name: member.size for name, member in members.items()}
    return model, BundleContents(graph, sizes, _check_external_data(model, graph, sizes))


def find_graph(folder: Path) -> Path:
    """The one top-level .onnx graph of an extracted bundle."""
    return folder / _top_level_graph(p.name for p in folder.iterdir() if p.is_file())


def extract_bundle(path: Path, dest: Path) -> Path:
    """Extract a verified bundle into the new directory `dest`, fsynced; returns the path of its .onnx graph."""
    dest.mkdir(parents=True)
    with tarfile.open(path, "r:") as tar:
        members = checked_members(tar)
        graph = _top_level_graph(members)
        for member in members.values():
            # The "data" filter checks again what checked_members did, and drops modes and owners.
            tar.extract(member, dest, filter="data")
    for written in sorted(dest.rglob("*"), reverse=True) + [dest]:  # files before the directories holding them
        fd = os.open(written, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return dest / graph
