"""Fuzz the GGUF and ONNX sniffers with random, hand-built and mutated headers (hypothesis).

Every file must be refused as `unrecognized_artifact` or accepted with JSON-storable metadata,
within a time and memory budget per file: never a hang, never another error. The examples are
derandomized so a run is repeatable; each test takes a few seconds.
"""

from __future__ import annotations

import json
import resource
import signal
import struct
import tarfile
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import gguf
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from control_plane.errors import DomainError
from control_plane.services.sniff import sniff_artifact
from slmops.tinymodels import write_tiny_onnx_folder
from tests.support.gguf_craft import gguf_file, gguf_string, kv_array, llama_kvs, tensor_info
from tests.support.onnx_craft import with_external_data

EXAMPLE_SECONDS = 10  # generous: a bounded sniff of these files takes milliseconds
EXAMPLE_PEAK_BYTES = 64 * 1024**2  # Python memory traced during one sniff
EXAMPLE_RSS_GROWTH_KB = 512 * 1024  # how far one sniff may raise the process's peak RSS (native memory too)

FUZZ = settings(
    max_examples=120,
    deadline=None,  # the per-file budget below is the deadline, and it interrupts a hang
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)

U64_EDGES = [0, 1, 7, 2**16, 2**31, 2**32 - 1, 2**32, 2**62, 2**63 - 1, 2**63, 2**64 - 1]
u64s = st.one_of(st.integers(0, 64), st.sampled_from(U64_EDGES), st.integers(0, 2**64 - 1))


class _Overrun(BaseException):  # not an Exception: the sniff's own handlers must not turn it into a refusal
    pass


@contextmanager
def _alarm(seconds: float) -> Iterator[None]:
    def ring(signum: int, frame: object) -> None:
        raise _Overrun(f"the sniff ran past {seconds} s")

    previous = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _sniff_within_budget(path: Path, data: bytes) -> str:
    """Write `data` to `path` and sniff it: the format, or 'refused'."""
    path.write_bytes(data)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    try:
        with _alarm(EXAMPLE_SECONDS):
            try:
                fmt, meta = sniff_artifact(path)
                json.dumps(meta, allow_nan=False)  # the registry must be able to store it
                outcome = fmt
            except DomainError as exc:
                assert exc.code == "unrecognized_artifact", exc
                outcome = "refused"
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < EXAMPLE_PEAK_BYTES, f"the sniff held {peak} bytes"
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < EXAMPLE_RSS_GROWTH_KB
    return outcome


@st.composite
def mutations(draw: st.DrawFn, base: bytes, spans: list[tuple[int, int]]) -> bytes:
    """`base` with a few fields overwritten (edge u64s, u32s or random bytes) and maybe truncated."""
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 6))):
        low, high = draw(st.sampled_from(spans))
        at = draw(st.integers(low, max(low, min(high, len(data)) - 1)))
        patch = draw(
            st.one_of(
                u64s.map(lambda v: struct.pack("<Q", v)),
                st.integers(0, 2**32 - 1).map(lambda v: struct.pack("<I", v)),
                st.binary(min_size=1, max_size=8),
            )
        )
        data[at : at + len(patch)] = patch
    if draw(st.booleans()):
        del data[draw(st.integers(0, len(data))) :]
    return bytes(data)


# -- GGUF ------------------------------------------------------------------------------------------


@st.composite
def gguf_values(draw: st.DrawFn) -> bytes:
    """A key, a value type and a value whose declared lengths and counts may lie."""
    key = gguf_string(draw(st.sampled_from(["general.name", "general.alignment", "llama.context_length", "k"])))
    value_type = draw(st.sampled_from([0, 4, 6, 7, 8, 9, 10, 12, 13, 2**32 - 1]))
    if value_type == 8:
        text = draw(st.binary(max_size=32))
        return key + struct.pack("<I", 8) + gguf_string(text, declared=draw(st.one_of(st.just(len(text)), u64s)))
    if value_type == 9:
        item_type = draw(st.sampled_from([0, 4, 8, 9, 10, 13]))
        head = struct.pack("<IIQ", 9, item_type, draw(u64s))
        return key + head + draw(st.binary(max_size=64))
    return key + struct.pack("<I", value_type) + draw(st.binary(min_size=0, max_size=8))


@st.composite
def gguf_headers(draw: st.DrawFn) -> bytes:
    tensors = [
        tensor_info(
            draw(st.text(max_size=70)),
            draw(st.lists(st.one_of(st.integers(1, 64), u64s), max_size=5)),
            draw(st.sampled_from([0, 1, 2, 8, 12, 30, 9999])),
            draw(st.one_of(st.just(0), st.sampled_from([32, 64]), u64s)),
        )
        for _ in range(draw(st.integers(0, 3)))
    ]
    return gguf_file(
        draw(st.lists(gguf_values(), max_size=6)),
        tensors,
        data=draw(st.one_of(st.none(), st.binary(max_size=256))),
        tensor_count=draw(st.one_of(st.none(), u64s)),
        kv_count=draw(st.one_of(st.none(), u64s)),
        version=draw(st.sampled_from([2, 3, 3, 1, 2**24 * 3])),
    )


