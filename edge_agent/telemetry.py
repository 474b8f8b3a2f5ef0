"""Per-request inference telemetry aggregated into windows; system figures sampled with psutil.

Only numbers are kept: prompts and outputs never reach this module.
"""

from __future__ import annotations

import bisect
import math
import resource
import shutil
import threading
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import psutil

from shared.telemetry import (
    REQUEST_DURATION_BUCKETS,
    TIME_PER_OUTPUT_TOKEN_BUCKETS,
    TIME_TO_FIRST_TOKEN_BUCKETS,
    Histogram,
    Summary,
    SystemSample,
    TelemetryWindow,
)


@dataclass(frozen=True)
class RequestRecord:
    latency_s: float
    ttft_s: float | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    error_type: str | None = None

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first (the gen_ai definition)."""
        if self.ttft_s is None or self.output_tokens < 2:
            return None
        return (self.latency_s - self.ttft_s) / (self.output_tokens - 1)

    @property
    def tokens_per_s(self) -> float | None:
        if self.output_tokens == 0 or self.latency_s <= 0:
            return None
        return self.output_tokens / self.latency_s


def summarize(values: list[float]) -> Summary:
    if not values:
        return Summary()
    ordered = sorted(values)
    return Summary(
        count=len(ordered),
        p50=_nearest_rank(ordered, 0.50),
        p95=_nearest_rank(ordered, 0.95),
        p99=_nearest_rank(ordered, 0.99),
        max=ordered[-1],
    )


def _nearest_rank(ordered: list[float], q: float) -> float:
    return ordered[max(math.ceil(q * len(ordered)) - 1, 0)]


def histogram(values: list[float], bounds: tuple[float, ...]) -> Histogram:
    counts = [0] * (len(bounds) + 1)
    for value in values:
        counts[bisect.bisect_left(bounds, value)] += 1
    return Histogram(bounds=bounds, counts=tuple(counts), sum=sum(values))


class SystemSampler:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self._process = psutil.Process()
        self._process.cpu_percent(None)  # primes the counter; the next call measures since now

    def sample(self) -> SystemSample:
        rss = self._process.memory_info().rss
        # ru_maxrss is in KiB on Linux: the process's peak resident set.
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return SystemSample(
            rss_bytes=rss,
            peak_rss_bytes=max(peak, rss),
            available_memory_bytes=psutil.virtual_memory().available,
            cpu_percent=self._process.cpu_percent(None),
            disk_free_bytes=shutil.disk_usage(self.data_dir).free,
            temperature_c=_temperature(),
        )


def _temperature() -> float | None:
    read = getattr(psutil, "sensors_temperatures", None)
    if read is None:
        return None
    try:
        sensors = read()
    except (OSError, RuntimeError):
        return None
    readings = [t.current for entries in sensors.values() for t in entries if t.current]
    return max(readings) if readings else None


class WindowAggregator:
    """Collects RequestRecords; `close_window` returns the window and starts the next one."""

    def __init__(self, device_id: str | None = None, *, seq: int = 0) -> None:
        self.device_id = device_id
        self._lock = threading.Lock()
        self._records: list[RequestRecord] = []
        self._seq = seq
        self._start = datetime.now(UTC)

    def record(self, record: RequestRecord) -> None:
        with self._lock:
            self._records.append(record)

    def close_window(
        self, *, model: str | None, version: str | None, sha256: str | None, system: SystemSample
    ) -> TelemetryWindow:
        now = datetime.now(UTC)
        with self._lock:
            records, self._records = self._records, []
            start, self._start = self._start, now
            seq, self._seq = self._seq, self._seq + 1
        latencies = [r.latency_s for r in records]
        ttfts = [r.ttft_s for r in records if r.ttft_s is not None]
        tpots = [t for r in records if (t := r.tpot_s) is not None]
        rates = [t for r in records if (t := r.tokens_per_s) is not None]
        errors = Counter(r.error_type for r in records if r.error_type)
        return TelemetryWindow(
            device_id=self.device_id,
            seq=seq,
            window_start=start,
            window_end=now,
            model=model,
            version=version,
            sha256=sha256,
            requests=len(records),
            errors=sum(errors.values()),
            error_types=dict(errors),
            latency_s=summarize(latencies),
            time_to_first_token_s=summarize(ttfts),
            time_per_output_token_s=summarize(tpots),
            tokens_per_s=summarize(rates),
            input_tokens=sum(r.input_tokens for r in records),
            output_tokens=sum(r.output_tokens for r in records),
            latency_histogram=histogram(latencies, REQUEST_DURATION_BUCKETS),
            ttft_histogram=histogram(ttfts, TIME_TO_FIRST_TOKEN_BUCKETS),
            tpot_histogram=histogram(tpots, TIME_PER_OUTPUT_TOKEN_BUCKETS),
            system=system,
        )
