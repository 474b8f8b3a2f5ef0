"""Size reduction and quality retention of quantized tiny models next to their float parents.

GGUF F32 -> Q8_0, Q4_0, Q4_K_M (llama.cpp) and ONNX fp32 -> int8 (onnxruntime dynamic, and static
QDQ calibrated on the prompt set). Each model
is measured in its own process (see slmops.modelopt.measure); quality retention is the share of the
parent's greedy next tokens the variant reproduces (1.0 = unchanged), next to perplexity on the
packaged text set. Random-weight models: the figures show the method, not a real model's loss.

    python benchmarks/modelopt_table.py [--size tiny|small] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from control_plane.modelopt.onnx_static import quantize_onnx_int8_static  # noqa: E402
from slmops.modelopt import quantize_gguf, quantize_onnx_int8  # noqa: E402
from slmops.modelopt.compare import evaluate_files  # noqa: E402
from slmops.tinymodels import write_tiny_gguf, write_tiny_onnx  # noqa: E402

GGUF_TYPES = ("Q8_0", "Q4_0", "Q4_K_M")
COLUMNS = ("variant", "bytes", "parent bytes", "reduction", "retention", "ppl", "parent ppl", "ms/token", "parent")


def rows(size: str, workdir: Path) -> list[dict[str, Any]]:
    results = []
    gguf_parent = write_tiny_gguf(workdir / "tiny-f32.gguf", seed=0, size=size)  # type: ignore[arg-type]
    for quant in GGUF_TYPES:
        variant = quantize_gguf(gguf_parent, workdir / f"tiny-{quant}.gguf", quant).dst
        results.append({"variant": f"GGUF F32 -> {quant}", **evaluate_files(str(variant), str(gguf_parent), "gguf")})
    onnx_parent = write_tiny_onnx(workdir / "tiny-fp32.onnx", seed=0, size=size)  # type: ignore[arg-type]
    variant = quantize_onnx_int8(onnx_parent, workdir / "tiny-int8.onnx").dst
    results.append({"variant": "ONNX fp32 -> int8", **evaluate_files(str(variant), str(onnx_parent), "onnx")})
    static = quantize_onnx_int8_static(onnx_parent, workdir / "tiny-int8-static.onnx").dst
    results.append({"variant": "ONNX fp32 -> int8 static", **evaluate_files(str(static), str(onnx_parent), "onnx")})
    return results


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in results:
        cells = [
            r["variant"],
            f"{r['size_bytes']:,}",
            f"{r['parent_size_bytes']:,}",
            f"{r['size_reduction']:.1%}",
            f"{r['quality_retention']:.1%}",
            _fmt(r.get("perplexity"), ".2f"),
            _fmt(r.get("parent_perplexity"), ".2f"),
            _fmt(r.get("ms_per_token"), ".2f"),
            _fmt(r.get("parent_ms_per_token"), ".2f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("tiny", "small"), default="tiny")
    parser.add_argument("--json", action="store_true", help="print the raw metrics as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="modelopt-") as tmp:
        results = rows(args.size, Path(tmp))
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"Quantization of the {args.size} test models (retention: greedy next-token agreement with the parent)")
    print(table(results))
    for onnx in results[-2:]:
        print(
            f"{onnx['variant']}: argmax agreement {onnx['argmax_agreement']:.1%}, "
            f"max |logit diff| {onnx['max_abs_diff']:.4f}"
        )


if __name__ == "__main__":
    main()
