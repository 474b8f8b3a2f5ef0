"""Aggregated inference telemetry a device reports once per window.

Prompts and outputs are never part of it. Latency histograms use fixed bucket boundaries (the
OpenTelemetry gen_ai ones) so the control plane can merge windows from many devices and compute
fleet percentiles; the per-window p50/p95/p99 are exact for the device.
"""

from __future__ import annotations

from pydantic import AwareDatetime, Field, model_validator

from shared import limits
from shared.base import WireModel
from shared.limits import BigCount, ByteCount, Count, Measure, ModelName, Sha256, ShortName, VersionName

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

    count: Count = 0
    p50: Measure | None = None
    p95: Measure | None = None
    p99: Measure | None = None
    max: Measure | None = None


class Histogram(WireModel):
    """Cumulative-free bucket counts: counts[i] is samples <= bounds[i]; the last is the overflow."""

    bounds: tuple[Measure, ...] = Field(max_length=limits.MAX_LABELS)
    counts: tuple[Count, ...] = Field(max_length=limits.MAX_LABELS + 1)
    sum: float = Field(default=0.0, ge=0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _one_count_per_bucket(self) -> Histogram:
        if len(self.counts) != len(self.bounds) + 1:
            raise ValueError("a histogram has one count per bound plus the overflow bucket")
        if any(upper <= lower for lower, upper in zip((0.0, *self.bounds), self.bounds, strict=False)):
            raise ValueError("histogram bounds are positive and increasing")
        return self


class SystemSample(WireModel):
    rss_bytes: ByteCount = 0
    peak_rss_bytes: ByteCount = 0
    available_memory_bytes: ByteCount = 0
    cpu_percent: float = Field(default=0.0, ge=0, le=100_000, allow_inf_nan=False)
    disk_free_bytes: ByteCount = 0
    temperature_c: float | None = Field(default=None, ge=-273.15, le=1000, allow_inf_nan=False)  # where psutil has one


class TelemetryWindow(WireModel):
    """One device's window. Counts are bounded by what the window could hold (`_plausible`): the
    rollout gates add them up across devices, so no count may be negative or out of scale."""

    device_id: str | None = Field(default=None, max_length=limits.ID_CHARS)
    seq: BigCount  # increases by one per window, so gaps show lost windows
    window_start: AwareDatetime
    window_end: AwareDatetime
    model: ModelName | None = None
    version: VersionName | None = None
    sha256: Sha256 | None = None
    requests: Count = 0
    errors: Count = 0
    error_types: dict[ShortName, Count] = Field(default_factory=dict, max_length=limits.MAX_LABELS)
    latency_s: Summary = Field(default_factory=Summary)
    time_to_first_token_s: Summary = Field(default_factory=Summary)
    time_per_output_token_s: Summary = Field(default_factory=Summary)
    tokens_per_s: Summary = Field(default_factory=Summary)
    input_tokens: BigCount = 0
    output_tokens: BigCount = 0
    latency_histogram: Histogram | None = None
    ttft_histogram: Histogram | None = None
    tpot_histogram: Histogram | None = None
    system: SystemSample = Field(default_factory=SystemSample)

    @model_validator(mode="after")
    def _plausible(self) -> TelemetryWindow:
        span_s = (self.window_end - self.window_start).total_seconds()
        if not 0 <= span_s <= limits.MAX_WINDOW_S:
            raise ValueError(f"a window ends after it starts and spans at most {limits.MAX_WINDOW_S} s")
        if self.window_start < limits.EARLIEST or self.window_end >= limits.LATEST:
            raise ValueError(f"a window lies between {limits.EARLIEST:%Y} and {limits.LATEST:%Y}")
        if self.requests > limits.MAX_REQUESTS_PER_S * max(60.0, span_s):
            raise ValueError(f"more than {limits.MAX_REQUESTS_PER_S} requests per second")
        if self.errors > self.requests:
            raise ValueError("errors exceed requests")
        if any(count > self.errors for count in self.error_types.values()):
            raise ValueError("an error type counts more errors than the window has")
        if self.latency_histogram is not None and sum(self.latency_histogram.counts) > self.requests:
            raise ValueError("the latency histogram counts more requests than the window has")
        return self
