"""Aggregated inference telemetry a device reports once per window.

Prompts and outputs are never part of it. Latency histograms use fixed bucket boundaries (the
OpenTelemetry gen_ai ones) so the control plane can merge windows from many devices and compute
fleet percentiles; the per-window p50/p95/p99 are exact for the device.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import Field

from shared.base import WireModel

# gen_ai.server.request.duration advisory buckets (seconds).
REQUEST_DURATION_BUCKETS: tuple[float, ...] = (
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
)  # fmt: skip
# gen_ai.server.time_to_first_token advisory buckets (seconds).
TIME_TO_FIRST_TOKEN_BUCKETS: tuple[float, ...] = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
)  # fmt: skip
# gen_ai.server.time_per_output_token advisory buckets (seconds).
TIME_PER_OUTPUT_TOKEN_BUCKETS: tuple[float, ...] = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
)  # fmt: skip


class Summary(WireModel):
    """Exact order statistics of one metric over a window; None where the window saw no sample."""

    count: int = Field(default=0, ge=0)
    p50: float | None = None
    p95: float | None = None
    p99: float | None = None
    max: float | None = None


class Histogram(WireModel):
    """Cumulative-free bucket counts: counts[i] is samples <= bounds[i]; the last is the overflow."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    sum: float = 0.0


class SystemSample(WireModel):
    rss_bytes: int = 0
    peak_rss_bytes: int = 0
    available_memory_bytes: int = 0
    cpu_percent: float = 0.0
    disk_free_bytes: int = 0
    temperature_c: float | None = None  # where psutil exposes a sensor


class TelemetryWindow(WireModel):
    device_id: str | None = None
    seq: int = Field(ge=0)  # increases by one per window, so gaps show lost windows
    window_start: datetime
    window_end: datetime
    model: str | None = None
    version: str | None = None
    sha256: str | None = None
    requests: int = 0
    errors: int = 0
    error_types: dict[str, int] = Field(default_factory=dict)
    latency_s: Summary = Field(default_factory=Summary)
    time_to_first_token_s: Summary = Field(default_factory=Summary)
    time_per_output_token_s: Summary = Field(default_factory=Summary)
    tokens_per_s: Summary = Field(default_factory=Summary)
    input_tokens: int = 0
    output_tokens: int = 0
    latency_histogram: Histogram | None = None
    ttft_histogram: Histogram | None = None
    tpot_histogram: Histogram | None = None
    system: SystemSample = Field(default_factory=SystemSample)
