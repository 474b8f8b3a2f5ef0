"""One mergeable aggregate of telemetry: raw windows and rollup rows add into it, percentiles come out.

Latency percentiles come from the merged fixed-bucket histogram (`merged_percentile`, the same
interpolation the rollout gates use), so a per-hour p95 over a hundred devices is the p95 of all
their requests, not an average of p95s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from control_plane.rollouts.gates import merged_percentile

# Raw columns the aggregate reads; selecting only these keeps large scans light.
RAW_COLUMNS = (
    "device_id",
    "model",
    "version",
    "window_end",
    "requests",
    "errors",
    "latency_histogram",
    "latency_max_ms",
    "ttft_p95_ms",
    "tokens_per_s_p50",
    "rss_bytes",
    "peak_rss_bytes",
)
SUM_FIELDS = (
    "windows",
    "requests",
    "errors",
    "ttft_ms_sum",
    "ttft_requests",
    "tokens_per_s_sum",
    "tokens_per_s_requests",
    "rss_bytes_sum",
)


@dataclass
class Aggregate:
    windows: int = 0
    requests: int = 0
    errors: int = 0
    bounds: list[float] | None = None
    counts: list[int] | None = None
    latency_max_ms: float | None = None
    ttft_ms_sum: float = 0.0
    ttft_requests: int = 0
    tokens_per_s_sum: float = 0.0
    tokens_per_s_requests: int = 0
    rss_bytes_sum: int = 0
    max_rss_bytes: int = 0

    def add_histogram(self, histogram: dict[str, Any] | None) -> None:
        if not histogram or not histogram.get("counts"):
            return
        bounds = [float(b) for b in histogram["bounds"]]
        if self.bounds is None:
            self.bounds, self.counts = bounds, [0] * (len(bounds) + 1)
        elif bounds != self.bounds:
            return  # another bucket layout cannot be merged exactly; gates skip it the same way
        assert self.counts is not None
        for i, count in enumerate(histogram["counts"][: len(self.counts)]):
            self.counts[i] += int(count)

    def _add_max(self, latency_max_ms: float | None, rss: int) -> None:
        if latency_max_ms is not None:
            self.latency_max_ms = max(self.latency_max_ms or 0.0, latency_max_ms)
        self.max_rss_bytes = max(self.max_rss_bytes, rss)

    def add_window(self, row: Any) -> None:
        """One raw telemetry window (a TelemetryRecord or a row of RAW_COLUMNS)."""
        self.windows += 1
        self.requests += row.requests
        self.errors += row.errors
        self.add_histogram(row.latency_histogram)
        if row.ttft_p95_ms is not None and row.requests:
            self.ttft_ms_sum += row.ttft_p95_ms * row.requests
            self.ttft_requests += row.requests
        if row.tokens_per_s_p50 is not None and row.requests:
            self.tokens_per_s_sum += row.tokens_per_s_p50 * row.requests
            self.tokens_per_s_requests += row.requests
        self.rss_bytes_sum += row.rss_bytes
        self._add_max(row.latency_max_ms, max(row.peak_rss_bytes, row.rss_bytes))

    def add_rollup(self, row: Any) -> None:
        """A rollup row (DeviceRollup / VersionRollup) of a finer resolution."""
        for name in SUM_FIELDS:
            setattr(self, name, getattr(self, name) + getattr(row, name))
        self.add_histogram(row.latency_histogram)
        self._add_max(row.latency_max_ms, row.max_rss_bytes)

    def merge(self, other: Aggregate, sign: int = 1) -> None:
        """Add (sign 1) or take away (sign -1) another aggregate; maxima only ever grow."""
        for name in SUM_FIELDS:
            setattr(self, name, getattr(self, name) + sign * getattr(other, name))
        if other.bounds is not None and other.counts is not None:
            histogram = {"bounds": other.bounds, "counts": [sign * c for c in other.counts]}
            self.add_histogram(histogram)
        if sign > 0:
            self._add_max(other.latency_max_ms, other.max_rss_bytes)

    def histogram(self) -> dict[str, Any]:
        if self.bounds is None or self.counts is None:
            return {}
        return {"bounds": list(self.bounds), "counts": list(self.counts)}

    def columns(self) -> dict[str, Any]:
        """The rollup table's value columns."""
        values = {name: getattr(self, name) for name in SUM_FIELDS}
        values.update(
            latency_histogram=self.histogram(),
            latency_max_ms=self.latency_max_ms,
            max_rss_bytes=self.max_rss_bytes,
        )
        return values

    def percentile_ms(self, q: float) -> float | None:
        histogram = self.histogram()
        value = merged_percentile([histogram], q) if histogram else None
        return None if value is None else round(value * 1000, 3)

    def point(self) -> dict[str, Any]:
        """What a series reports for one step."""
        return {
            "windows": self.windows,
            "requests": self.requests,
            "errors": self.errors,
            "error_rate": round(self.errors / self.requests, 6) if self.requests else None,
            "latency_p50_ms": self.percentile_ms(0.50),
            "latency_p95_ms": self.percentile_ms(0.95),
            "latency_p99_ms": self.percentile_ms(0.99),
            "latency_max_ms": self.latency_max_ms,
            "ttft_ms": _mean(self.ttft_ms_sum, self.ttft_requests),
            "tokens_per_s": _mean(self.tokens_per_s_sum, self.tokens_per_s_requests),
            "rss_bytes": int(self.rss_bytes_sum / self.windows) if self.windows else None,
            "max_rss_bytes": self.max_rss_bytes if self.windows else None,
        }


def _mean(total: float, weight: int) -> float | None:
    return round(total / weight, 3) if weight else None
