"""Turn a variant's and its parent's measurements into eval metrics, and print them as a table.

Besides it: perplexity on the public-domain text set (`perplexity_retention`: parent / variant),
and the golden-prompt pass rate (`golden_retention`: variant / parent); a rollout's quality floor
can be set on any of these (`quality_metric`).

`quality_retention` is the number rollouts gate on (1.0: as good as the parent):
- for a quantization (or a dequantization, or an unspecified relation) it is the share of positions where the variant's
  greedy next token equals the parent's (GGUF: teacher forced over the packaged text and prompt sets;
  ONNX: argmax over the deterministic input set). Perplexity is reported next to it but is not the
  gate: on the random-weight test models quantization noise can *lower* perplexity while changing
  a fifth of the predictions, and agreement catches that;
- for a fine-tune, distillation or adapter, whose point is to behave differently, it is parent
  perplexity / variant perplexity on the text set (above 1.0: better than the parent).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from slmops.modelopt.measure import Measurement, measure


def _agreement(parent: Measurement, variant: Measurement) -> float:
    if parent.argmax.shape != variant.argmax.shape or parent.argmax.size == 0:
        raise ValueError("parent and variant outputs differ in shape; they are not comparable")
    return float((parent.argmax == variant.argmax).mean())


def _speed(m: Measurement, prefix: str = "") -> dict[str, Any]:
    return {
        f"{prefix}size_bytes": m.size_bytes,
        f"{prefix}load_s": round(m.load_s, 4),
        f"{prefix}ms_per_token": round(m.ms_per_token, 3) if m.ms_per_token else None,
        f"{prefix}tokens_per_s": round(m.tokens_per_s, 1) if m.tokens_per_s else None,
        f"{prefix}ttft_ms": round(m.ttft_ms, 2) if m.ttft_ms else None,
        f"{prefix}peak_rss_mb": round(m.peak_rss_mb, 1),
    }


def _golden_metrics(parent: Measurement, variant: Measurement) -> dict[str, Any]:
    """Golden-set pass rates and their ratio (1.0: the variant answers as many as its parent)."""
    if variant.golden_passed is None or parent.golden_passed is None or not variant.golden_total:
        return {}
    rate = variant.golden_passed / variant.golden_total
    parent_rate = parent.golden_passed / parent.golden_total if parent.golden_total else 0.0
    metrics: dict[str, Any] = {
        "golden_pass_rate": round(rate, 4),
        "parent_golden_pass_rate": round(parent_rate, 4),
        "golden_failed": variant.golden_failed,
    }
    if parent_rate:
        metrics["golden_retention"] = round(rate / parent_rate, 4)
    return metrics


BEHAVIOUR_CHANGING = ("finetuned_from", "distilled_from", "adapter_of")


def metrics_against(parent: Measurement, variant: Measurement, relation: str | None = None) -> dict[str, Any]:
    """Eval metrics of `variant` relative to `parent` (plain JSON values); `relation` is the lineage."""
    agreement = _agreement(parent, variant)
    metrics: dict[str, Any] = {"format": variant.format, **_speed(variant), **_speed(parent, "parent_")}
    metrics["size_reduction"] = round(1.0 - variant.size_bytes / parent.size_bytes, 4)
    if variant.perplexity is not None and parent.perplexity is not None:
        metrics["perplexity"] = round(variant.perplexity, 4)
        metrics["parent_perplexity"] = round(parent.perplexity, 4)
        metrics["perplexity_ratio"] = round(variant.perplexity / parent.perplexity, 4)
    metrics.update(_golden_metrics(parent, variant))
    if variant.format == "gguf":
        metrics["next_token_agreement"] = round(agreement, 4)
    else:
        metrics["argmax_agreement"] = round(agreement, 4)
        assert parent.logits is not None and variant.logits is not None
        metrics["max_abs_diff"] = round(float(np.abs(parent.logits - variant.logits).max()), 6)
    if variant.perplexity and parent.perplexity:
        metrics["perplexity_retention"] = round(parent.perplexity / variant.perplexity, 4)
    if relation in BEHAVIOUR_CHANGING and variant.perplexity and parent.perplexity:
        metrics["quality_retention"] = round(parent.perplexity / variant.perplexity, 4)
        metrics["retention_basis"] = "perplexity_ratio"
    else:
        metrics["quality_retention"] = round(agreement, 4)
        metrics["retention_basis"] = "next_token_agreement"
    return metrics


def evaluate_files(
    variant: str,
    parent: str,
    fmt: str,
    *,
    variant_fmt: str | None = None,
    lora_path: str | None = None,
    relation: str | None = None,
) -> dict[str, Any]:
    """Measure both (each in its own process) and compare them; with `lora_path` the variant is
    `variant` (the base file) plus that adapter. `variant_fmt` defaults to the parent's `fmt`."""
    return metrics_against(measure(parent, fmt), measure(variant, variant_fmt or fmt, lora_path), relation)


_ROWS = [
    ("size (bytes)", "size_bytes", "{:,}"),
    ("load (s)", "load_s", "{:.3f}"),
    ("ms / token", "ms_per_token", "{:.2f}"),
    ("tokens / s", "tokens_per_s", "{:.1f}"),
    ("TTFT (ms)", "ttft_ms", "{:.1f}"),
    ("peak RSS (MB)", "peak_rss_mb", "{:.1f}"),
    ("perplexity", "perplexity", "{:.3f}"),
    ("golden pass rate", "golden_pass_rate", "{:.1%}"),
]


def _cell(metrics: dict[str, Any], key: str, fmt: str) -> str:
    value = metrics.get(key)
    return "-" if value is None else fmt.format(value)


def format_table(metrics: dict[str, Any], variant_name: str = "variant", parent_name: str = "parent") -> str:
    """Variant next to parent, one row per measure, then the comparison figures."""
    width = max(len(variant_name), len(parent_name), 12)
    lines = [f"{'':<16}{parent_name:>{width}}  {variant_name:>{width}}"]
    for label, key, fmt in _ROWS:
        lines.append(f"{label:<16}{_cell(metrics, 'parent_' + key, fmt):>{width}}  {_cell(metrics, key, fmt):>{width}}")
    for key in ("size_reduction", "next_token_agreement", "argmax_agreement", "golden_retention", "quality_retention"):
        if key in metrics:
            lines.append(f"{key:<24}{metrics[key]:.2%}")
    if "retention_basis" in metrics:
        lines.append(f"{'retention_basis':<24}{metrics['retention_basis']}")
    if "max_abs_diff" in metrics:
        lines.append(f"{'max_abs_diff':<24}{metrics['max_abs_diff']:.6f}")
    return "\n".join(lines)