@st.composite
def lying_arrays(draw: st.DrawFn) -> bytes:
    """A well-formed header but for one array whose count may claim more than the file holds."""
    item_type = draw(st.sampled_from([0, 4, 6, 8, 10, 12]))
    array = kv_array("tokenizer.ggml.scores", item_type, draw(u64s), draw(st.binary(max_size=64)))
    return gguf_file(llama_kvs(array), tensors=draw(st.sampled_from([[], None])))


@FUZZ
@given(
    data=st.one_of(gguf_headers(), lying_arrays(), st.binary(max_size=300).map(lambda tail: b"GGUF\x03\0\0\0" + tail))
)
def test_hand_built_gguf_headers(tmp_path: Path, data: bytes) -> None:
    _sniff_within_budget(tmp_path / "fuzz.gguf", data)


@pytest.fixture(scope="module")
def gguf_bases(tiny_gguf: Path, tiny_lora_gguf: Path) -> list[tuple[bytes, list[tuple[int, int]]]]:
    """The tiny model and adapter, each with its header span (where mutations land) and whole extent."""
    bases = []
    for path in (tiny_gguf, tiny_lora_gguf):
        reader = gguf.GGUFReader(path, "r")
        fields = [*reader.fields.values(), *(tensor.field for tensor in reader.tensors)]
        starts = [(at, at + 8) for at in _structure_offsets(fields)]
        bases.append((path.read_bytes(), [(0, 24), (0, reader.data_offset), *starts]))
    return bases


def _structure_offsets(fields: list[Any]) -> list[int]:
    """Where each key-value's and tensor info's leading parts start: lengths, types, counts, shapes."""
    offsets = []
    for field in fields:
        at = field.offset
        for part in field.parts[:6]:
            offsets.append(at)
            at += part.nbytes
    return offsets


@FUZZ
@given(draw=st.data())
def test_mutated_tiny_gguf_models(tmp_path: Path, gguf_bases: list[Any], draw: st.DataObject) -> None:
    base, spans = draw.draw(st.sampled_from(gguf_bases))
    _sniff_within_budget(tmp_path / "fuzz.gguf", draw.draw(mutations(base, spans)))


# -- ONNX ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def onnx_bases(tiny_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> list[tuple[bytes, list[Any]]]:
    """The tiny ONNX file and the tiny model folder as a bundle, with spans over their structure."""
    folder = write_tiny_onnx_folder(tmp_path_factory.mktemp("fuzz-onnx") / "model", seed=0)
    bundle = folder.with_suffix(".tar")
    with tarfile.open(bundle, "w") as tar:
        for path in sorted(folder.iterdir()):
            tar.add(path, arcname=path.name)
    plain, packed = tiny_onnx.read_bytes(), bundle.read_bytes()
    graph_bytes = (folder / "model.onnx").stat().st_size
    return [
        (plain, [(0, 4096), (len(plain) - 4096, len(plain)), (0, len(plain))]),
        (packed, [(0, 512), (512, 512 + graph_bytes), (0, len(packed))]),  # the first header and the graph
    ]


@FUZZ
@given(draw=st.data())
@pytest.mark.filterwarnings("ignore::UserWarning")  # onnx warns of unknown external data keys it ignores
def test_mutated_onnx_files_and_bundles(tmp_path: Path, onnx_bases: list[Any], draw: st.DataObject) -> None:
    base, spans = draw.draw(st.sampled_from(onnx_bases))
    data = draw.draw(st.one_of(mutations(base, spans), st.binary(max_size=300).map(lambda tail: b"\x08" + tail)))
    _sniff_within_budget(tmp_path / "fuzz.onnx", data)


external_entries = st.dictionaries(
    st.sampled_from(["location", "offset", "length", "checksum", "basepath"]),
    st.one_of(
        st.sampled_from(["../../etc/hostname", "/etc/hostname", "model.onnx.data", "a/../../b", "C:\\x", ""]),
        st.integers(-(2**70), 2**70).map(str),
        st.text(max_size=12),
    ),
    min_size=1,
)


@FUZZ
@given(entries=external_entries)
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_plain_onnx_naming_any_external_data_is_refused(
    tmp_path: Path, tiny_onnx: Path, entries: dict[str, str]
) -> None:
    assert _sniff_within_budget(tmp_path / "fuzz.onnx", with_external_data(tiny_onnx, entries)) == "refused"
